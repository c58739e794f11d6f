"""Prometheus metrics of the sidecar (`pd_*`, own registry, base units, bounded labels).

Label values are closed sets defined here (`PATHS`, `APIS`, ...) or in proxy.errors (the reason
enums behind `FALLBACK_REASONS`, `PEER_ERROR_REASONS`);
the only open-ended label is `peer`, which takes only allowlisted/configured peers.
docs/sidecar.md documents every family; keep the two in sync.

With `--workers N > 1` every worker process runs in prometheus_client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor before this module is imported):
counters and histograms add up over all workers, gauges aggregate per their
`multiprocess_mode`, and `render()` serves the aggregate (`render_multiprocess`).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .errors import FallbackReason, PeerErrorReason

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "PATHS", "APIS", "PEER_ERROR_REASONS", "LOCAL_REASONS",
           "MULTIPROC_ENV", "render_multiprocess", "KV_LOAD_FAILURE_REASONS"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# recompute: sent disaggregated, but the decode engine reported that the KV load failed
# and it computed the prompt itself (never counted as disagg)
PATHS = ("disagg", "recompute", "local", "fallback", "error")
APIS = ("completions", "chat")
# why a request ran locally (path=local) or fell back (path=fallback)
LOCAL_REASONS = ("threshold", "no_peer", "unsupported", "disabled")
FALLBACK_REASONS = tuple(r.value for r in FallbackReason)
PEER_ERROR_REASONS = tuple(r.value for r in PeerErrorReason)
# why the decode engine's KV load failed (PdConnector's pd_transfer.error; other = unknown label)
KV_LOAD_FAILURE_REASONS = ("bad_params", "foreign_host", "expired", "mismatch", "unreachable", "unknown_engine",
                           "block_range", "transfer_failed", "timeout", "aborted", "other")
AUTH_FAILURE_REASONS = ("missing", "bad_signature", "stale", "peer_not_allowed", "source_mismatch")

# latency buckets: 0.5 ms .. 120 s
_LAT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
        10.0, 30.0, 60.0, 120.0)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_BYTES = tuple(float(2 ** k) for k in range(10, 37, 2))  # 1 KiB .. 64 GiB
_BPS = tuple(x * 1e9 for x in (0.01, 0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 200, 400))


def render_multiprocess(path: str | None = None) -> bytes:
    """/metrics body aggregated over every process writing to `path` (default: the env's dir)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    r = CollectorRegistry()
    MultiProcessCollector(r, path=path or os.environ[MULTIPROC_ENV])
    return generate_latest(r)


class Metrics:
    """All metric families of one sidecar; `render()` is the /metrics body.

    `multiprocess=True` (a `--workers` worker): `render()` aggregates all workers. Gauge
    modes: in-flight and pending sums over live workers, ages and draining their max."""

    def __init__(self, role: str, registry: CollectorRegistry | None = None, multiprocess: bool = False):
        self.role = role
        self.multiprocess = multiprocess
        if multiprocess and not os.environ.get(MULTIPROC_ENV):
            raise RuntimeError(f"multiprocess metrics need {MULTIPROC_ENV} set before prometheus_client is imported")
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.info = Gauge("pd_info", "Constant 1; labels describe this sidecar.", ["role", "protocol", "version"],
                          registry=r, multiprocess_mode="max")
        self.requests = Counter("pd_requests", "Requests answered, by API and path (disagg = KV loaded from the prefill peer; "
                                "recompute|local|fallback|error).",
                                ["role", "api", "path"], registry=r)
        self.local_decisions = Counter("pd_local_decisions",
                                       "Decode: requests served aggregated on purpose, by reason.",
                                       ["reason"], registry=r)
        self.fallbacks = Counter("pd_fallbacks", "Decode: requests recomputed locally after a prefill failure, by reason.",
                                 ["reason"], registry=r)
        self.kv_load_failures = Counter(
            "pd_kv_load_failures", "Decode: disaggregated requests whose KV load failed in the decode engine "
            "(it recomputed the prompt; path=recompute), by the connector's reason.", ["reason"], registry=r)
        self.ttft = Histogram("pd_ttft_seconds",
                              "Decode: true time to first token (request received -> first response byte), by path.",
                              ["path"], buckets=_LAT, registry=r)
        self.request_seconds = Histogram("pd_request_duration_seconds", "Whole request, by role and path.",
                                         ["role", "path"], buckets=_LAT, registry=r)
        self.prefill_leg = Histogram("pd_prefill_leg_seconds", "Decode: prefill leg round trip (successful legs).",
                                     buckets=_LAT, registry=r)
        self.decode_leg = Histogram("pd_decode_leg_seconds",
                                    "Decode: decode leg, request sent -> first response byte (includes KV pull).",
                                    ["path"], buckets=_LAT, registry=r)
        self.overhead = Histogram("pd_sidecar_overhead_seconds",
                                  "Time to first byte spent in this sidecar itself (TTFT minus upstream legs).",
                                  ["role"], buckets=_OVERHEAD, registry=r)
        self.kv_bytes = Histogram("pd_kv_transfer_bytes", "Decode: KV bytes moved per request (connector-reported).",
                                  buckets=_BYTES, registry=r)
        self.kv_seconds = Histogram("pd_kv_transfer_seconds", "Decode: KV transfer time per request (connector-reported).",
                                    buckets=_LAT, registry=r)
        self.kv_bps = Histogram("pd_kv_transfer_bytes_per_second", "Decode: KV transfer throughput per request.",
                                buckets=_BPS, registry=r)
        self.kv_bytes_total = Counter("pd_kv_transferred_bytes", "Decode: total KV bytes moved (connector-reported).",
                                      registry=r)
        self.pending_requests = Gauge("pd_pending_kv_requests",
                                      "KV handed out and not yet picked up (prefill) / legs outstanding (decode), per peer.",
                                      ["peer"], registry=r, multiprocess_mode="livesum")
        self.pending_tokens = Gauge("pd_pending_kv_tokens", "Prompt tokens of pending KV, per peer.", ["peer"],
                                    registry=r, multiprocess_mode="livesum")
        self.pending_blocks = Gauge("pd_pending_kv_blocks", "Prefill: KV blocks handed out and not yet picked up, per peer.",
                                    ["peer"], registry=r, multiprocess_mode="livesum")
        self.pending_bytes = Gauge("pd_pending_kv_bytes", "Prefill: KV bytes handed out and not yet picked up "
                                   "(when the connector reports sizes), per peer.", ["peer"], registry=r,
                                   multiprocess_mode="livesum")
        self.pending_age = Gauge("pd_pending_kv_oldest_age_seconds", "Prefill: age of the oldest pending KV, per peer.",
                                 ["peer"], registry=r, multiprocess_mode="livemax")
        self.kv_expired = Counter("pd_kv_expired", "Prefill: pending KV forgotten without pickup once the prefill engine's KV lease ended.",
                                  registry=r)
        self.kv_released = Counter("pd_kv_released", "Prefill: pending KV closed by a decode sidecar's report, by status.",
                                   ["status"], registry=r)
        self.peer_errors = Counter("pd_peer_errors", "Errors talking to a peer sidecar, by peer and reason.",
                                   ["peer", "reason"], registry=r)
        self.auth_failures = Counter("pd_auth_failures", "Prefill: rejected peer requests, by reason.", ["reason"],
                                     registry=r)
        self.retries = Counter("pd_prefill_retries", "Decode: prefill legs retried on another peer (connect errors only).",
                               registry=r)
        self.upstream_errors = Counter("pd_upstream_errors", "Errors talking to the local vLLM, by reason.", ["reason"],
                                       registry=r)
        self.in_flight = Gauge("pd_in_flight_requests", "Requests being served now.", ["role"], registry=r,
                               multiprocess_mode="livesum")
        self.client_disconnects = Counter("pd_client_disconnects", "Requests whose client went away, by stage.",
                                          ["stage"], registry=r)
        self.rejected = Counter("pd_rejected_requests", "Requests refused before any upstream call, by reason.",
                                ["reason"], registry=r)
        self.draining = Gauge("pd_draining", "1 while draining after SIGTERM.", registry=r,
                              multiprocess_mode="livemax")
        self.token_reuse = Counter("pd_token_id_reuse", "Decode: decode legs sent the prefill leg's prompt token ids.",
                                   ["api"], registry=r)
        self.first_token = Counter("pd_first_token_from_prefill", "Decode: streaming requests whose first token "
                                   "was sent from the prefill leg's answer.", ["api"], registry=r)
        self.first_token_skipped = Counter("pd_first_token_skipped", "Decode: streaming P/D requests served the "
                                           "normal way although --first-token-from-prefill is on, by reason.",
                                           ["reason"], registry=r)
        self.first_token_ids_wait = Histogram("pd_first_token_ids_wait_seconds", "Decode: how long a request "
                                              "whose first token could come from the prefill leg waited, after "
                                              "the prefill answer, for the local /tokenize (--first-token-ids local).",
                                              buckets=_OVERHEAD, registry=r)

    def render(self) -> bytes:
        return render_multiprocess() if self.multiprocess else generate_latest(self.registry)
