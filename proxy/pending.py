"""Prefill role: KV handed out to decode peers and not yet picked up.

One lifetime per entry, the prefill engine's: its KV lease as the engine's
`kv_transfer_params` say (`kv_lease_s` / `pd_kv_lease_s`, else the time left to
`remote_blocks_expiry_time`). After it the engine has freed the blocks, so the entry is
forgotten (counted as expired); a connector that reports neither gets vLLM
NixlConnector's default lease (`UNREPORTED_LEASE_S`). There is no second, sidecar-side TTL.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["LEASE_FIELDS", "Pending", "PendingKV", "UNREPORTED_LEASE_S", "kv_size_hints", "lease_hint"]

# the lease-duration fields an engine's params may carry, in order of preference
LEASE_FIELDS = ("kv_lease_s", "pd_kv_lease_s")
# vLLM NixlConnector's default `kv_lease_duration`: what an engine that reports no lease holds
UNREPORTED_LEASE_S = 30.0
_MAX_LEASE_S = 1e6


def _seconds(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def lease_hint(kv: dict, now_wall: float | None = None) -> float | None:
    """The prefill engine's KV lease in seconds from its params, if they say.

    A duration field (`LEASE_FIELDS`) wins; else the time left until the params' own
    `remote_blocks_expiry_time` (the prefill host's wall clock: this sidecar runs beside
    that engine). None when neither is a sane number."""
    for name in LEASE_FIELDS:
        v = _seconds(kv.get(name))
        if v is not None:
            return v if 0 < v < _MAX_LEASE_S else None
    expiry = _seconds(kv.get("remote_blocks_expiry_time"))
    if expiry is None:
        return None
    left = expiry - (time.time() if now_wall is None else now_wall)
    return left if 0 < left < _MAX_LEASE_S else None


def kv_size_hints(kv: Any) -> tuple[int | None, int | None]:
    """(blocks, bytes) of a prefill response's kv_transfer_params, when it says.

    Optional hints only (the params stay opaque): block ids as vLLM's NIXL-style
    `remote_block_ids` (one list per KV group, or flat), bytes as `pd_kv_bytes` or
    `pd_transfer.bytes` when our connector reports them."""
    if not isinstance(kv, dict):
        return None, None
    blocks = None
    ids = kv.get("remote_block_ids")
    if isinstance(ids, list):
        if ids and all(isinstance(g, list) for g in ids):
            blocks = sum(len(g) for g in ids)
        else:
            blocks = len(ids)
    nbytes = kv.get("pd_kv_bytes")
    if not isinstance(nbytes, int):
        t = kv.get("pd_transfer")
        nbytes = t.get("bytes") if isinstance(t, dict) else None
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        nbytes = None
    return blocks, nbytes


@dataclass
class Pending:
    peer: str
    tokens: int
    blocks: int
    nbytes: int
    created: float  # monotonic
    lease_s: float = UNREPORTED_LEASE_S  # the engine's KV lease (lease_hint)

    @classmethod
    def from_params(cls, peer: str, tokens: int, kv: dict, now: float | None = None) -> "Pending":
        blocks, nbytes = kv_size_hints(kv)
        lease = lease_hint(kv)
        return cls(peer, tokens, blocks or 0, nbytes or 0, time.monotonic() if now is None else now,
                   UNREPORTED_LEASE_S if lease is None else lease)


class PendingKV:
    """KV handed out and not yet picked up, per decode peer."""

    def __init__(self) -> None:
        # keyed by (decode peer, request id): one peer can neither overwrite nor release
        # another's entry by naming its request id
        self.items: dict[tuple[str, str], Pending] = {}

    def add(self, rid: str, p: Pending) -> None:
        self.items[(p.peer, rid)] = p

    def pop(self, rid: str, peer: str) -> Pending | None:
        return self.items.pop((peer, rid), None)

    def expire(self, now: float | None = None) -> int:
        """Forget entries past their engine's lease (the engine has freed the blocks)."""
        now = time.monotonic() if now is None else now
        old = [k for k, p in self.items.items() if now - p.created > p.lease_s]
        for k in old:
            del self.items[k]
        return len(old)

    def summary(self, now: float | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        now = time.monotonic() if now is None else now
        peers: dict[str, dict[str, Any]] = {}
        for p in self.items.values():
            d = peers.setdefault(p.peer, {"requests": 0, "tokens": 0, "blocks": 0, "bytes": 0, "oldest_age_s": 0.0})
            d["requests"] += 1
            d["tokens"] += p.tokens
            d["blocks"] += p.blocks
            d["bytes"] += p.nbytes
            d["oldest_age_s"] = max(d["oldest_age_s"], round(now - p.created, 3))
        total = {"requests": 0, "tokens": 0, "blocks": 0, "bytes": 0, "oldest_age_s": 0.0}
        for d in peers.values():
            for k in ("requests", "tokens", "blocks", "bytes"):
                total[k] += d[k]
            total["oldest_age_s"] = max(total["oldest_age_s"], d["oldest_age_s"])
        return total, peers
