"""The UCX endpoint flush a notification owes, paid after the notification instead of
inside the next READ.

A NIXL notification is a UCX active message. Between two processes of one host UCX
picks TCP for active messages and CMA for the copies (its log: ``intra-node cfg ...
am(tcp/lo cma/memory)``). An active message leaves the TCP endpoint
needing a flush, and NIXL flushes the endpoint at the end of every READ: the READ after
a completion notification then waits for a round trip to the peer, whose progress thread
must answer, instead of completing inside its post (measured here: 0.07 ms with both
sides busy, ~1.1 ms with the peer's progress thread asleep; without a notification
before it a 512 KiB READ completes inside its post 119 times in 120).

:class:`LaneFlush` posts a one-descriptor, 8-byte READ of the peer's first registered
bytes into a private buffer right after each notification: NIXL's flush at its end
pays the round trip in the background, on the progress thread, and the next READ finds
the endpoint clean. DRAM peers only (the CPU path, where it was measured).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: bytes each flush READ moves (into a buffer of its own; what it reads is discarded)
FLUSH_BYTES = 8


class LaneFlush:
    """Flush READs of one NIXL agent: a private buffer, one prepped list per peer."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._buf = np.zeros(FLUSH_BYTES, dtype=np.uint8)
        addr = int(self._buf.ctypes.data)
        self._reg = agent.register_memory([(addr, FLUSH_BYTES, 0, "")], "DRAM")
        self._local = agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", np.array([[addr, FLUSH_BYTES, 0]], dtype=np.int64), "DRAM")
        self._remote: dict[str, Any] = {}  # peer agent -> its prepped one-descriptor list
        self._pending: list[tuple[str, Any]] = []  # (peer agent, xfer handle) posted
        self._index = np.zeros(1, dtype=np.int32)

    @property
    def pending(self) -> int:
        """Flush READs posted and not yet seen over."""
        return len(self._pending)

    def add_peer(self, agent_name: str, addr: int, device_id: int) -> None:
        """Flush READs to ``agent_name`` read ``FLUSH_BYTES`` at its registered ``addr``
        (none if NIXL refuses the list: the next READ then pays the flush, as without)."""
        try:
            self._remote[agent_name] = self.agent.prep_xfer_dlist(
                agent_name, np.array([[addr, FLUSH_BYTES, device_id]], dtype=np.int64), "DRAM")
        except Exception:
            self._remote.pop(agent_name, None)

    def after_notif(self, agent_name: str) -> None:
        """Post a flush READ to ``agent_name`` (a notification was just sent to it)."""
        self.reap()
        remote = self._remote.get(agent_name)
        if remote is None:
            return
        try:
            xh = self.agent.make_prepped_xfer("READ", self._local, self._index, remote,
                                              self._index)
        except Exception:
            return  # the next READ pays the flush, as without this
        try:
            state = self.agent.transfer(xh)
        except Exception:
            state = "ERR"
        if state == "PROC":
            self._pending.append((agent_name, xh))
        else:
            self._release(xh)

    def reap(self) -> None:
        """Release the flush READs NIXL reports over."""
        keep = []
        for name, xh in self._pending:
            try:
                state = self.agent.check_xfer_state(xh)
            except Exception:
                continue  # NIXL dropped it (its peer is gone): nothing left to release
            if state == "PROC":
                keep.append((name, xh))
            else:
                self._release(xh)
        self._pending = keep

    def remove_peer(self, agent_name: str) -> None:
        """Before the peer's metadata goes: release its flush READs and list. A READ
        still active only writes into our private buffer, which outlives it."""
        for name, xh in self._pending:
            if name == agent_name:
                self._release(xh)
        self._pending = [(n, xh) for n, xh in self._pending if n != agent_name]
        dl = self._remote.pop(agent_name, None)
        if dl is not None:
            self._release_dlist(dl)

    def close(self) -> None:
        for name in list(self._remote):
            self.remove_peer(name)
        self._release_dlist(self._local)
        try:
            self.agent.deregister_memory(self._reg)
        except Exception:
            pass

    def _release(self, xh: Any) -> None:
        try:
            self.agent.release_xfer_handle(xh)
        except Exception:
            pass

    def _release_dlist(self, dl: Any) -> None:
        try:
            self.agent.release_dlist_handle(dl)
        except Exception:
            pass
