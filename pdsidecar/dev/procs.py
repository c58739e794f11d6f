"""Processes, ports and cores for the engine harness: free ports, CPU slices and
pinning, parent-death signals and process-group membership (Linux /proc)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from pdsidecar.parent_death import set_parent_death_signal


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' source ports."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now, below the kernel's ephemeral range
    where it has room (a port from that range can be taken as the source port of some
    outgoing connection before the server that was handed it binds), never one this
    process handed out before."""
    lo, _ = _ephemeral_range()
    first = 20000 if lo > 21000 else 1024
    for _ in range(200 if lo - first > 1000 else 0):
        port = random.randrange(first, lo)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def cpu_slices(n: int) -> list[str]:
    """Split this process's CPUs into `n` disjoint `VLLM_CPU_OMP_THREADS_BIND` values."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cpus) < n:
        return [",".join(map(str, cpus))] * n
    per = len(cpus) // n
    return [",".join(map(str, cpus[i * per : (i + 1) * per])) for i in range(n)]


def bind_cpus(spec: str | None) -> set[int] | None:
    """The cores named by a `VLLM_CPU_OMP_THREADS_BIND` value ("0", "0,2", "0-3",
    "0-1|2-3" per rank); None for "auto", "nobind", empty or unparsable values."""
    if not spec:
        return None
    cpus: set[int] = set()
    try:
        for part in spec.replace("|", ",").split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        return None
    return cpus or None


def child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """A ``preexec_fn`` for an engine child: die with its starter, run on `cpus` (if any)."""
    def setup() -> None:
        die_with_parent()
        if cpus and hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(OSError):  # a core outside our cpuset: stay unpinned
                os.sched_setaffinity(0, cpus)
    return setup


def unpin_threads(pid: int) -> None:
    """Let every thread of `pid` (not its children) run on all of our cores again."""
    cpus = os.sched_getaffinity(0)
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(int(tid), cpus)


def die_with_parent() -> None:
    """In the engine child: SIGTERM it when its starter dies (Linux), however that dies.

    Engines run in their own session (so a group kill reaches their workers), which
    also takes them out of the starter's signals: without this, a starter killed by a
    timeout or SIGKILL leaves the engine running, one core busy, forever.
    """
    set_parent_death_signal(signal.SIGTERM)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is `pgid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out
