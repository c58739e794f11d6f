"""Push-mode write grants (issue 16): no wall-clock time crosses hosts.

Decode side (:class:`WriteHolds`): the blocks registered for a push are held on the
decode's own monotonic clock. A prefill engine asks ``write:<push id>`` over the
control plane before its first WRITE (and again to renew). The decode grants it only
while it still waits for the push (registration + ``push_wait_s``); a grant at time
``g`` keeps the blocks out of vLLM's hands at least until ``g + write lease + grace``,
or until the push's final notification (every WRITE over), whichever comes first.
After the wait ends, asks are refused (``expired``), and the load fails once no
granted WRITE can still land (quarantine, as the pull side does for late READs).

Prefill side: it WRITEs only while ``time it asked + write lease`` on *its* monotonic
clock has not passed. Asked < granted, so its window closes before the decode's hold
ends, by at least ``grace``: the time a WRITE posted at the last moment has to land.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from ..errors import FailureReason, PeerRefused

#: Prefill: renew a write grant once less than this fraction of the lease is left.
RENEW_LEFT = 0.5


@dataclass
class WriteHold:
    """Decode side: one registered push's blocks, held for the prefill's WRITEs."""

    req_id: str
    deadline: float  # decode clock: no grant after this (registration + push_wait_s)
    granted_until: float = -math.inf  # decode clock: a granted WRITE may land until then
    grants: int = 0
    closed: bool = False  # no more grants (wait over, aborted, failed by the peer)
    reason: str = ""  # why the load fails once closed
    reported: bool = False  # the workers were told how the push ended
    ended: bool = False  # the load was reported to vLLM
    drop_at: float = math.inf  # once reported: refuse asks until then, then forget


class WriteHolds:
    """The decode engine's push holds by push id (control-server threads grant, the
    engine thread sweeps); every time is the caller's monotonic clock."""

    def __init__(self, write_lease_s: float, grace_s: float, keep_s: float) -> None:
        self.write_lease_s = write_lease_s
        self.grace_s = grace_s
        self.keep_s = keep_s  # a push the workers were told about is forgotten after this
        self._holds: dict[str, WriteHold] = {}
        self._lock = threading.Lock()
        self._next_check = math.inf
        self.granted = 0  # counters not yet taken by get_stats
        self.refused = 0

    def open(self, push_id: str, req_id: str, now: float, wait_s: float) -> None:
        with self._lock:
            self._holds[push_id] = WriteHold(req_id, now + wait_s)
            self._next_check = min(self._next_check, now + wait_s)

    def grant(self, push_id: str, now: float) -> None:
        """``write:<push id>``: allow WRITEs for a write lease, or raise
        :class:`PeerRefused` (``expired``) once the decode no longer waits."""
        with self._lock:
            h = self._holds.get(push_id)
            if h is None or h.closed or h.ended or now > h.deadline:
                self.refused += 1
                raise PeerRefused(FailureReason.EXPIRED, f"push {push_id[:80]!r} is not "
                                  f"awaited any more: its blocks are being given back")
            h.granted_until = max(h.granted_until, now + self.write_lease_s + self.grace_s)
            h.grants += 1
            self.granted += 1

    def close(self, push_id: str, now: float, reason: str) -> None:
        """No more grants (e.g. the decode request was aborted); the load fails once
        no granted WRITE can still land (:meth:`sweep`)."""
        with self._lock:
            h = self._holds.get(push_id)
            if h is not None and not h.closed and not h.ended:
                h.closed, h.reason = True, reason
                h.deadline = min(h.deadline, now)
                self._next_check = min(self._next_check, now)

    def failed_by_peer(self, push_id: str, now: float) -> bool:
        """The prefill reported the push failed, which it does only once none of its
        WRITEs can still land: the load fails now. False if nothing waits for it."""
        with self._lock:
            h = self._holds.get(push_id)
            if h is None or h.ended or h.reported:
                return False
            h.closed = h.reported = True
            self._forget_later(h, now)
            return True

    def end(self, push_id: str, now: float) -> None:
        """The load was reported to vLLM: refuse asks for ``keep_s`` more (a late
        prefill learns at once that nobody waits), then forget the push."""
        with self._lock:
            h = self._holds.get(push_id)
            if h is not None and not h.ended:
                h.ended = h.closed = h.reported = True
                self._forget_later(h, now)

    def _forget_later(self, h: WriteHold, now: float) -> None:
        h.drop_at = now + self.keep_s
        self._next_check = min(self._next_check, h.drop_at)

    def sweep(self, now: float) -> tuple[dict[str, str], list[str]]:
        """``({push id: reason}`` of loads to fail now, ``[push ids forgotten]``)."""
        fail: dict[str, str] = {}
        dropped: list[str] = []
        if now < self._next_check:
            return fail, dropped
        nxt = math.inf
        with self._lock:
            for pid, h in list(self._holds.items()):
                if h.reported:  # the workers know: a tombstone until drop_at
                    if now > h.drop_at:
                        del self._holds[pid]
                        dropped.append(pid)
                    else:
                        nxt = min(nxt, h.drop_at)
                    continue
                if not h.closed and now > h.deadline:
                    h.closed, h.reason = True, FailureReason.TIMEOUT
                if not h.closed:
                    nxt = min(nxt, h.deadline)
                elif now > h.granted_until:
                    h.reported = True
                    fail[pid] = h.reason or FailureReason.TIMEOUT
                    self._forget_later(h, now)
                    nxt = min(nxt, h.drop_at)
                else:  # a granted WRITE may still land: quarantined until then
                    nxt = min(nxt, h.granted_until)
            self._next_check = nxt
        return fail, dropped

    def get(self, push_id: str) -> WriteHold | None:
        with self._lock:
            return self._holds.get(push_id)

    def take_counts(self) -> tuple[int, int]:
        """``(granted, refused)`` since the last call."""
        with self._lock:
            out = (self.granted, self.refused)
            self.granted = self.refused = 0
            return out

    def __len__(self) -> int:
        return len(self._holds)
