"""The decode role's per-request records: `PdRequest` (one client request, from arrival to
its last byte) and `PrefillResult` (the KV a prefill leg left on a peer)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .endpoints import Endpoint

__all__ = ["PdRequest", "PrefillResult", "leg_request_id"]

LEG_RID_PREFIX_MAX = 88  # + "-pd-" + 32 hex = 124 <= the 128 a prefill sidecar accepts


def leg_request_id(client_rid: str) -> str:
    """A fresh id for one prefill (or push) leg that still names the client's request:
    ``<client x-request-id, first 88 chars>-pd-<uuid4 hex>``. Both engines see it (vLLM's
    NixlPushConnector pairs prefill and decode by request id), so their logs and the
    response `id` carry the client's id; unique per leg, so a retried leg never collides."""
    return f"{client_rid[:LEG_RID_PREFIX_MAX]}-pd-{uuid.uuid4().hex}"


@dataclass
class PdRequest:
    """One client request on the decode role; what its log line and metrics report."""

    http: web.Request
    api: str  # "completions" | "chat"
    rid: str  # x-request-id (the client's if well-formed, else a fresh one)
    t0: float  # perf_counter() at arrival
    path: str = "error"  # x-pd-path and the `path` label (proxy.metrics.PATHS)
    status: int = 0  # HTTP status answered (499: the client left)
    peer: str | None = None  # the prefill peer of a disaggregated request
    # the client's bytes, forwarded untouched when served locally (None once re-serialized:
    # a transfer field or a duplicate key was there)
    raw: bytes | None = None


@dataclass
class PrefillResult:
    """KV computed on `peer` for this request and not yet handed back (proxy.release)."""

    peer: Endpoint
    request_id: str  # the prefill leg's id (the peer's pending-KV key)
    kv_params: dict[str, Any]
    ids: list[int] | None  # prompt token ids, only from a signed answer
    seconds: float  # the prefill leg's round trip
    tokens: int  # prompt tokens (the answer's usage, else the estimate)
    settled: bool = False  # handed back (picked up / released / aborted): exactly once
    answer: dict[str, Any] | None = None  # the answer, when signed
