"""Which vLLM releases ``PdConnector`` runs on, and the few places they differ.

Supported: vLLM 0.26.0 through 0.34.x (``SUPPORTED``). Differences are detected from
what vLLM's connector base module offers, not from the version string; the version
only gates loading, so an untested release fails at start-up with one clear line
instead of misbehaving inside the engine.

* 0.27+ asks the worker for ``get_transfer_results`` (finished and *failed* loads by
  request id, ``KVConnectorTransferResults``). 0.26 calls ``get_finished`` and learns
  of failed loads only from ``get_block_ids_with_load_errors`` (local block ids,
  reported no later than the step that returns the request as finished).
* Hooks added after 0.26 (``get_mem_pool_context``, ``finish_forward``,
  ``bind_kv_cache_manager``, ``has_pending_block_frees``, ...) keep their base-class
  defaults: the connector needs none of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1 import base as _base

SUPPORTED = ((0, 26), (0, 34))  # inclusive (major, minor) range
ENV_SKIP_CHECK = "PDSIDECAR_ALLOW_ANY_VLLM"

_NATIVE_RESULTS: Any = getattr(_base, "KVConnectorTransferResults", None)
# True where vLLM has no per-request failure channel (0.26): report failed blocks
LEGACY_FAILURE_REPORTING = _NATIVE_RESULTS is None


class UnsupportedVllmError(RuntimeError):
    """This vLLM release is outside the range the connector supports."""


def supported_range() -> str:
    (a, b), (c, d) = SUPPORTED
    return f"{a}.{b}.0 - {c}.{d}.x"


def parse_version(text: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a vLLM version string (``0.32.0+cpu``, ``0.26.0rc1``)."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_vllm_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedVllmError` (one line) outside ``SUPPORTED``.

    ``PDSIDECAR_ALLOW_ANY_VLLM=1`` skips the check (for trying a new release).
    """
    import os
    if os.environ.get(ENV_SKIP_CHECK) == "1":
        return
    if version is None:
        import vllm
        version = getattr(vllm, "__version__", "")
    v = parse_version(version)
    if v is None or not SUPPORTED[0] <= v <= SUPPORTED[1]:
        raise UnsupportedVllmError(
            f"PdConnector supports vLLM {supported_range()}; this is vLLM {version or '?'} "
            f"(set {ENV_SKIP_CHECK}=1 to try it anyway)")


if _NATIVE_RESULTS is not None:
    TransferResults: Any = _NATIVE_RESULTS
else:
    @dataclass
    class TransferResults:  # type: ignore[no-redef]
        """Stand-in with the fields of vLLM 0.27+'s ``KVConnectorTransferResults``."""

        finished_sending: set[str] = field(default_factory=set)
        finished_recving: set[str] = field(default_factory=set)
        failed_recving: set[str] = field(default_factory=set)
