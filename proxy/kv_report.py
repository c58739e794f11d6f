"""Decode role: what the decode engine's connector reports about its KV load.

PdConnector answers with `kv_transfer_params.pd_transfer` = {"bytes", "ms", "blocks",
"backend", ...} on success or {"error": <reason>} when the load failed (the engine then
recomputed the prompt); vLLM's stock NixlConnector reports nothing (null)."""

from __future__ import annotations

import json
from typing import Any

from .metrics import KV_LOAD_FAILURE_REASONS, Metrics

__all__ = ["MARKER", "load_failure", "observe_transfer", "transfer_stats"]

MARKER = b'"pd_transfer"'  # present in a response (or SSE event) that carries a report


def transfer_stats(kv: Any) -> tuple[float | None, float | None]:
    """(bytes, seconds) our connector reports in the decode response's
    `kv_transfer_params.pd_transfer`; (None, None) for connectors that report nothing."""
    if not isinstance(kv, dict):
        return None, None
    t = kv.get("pd_transfer")
    if not isinstance(t, dict):
        return None, None
    b = t.get("bytes", t.get("kv_bytes"))
    s = t.get("seconds", t.get("transfer_s"))
    ms = t.get("ms")
    if s is None and isinstance(ms, (int, float)) and not isinstance(ms, bool):
        s = ms / 1000.0  # PdConnector reports {"bytes", "ms", "blocks", "backend", ...}
    if t.get("error"):
        return None, None
    b = float(b) if isinstance(b, (int, float)) and not isinstance(b, bool) and b >= 0 else None
    s = float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0 else None
    return b, s


def load_failure(kv: Any) -> str | None:
    """The reason the decode engine's KV load failed, from its response's
    `kv_transfer_params.pd_transfer.error` (PdConnector); None when it succeeded or the
    connector reports nothing (vLLM's stock NixlConnector answers null)."""
    if not isinstance(kv, dict):
        return None
    t = kv.get("pd_transfer")
    if not isinstance(t, dict):
        return None
    err = t.get("error")
    if not err:
        return None
    return err if isinstance(err, str) and err in KV_LOAD_FAILURE_REASONS else "other"


def observe_transfer(m: Metrics, payload: bytes) -> str | None:
    """Record the connector-reported transfer of one response body (or SSE event's data);
    the load-failure reason, if any."""
    if MARKER not in payload:
        return None
    try:
        kv = json.loads(payload).get("kv_transfer_params")
    except (ValueError, AttributeError, RecursionError):
        return None
    failed = load_failure(kv)
    if failed is not None:
        return failed
    b, s = transfer_stats(kv)
    if b is not None:
        m.kv_bytes.observe(b)
        m.kv_bytes_total.inc(b)
    if s is not None:
        m.kv_seconds.observe(s)
    if b is not None and s:
        m.kv_bps.observe(b / s)
    return None
