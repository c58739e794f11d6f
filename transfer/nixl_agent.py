"""Making a NIXL agent: the import (lazy, a clear error without NIXL), the UCX
transports a protocol selects, and the progress thread's poll delay; the agent
wrapper of ``prepare_only`` and the CUDA event a VRAM WRITE is posted after."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Sequence

from .errors import BackendUnavailableError

UCX_TLS_BY_PROTOCOL = {"tcp": "tcp,self"}
#: Progress-thread delay (µs) between polls when nothing sets one; 0 is NIXL's busy-poll.
PROGRESS_DELAY_US = 100
PROGRESS_DELAY_ENV = "PDSIDECAR_NIXL_PROGRESS_DELAY_US"


def progress_delay_default(env: Any = None) -> int:
    """The poll delay from ``PDSIDECAR_NIXL_PROGRESS_DELAY_US``, else :data:`PROGRESS_DELAY_US`."""
    env = os.environ if env is None else env
    raw = env.get(PROGRESS_DELAY_ENV, "")
    try:
        return int(raw) if raw else PROGRESS_DELAY_US
    except ValueError:
        raise ValueError(f"{PROGRESS_DELAY_ENV}={raw!r} is not a whole number of µs") from None
_agent_ctor_lock = threading.Lock()


def _import_nixl() -> Any:
    try:
        from nixl import _api  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or a broken CUDA-flavoured build
        raise BackendUnavailableError(f"NIXL is not importable: {e}") from e
    return _api


@contextlib.contextmanager
def _progress_delay(api: Any, delay_us: int):
    """Create agents inside this block with ``pthrDelay = delay_us``.

    ``nixl_agent.__init__`` builds its ``nixlAgentConfig`` itself and sets
    ``pthrDelay = 0``; the binding's agent constructor is wrapped for the duration
    (under a lock, restored afterwards) to set the delay we want.
    """
    with _agent_ctor_lock:
        bind = api.nixlBind
        original = bind.nixlAgent

        def make_agent(name: str, cfg: Any) -> Any:
            cfg.pthrDelay = delay_us
            return original(name, cfg)

        bind.nixlAgent = make_agent
        try:
            yield
        finally:
            bind.nixlAgent = original


def make_agent(name: str, protocol: str, backends: Sequence[str], num_threads: int = 0,
               capture_telemetry: bool = False,
               progress_delay_us: int | None = None) -> tuple[Any, Any]:
    """``(nixl._api module, agent)`` named ``name``. ``protocol="tcp"`` sets
    ``UCX_TLS`` for this process before the agent exists (one protocol per process)."""
    if protocol in UCX_TLS_BY_PROTOCOL:
        os.environ["UCX_TLS"] = UCX_TLS_BY_PROTOCOL[protocol]
    elif protocol not in ("rdma", "auto"):
        raise ValueError(f"unknown NIXL protocol {protocol!r} (rdma, tcp)")
    # UCX reads this when the agent's worker is made: a thread waiting for the worker
    # lock sleeps instead of spinning (see transfer.nixl_engine's docstring)
    os.environ.setdefault("UCX_USE_MT_MUTEX", "y")
    api = _import_nixl()
    cfg = api.nixl_agent_config(backends=list(backends), num_threads=num_threads,
                                capture_telemetry=capture_telemetry)
    if progress_delay_us is None:
        progress_delay_us = progress_delay_default()
    if progress_delay_us < 0:
        raise ValueError(f"progress_delay_us must be >= 0, got {progress_delay_us}")
    with _progress_delay(api, progress_delay_us):
        agent = api.nixl_agent(name, cfg)
    if not agent.backends:
        raise BackendUnavailableError(f"NIXL backends {list(backends)} unavailable")
    return api, agent


class UnpostedAgent:
    """:meth:`NixlTransferEngine.prepare_only`: the engine's NIXL agent, except that
    ``transfer`` posts nothing and reports DONE (the engine then releases the handle)."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)

    def transfer(self, handle: Any, notif_msg: bytes = b"") -> str:
        return "DONE"


def compute_event() -> Any:
    """A CUDA event recorded on the caller's current stream.

    A WRITE out of a CUDA cache (push, from ``save_kv_layer``) must not start before
    the layer's cache write queued on that stream is done; NIXL cannot wait on a
    stream, so the post waits for this event, checked without blocking by ``poll``.
    """
    import torch
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream())
    return ev
