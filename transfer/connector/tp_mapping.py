"""Heterogeneous TP: which remote ranks (and which heads / bytes of their blocks) a
local rank reads, and how many completion notifications each block owner waits for.

Head counts per rank come from :mod:`transfer.layout`; the byte width of one head in
a block (``bytes_per_head``) from :func:`transfer.layout.head_slice_bytes` on the
real cache strides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from ..layout import heads_per_rank, rank_heads


@dataclass(frozen=True)
class TPReadSlice:
    """One piece of a local block that comes from one remote rank.

    Heads are global KV-head indices counted from each rank's first head. Byte fields
    are per block per layer (head-major layout: a head is a contiguous range).
    """

    remote_rank: int
    remote_head_start: int  # first head inside the remote rank's block
    local_head_start: int  # first head inside the local rank's block
    num_heads: int
    remote_offset: int = 0  # bytes inside the remote block
    local_offset: int = 0  # bytes inside the local block
    length: int = 0  # bytes


@dataclass(frozen=True)
class TPPlan:
    """What one local rank reads (``slices``) and which remote ranks it only notifies."""

    slices: tuple[TPReadSlice, ...]
    notify_only: tuple[int, ...] = field(default=())

    @property
    def remote_ranks(self) -> tuple[int, ...]:
        return tuple(sorted({s.remote_rank for s in self.slices}))


def _owner_of_head(head: int, local_rank: int, remote_tp: int, num_kv_heads: int,
                   is_mla: bool) -> int:
    owners = [p for p in range(remote_tp)
              if head in rank_heads(p, remote_tp, num_kv_heads, is_mla)]
    # spread readers over replicas: local rank i picks replica i mod #replicas
    return owners[local_rank % len(owners)]


def tp_read_plan(
    local_rank: int, local_tp: int, remote_tp: int, num_kv_heads: int,
    is_mla: bool = False, bytes_per_head: int | None = None,
    kv_layout: str = "HND",
) -> TPPlan:
    """Which remote ranks (and which heads/bytes of their blocks) ``local_rank`` reads.

    Works both ways (local TP larger or smaller than remote) and with replicated
    heads (TP > KV heads, MLA). Slicing inside a block needs a head-major layout
    (``HND``/``LBHNC``); token-major layouts are accepted only when every slice is a
    whole block. ``bytes_per_head`` (per block per layer) fills the byte fields.
    """
    local_heads = rank_heads(local_rank, local_tp, num_kv_heads, is_mla)
    slices: list[TPReadSlice] = []
    cur: list[int] | None = None  # [remote_rank, rstart, lstart, n]
    for i, h in enumerate(local_heads):
        p = _owner_of_head(h, local_rank, remote_tp, num_kv_heads, is_mla)
        rh = h - rank_heads(p, remote_tp, num_kv_heads, is_mla).start
        if cur and cur[0] == p and cur[1] + cur[3] == rh and cur[2] + cur[3] == i:
            cur[3] += 1
        else:
            if cur:
                slices.append(_mk_slice(cur, bytes_per_head))
            cur = [p, rh, i, 1]
    if cur:
        slices.append(_mk_slice(cur, bytes_per_head))
    remote_h = heads_per_rank(num_kv_heads, remote_tp, is_mla)
    partial = any(s.num_heads != remote_h or s.num_heads != len(local_heads) for s in slices)
    if partial and kv_layout.upper() not in ("HND", "LBHNC", "LHBNC", "BLHNC", "BHLNC"):
        raise ValueError(
            f"heterogeneous TP {remote_tp}->{local_tp} needs a head-major KV layout "
            f"(HND/LBHNC), got {kv_layout!r}"
        )
    read = {s.remote_rank for s in slices}
    notify = tuple(
        p for p in range(remote_tp)
        if p not in read and p % local_tp == local_rank % local_tp
        and not _read_by_anyone(p, local_tp, remote_tp, num_kv_heads, is_mla)
    )
    return TPPlan(tuple(slices), notify)


def _mk_slice(cur: list[int], bph: int | None) -> TPReadSlice:
    p, rh, lh, n = cur
    if bph is None:
        return TPReadSlice(p, rh, lh, n)
    return TPReadSlice(p, rh, lh, n, rh * bph, lh * bph, n * bph)


def _read_by_anyone(remote_rank: int, local_tp: int, remote_tp: int, num_kv_heads: int,
                    is_mla: bool) -> bool:
    for r in range(local_tp):
        for h in rank_heads(r, local_tp, num_kv_heads, is_mla):
            if _owner_of_head(h, r, remote_tp, num_kv_heads, is_mla) == remote_rank:
                return True
    return False


def expected_notifications(
    remote_rank: int, local_tp: int, remote_tp: int, num_kv_heads: int, is_mla: bool = False
) -> int:
    """Notifications the *remote* rank (the block owner) receives for one request.

    Counts local ranks that read from it or notify it (see :func:`tp_read_plan`). The
    owner frees a request's blocks after this many completion notifications.
    """
    n = 0
    for r in range(local_tp):
        plan = tp_read_plan(r, local_tp, remote_tp, num_kv_heads, is_mla)
        if remote_rank in plan.remote_ranks or remote_rank in plan.notify_only:
            n += 1
    return n


@lru_cache(maxsize=256)
def expected_notifications_cached(remote_rank: int, local_tp: int, remote_tp: int,
                                  num_kv_heads: int, is_mla: bool = False) -> int:
    """:func:`expected_notifications`, memoized (pure, called once per READ)."""
    return expected_notifications(remote_rank, local_tp, remote_tp, num_kv_heads, is_mla)
