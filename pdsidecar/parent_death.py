"""``PR_SET_PDEATHSIG``: a child asks the kernel for a signal when its parent dies.

Used by the sidecar's worker processes (``pdsidecar.workers``) and by the engines the
development harness starts (``pdsidecar.dev.procs``).
"""

from __future__ import annotations


def set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where unsupported (not Linux)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
