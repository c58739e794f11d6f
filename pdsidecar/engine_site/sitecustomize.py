"""Runs at start-up of every Python process of an engine started by ``pdsidecar.dev.engines``.

It asks Linux for AMX tile permission (``transfer.amx``; a no-op without ``amx_tile``)
so that every engine the harness starts -- ours, the stock connector's and aggregated
ones that ``pdbench`` compares against -- runs under the same rules, then runs the next
``sitecustomize`` on ``sys.path`` (e.g. the test suite's ``tests/nixl_quiet``), since
Python itself imports only the first one it finds. It never raises.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _say(line: str) -> None:
    # os.write, not print: this also runs in forked children, where a stream lock held
    # by another thread of the parent at fork time would never be released.
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


def _request_amx() -> None:
    try:
        from transfer.amx import request_amx_tile_permission

        if request_amx_tile_permission(say=_say):
            # forked children (vLLM's engine core, workers) inherit the permission: each
            # checks and reports its own (ARCH_GET_XCOMP_PERM), so every engine process
            # has its line in the engine log
            os.register_at_fork(after_in_child=lambda: request_amx_tile_permission(say=_say))
    except Exception as e:  # noqa: BLE001 - never break an interpreter's start-up
        _say(f"pdsidecar: AMX tile permission hook failed (pid {os.getpid()}): {type(e).__name__}: {e}")


def _run_next_sitecustomize() -> None:
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None or spec.origin == os.path.abspath(__file__):
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_request_amx()
try:
    _run_next_sitecustomize()
except Exception as e:  # noqa: BLE001
    _say(f"pdsidecar: the next sitecustomize failed (pid {os.getpid()}): {type(e).__name__}: {e}")
