"""AMX tile permission for vLLM engine processes (Linux, x86-64).

Why this exists: Linux refuses AMX tile instructions (SIGILL) in a process until that
process asked for the XTILEDATA state component with
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``. oneDNN asks before its own AMX
matmuls, so an aggregated engine gets the permission as a side effect of its first big
prefill; but a decode engine whose first step is one token over KV loaded by a
connector reaches vLLM's AMX attention kernel (``cpu_attention_with_kv_cache``) first,
and its worker dies with exit code -4. The permission is per process and is cleared by
``execve``, so every engine process asks for itself:

- our connector's worker half asks when it is constructed (``PdConnectorWorker``);
- the engine harness (``pdsidecar.dev.engines``) puts ``pdsidecar/engine_site`` on every
  engine's ``PYTHONPATH``, whose ``sitecustomize`` asks at interpreter start-up, so the
  stock-connector and aggregated engines that ``pdbench`` compares against get it too.

Where the CPU has no ``amx_tile`` flag (AMD, older Intel, not Linux) this is a no-op.
Failures are logged once per process and never raised.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Callable

SYS_ARCH_PRCTL = 158  # x86-64 syscall number of arch_prctl
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18

GRANTED_LINE = "pdsidecar: requested AMX tile permission (XTILEDATA) for this process (pid {pid})"
HELD_LINE = "pdsidecar: AMX tile permission (XTILEDATA) already held by this process (pid {pid})"
FAILED_LINE = "pdsidecar: could not get AMX tile permission (XTILEDATA) for this process (pid {pid}): {why}"

_log = logging.getLogger("vllm.pdsidecar.amx")  # vLLM's handlers and format
_done: dict[int, bool] = {}  # pid -> result (a forked child checks again)


def cpu_has_amx_tile(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the kernel lists the ``amx_tile`` CPU flag (read from /proc/cpuinfo)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split(":", 1)[-1].split()
    except OSError:
        pass
    return False


def _arch_prctl(code: int, arg):
    """(return value, errno) of the raw arch_prctl syscall; raises OSError off x86-64 Linux."""
    import ctypes

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise OSError("arch_prctl exists only on x86-64 Linux")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(code), arg)
    return rc, ctypes.get_errno()


def amx_tile_permitted() -> bool | None:
    """Whether this process may use XTILEDATA (``ARCH_GET_XCOMP_PERM``); None where the
    kernel cannot say (not x86-64 Linux, or a kernel older than 5.16)."""
    import ctypes

    try:
        mask = ctypes.c_ulong(0)
        rc, _ = _arch_prctl(ARCH_GET_XCOMP_PERM, ctypes.byref(mask))
    except (OSError, AttributeError):
        return None
    if rc != 0:
        return None
    return bool(mask.value & (1 << XFEATURE_XTILEDATA))


def request_amx_tile_permission(say: Callable[[str], None] | None = None,
                                 cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Ask Linux for AMX tile permission in this process, once; True if it holds it.

    A no-op returning False where `cpuinfo` lacks ``amx_tile``. One line goes to `say`
    (default: the ``vllm.pdsidecar.amx`` logger at INFO, or WARNING on failure) the
    first time per process: granted now, already held, or why not. Never raises.
    """
    pid = os.getpid()
    if pid in _done:
        return _done[pid]
    ok = False
    try:
        if cpu_has_amx_tile(cpuinfo):
            ok = _request(pid, say)
    except Exception as e:  # noqa: BLE001 - a start-up helper must never take an engine down
        _say(say, FAILED_LINE.format(pid=pid, why=f"{type(e).__name__}: {e}"), warn=True)
    _done[pid] = ok
    return ok


def _request(pid: int, say: Callable[[str], None] | None) -> bool:
    if amx_tile_permitted():
        _say(say, HELD_LINE.format(pid=pid))
        return True
    rc, err = _arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    if rc != 0:
        _say(say, FAILED_LINE.format(pid=pid, why=f"arch_prctl(ARCH_REQ_XCOMP_PERM): {os.strerror(err)}"),
             warn=True)
        return False
    if not amx_tile_permitted():
        _say(say, FAILED_LINE.format(pid=pid, why="granted, but ARCH_GET_XCOMP_PERM does not list it"),
             warn=True)
        return False
    _say(say, GRANTED_LINE.format(pid=pid))
    return True


def _say(say: Callable[[str], None] | None, line: str, warn: bool = False) -> None:
    if say is not None:
        say(line)
    else:
        _log.log(logging.WARNING if warn else logging.INFO, line)
