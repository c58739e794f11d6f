"""Test hook: a peer that answers late (``PDSIDECAR_TEST_READ_DELAY_S``).

`LateReads` wraps a real transfer engine: each READ reaches the wire only ``delay_s``
after its post, as from a peer stalled behind a congested link, so it completes after
the caller may have given up on it. Its bytes still land, in the blocks they were
meant for, whether or not anybody still asks about it: a timer thread posts each READ
when due (through the real engine, whose calls all hold its lock); the worker never
waits for it. Until then the transfer is neither done nor released, the state a real
stalled READ is in.

Only for tests of what a late READ must not do (write into blocks vLLM gave to another
request); the engines of a deployment never set it. Byte counts of a delayed READ are
known only once it is posted: its handle reports 0 bytes at the post.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from .engine import TransferEngine, TransferHandle, TransferStats, new_transfer_id
from .errors import TransferFailedError

__all__ = ["LateReads", "READ_DELAY_ENV", "read_delay_s"]

READ_DELAY_ENV = "PDSIDECAR_TEST_READ_DELAY_S"


def read_delay_s(env: Any = None) -> float:
    """The hook's delay from the environment (0: off); a bad value is an error."""
    raw = (os.environ if env is None else env).get(READ_DELAY_ENV, "")
    try:
        v = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{READ_DELAY_ENV}={raw!r} is not a number of seconds") from None
    if not v >= 0:
        raise ValueError(f"{READ_DELAY_ENV} must be >= 0, got {raw!r}")
    return v


@dataclass
class _Held:
    args: tuple
    kw: dict
    real: TransferHandle | None = None
    timed_out: bool = False
    error: Exception | None = None  # the post itself failed: nothing was sent


class LateReads:
    """`engine` with every READ posted ``delay_s`` late; everything else is `engine`'s."""

    def __init__(self, engine: TransferEngine, delay_s: float) -> None:
        self.real = engine
        self.delay_s = delay_s
        self._held: dict[int, _Held] = {}  # transfer id -> the READ behind it
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def read_blocks(self, peer: str, local_block_ids: Any, remote_block_ids: Any,
                    **kw: Any) -> TransferHandle:
        st = TransferStats(new_transfer_id(), kw.get("request_id", ""), peer, "READ",
                           self.real.backend, 0, 0, len(local_block_ids), 0, 0.0, 0.0)
        held = _Held((peer, local_block_ids, remote_block_ids), kw)
        with self._lock:
            self._held[st.transfer_id] = held
        timer = threading.Timer(self.delay_s, self._post, (held,))
        timer.daemon = True
        timer.start()
        return TransferHandle(st, t_submit_ns=time.perf_counter_ns())

    def _post(self, held: _Held) -> None:
        """The timer: the READ goes out now (forgotten or not)."""
        with self._lock:
            try:
                held.real = self.real.read_blocks(*held.args, **held.kw)
            except Exception as e:  # reported by poll, as the real post would have
                held.error = e
                return
            if held.timed_out:
                self.real._on_timeout(held.real)

    def _real(self, h: TransferHandle) -> TransferHandle | None:
        """The READ behind `h` once posted (None before); its post's error, raised."""
        with self._lock:
            held = self._held.get(h.stats.transfer_id)
        if held is not None and held.error is not None:
            raise TransferFailedError(f"late READ post failed: {held.error}") from held.error
        return None if held is None else held.real

    def poll(self, h: TransferHandle) -> bool:
        if h.stats.transfer_id not in self._held:
            return self.real.poll(h)
        real = self._real(h)
        if real is None or not self.real.poll(real):
            return False
        with self._lock:
            self._held.pop(h.stats.transfer_id, None)
        h.stats, h.done = real.stats, True
        return True

    def released(self, h: TransferHandle) -> bool:
        if h.stats.transfer_id not in self._held:
            return h.done or self.real.released(h)
        try:
            real = self._real(h)
        except TransferFailedError:
            real = None  # never posted: nothing can write
        else:
            if real is None or not self.real.released(real):
                return False
        with self._lock:
            self._held.pop(h.stats.transfer_id, None)
        return True

    def _on_timeout(self, h: TransferHandle) -> None:
        with self._lock:
            held = self._held.get(h.stats.transfer_id)
            if held is None:
                self.real._on_timeout(h)
            elif held.real is not None:
                self.real._on_timeout(held.real)
            else:
                held.timed_out = True  # the peer still answers, when it does
