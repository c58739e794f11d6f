"""Block ids over registered regions: the one block-id check, runs of consecutive
ids, ``(addr, len, dev)`` descriptors of blocks (whole or a byte slice of each), and
the regions a layer selection covers. Pure numpy; regions from :mod:`transfer.layout`.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from .errors import BlockIdError
from .layout import Region


def validate_block_ids(block_ids: Any, num_blocks: int, what: str = "block ids") -> np.ndarray:
    """``block_ids`` as a 1-D integer array; :class:`BlockIdError` if one is out of
    ``[0, num_blocks)`` or repeated. The one block-id check of the transfer layer.

    A valid 1-D integer ndarray comes back as is (no copy, its dtype kept); short
    lists are checked in plain Python (cheaper than numpy's per-call cost), long
    ones with one min/max and one sort; anything else is converted to int64.
    """
    a = block_ids if isinstance(block_ids, np.ndarray) else np.asarray(block_ids)
    if a.ndim == 1 and a.dtype.kind in "iu" and a.size:
        if a.size <= 64:
            v = a.tolist()
            if min(v) >= 0 and max(v) < num_blocks and len(set(v)) == len(v):
                return a
        elif int(a.min()) >= 0 and int(a.max()) < num_blocks:
            srt = np.sort(a)
            if not (srt[1:] == srt[:-1]).any():
                return a
    ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return ids
    bad = ids[(ids < 0) | (ids >= num_blocks)]
    if bad.size:
        raise BlockIdError(f"{what}: block id {int(bad[0])} out of range [0, {num_blocks})")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise BlockIdError(f"{what}: duplicate block id {int(uniq[counts > 1][0])}")
    return ids


def validate_block_id_pair(local_ids: Any, remote_ids: Any, local_num_blocks: int,
                           remote_num_blocks: int, local_what: str = "local block ids",
                           remote_what: str = "remote block ids") -> np.ndarray:
    """Both id lists of one transfer as one ``2 x n`` array (row 0 local), checked by
    :func:`validate_block_ids` (local first, then remote), then for equal length."""
    lids = validate_block_ids(local_ids, local_num_blocks, local_what)
    rids = validate_block_ids(remote_ids, remote_num_blocks, remote_what)
    if lids.size != rids.size:
        raise BlockIdError(f"{lids.size} local block ids but {rids.size} remote ones")
    return np.stack((lids, rids))


def coalesce_runs(block_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Split ids into runs of consecutive ids: ``(starts, lengths)`` in given order."""
    ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return ids, ids
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts_idx = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts_idx, [ids.size])))
    return ids[starts_idx], lengths


def coalesce_pairs(
    local_ids: Any, remote_ids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs where both local and remote ids advance by one: ``(lstart, rstart, len)``."""
    l = np.asarray(local_ids, dtype=np.int64).reshape(-1)
    r = np.asarray(remote_ids, dtype=np.int64).reshape(-1)
    if l.size != r.size:
        raise BlockIdError(f"{l.size} local block ids but {r.size} remote block ids")
    if l.size == 0:
        return l, r, l
    brk = np.flatnonzero((np.diff(l) != 1) | (np.diff(r) != 1)) + 1
    s = np.concatenate(([0], brk))
    n = np.diff(np.concatenate((s, [l.size])))
    return l[s], r[s], n


def block_descriptors(
    regions: Sequence[Region],
    block_ids: Any,
    layers: Iterable[int] | None = None,
    offset: int = 0,
    length: int | None = None,
    coalesce: bool = True,
    run_lengths: Any = None,
) -> np.ndarray:
    """``N x 3`` int64 ``(addr, len, dev)`` descriptors for ``block_ids``.

    Order: region-major (all blocks of region 0, then region 1, ...). ``layers``
    picks regions by their ``layer`` index (both K and V regions of split caches).
    ``offset``/``length`` select a byte slice inside every block (heterogeneous TP).
    With ``coalesce`` runs of adjacent ids become one descriptor where the region is
    dense (``block_stride == block_len`` and the whole block is taken). Passing
    ``run_lengths`` treats ``block_ids`` as run starts with those lengths.
    """
    sel = _select_regions(regions, layers)
    if run_lengths is not None:
        starts = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        lens = np.asarray(run_lengths, dtype=np.int64).reshape(-1)
    else:
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        starts, lens = coalesce_runs(ids) if coalesce else (ids, np.ones_like(ids))
    out = []
    for reg in sel:
        blen = reg.block_len - offset if length is None else length
        if offset < 0 or blen <= 0 or offset + blen > reg.block_len:
            raise ValueError(
                f"slice [{offset}, {offset + blen}) outside block of {reg.block_len} B"
            )
        dense = reg.block_stride == reg.block_len and offset == 0 and blen == reg.block_len
        if dense:
            d = np.empty((starts.size, 3), dtype=np.int64)
            d[:, 0] = reg.base_addr + starts * reg.block_stride
            d[:, 1] = lens * blen
            d[:, 2] = reg.device_id
        else:
            ids = np.repeat(starts, lens) + _run_offsets(lens)
            d = np.empty((ids.size, 3), dtype=np.int64)
            d[:, 0] = reg.base_addr + ids * reg.block_stride + offset
            d[:, 1] = blen
            d[:, 2] = reg.device_id
        out.append(d)
    if not out:
        return np.empty((0, 3), dtype=np.int64)
    return np.concatenate(out)


def _run_offsets(lens: np.ndarray) -> np.ndarray:
    """``[0..l0-1, 0..l1-1, ...]`` for run lengths ``lens``."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    return np.arange(total, dtype=np.int64) - starts


def _select_regions(regions: Sequence[Region], layers: Iterable[int] | None) -> list[Region]:
    if layers is None:
        return list(regions)
    wanted = set(int(l) for l in layers)
    present = {r.layer for r in regions}
    missing = wanted - present
    if missing:
        raise ValueError(f"layers {sorted(missing)} not in the registered regions")
    return [r for r in regions if r.layer in wanted]


def region_indices(regions: Sequence[Region], layers: Iterable[int] | None) -> np.ndarray:
    """Indices (into ``regions``) of the regions of ``layers`` (all when None)."""
    if layers is None:
        return np.arange(len(regions), dtype=np.int64)
    wanted = set(int(l) for l in layers)
    missing = wanted - {r.layer for r in regions}
    if missing:
        raise ValueError(f"layers {sorted(missing)} not in the registered regions")
    return np.array([i for i, r in enumerate(regions) if r.layer in wanted], dtype=np.int64)


def total_bytes(regions: Sequence[Region], num_block_ids: int, layers: Iterable[int] | None = None,
                length: int | None = None) -> int:
    return sum((r.block_len if length is None else length) * num_block_ids
               for r in _select_regions(regions, layers))
