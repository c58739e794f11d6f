"""PdConnector stats through vLLM's connector-stats mechanism, and /metrics families.

Prometheus names (prefix ``pd_connector_``):
  pd_connector_bytes_transferred_total   counter   KV bytes read/written by this engine
  pd_connector_transfers_total           counter   completed transfers (one per request per rank)
  pd_connector_transfer_seconds          histogram post -> completion seen per transfer
                                                   (NIXL's xferDuration span, as stock's
                                                   vllm:nixl_xfer_time_seconds)
  pd_connector_transfer_bytes            histogram bytes per transfer
  pd_connector_transfer_gbps             histogram throughput per transfer (GB/s)
  pd_connector_failures_total{reason}    counter   failed loads by reason
  pd_connector_expired_blocks_total      counter   prefill blocks freed unread (lease expired)
  pd_connector_expired_requests_total    counter   prefill requests whose lease expired
  pd_connector_lease_renewals_total      counter   prefill leases renewed by a waiting decode
  pd_connector_push_write_grants_total{result} counter decode: push write grants asked by a
                                                   prefill, granted or refused (the push
                                                   was not awaited any more)
  pd_connector_blocks_pending_pickup     gauge     prefill blocks held for a decode to read
  pd_connector_requests_pending_pickup   gauge     prefill requests held for a decode to read
  pd_connector_recv_blocks_inflight      gauge     decode blocks waiting for their READ
  pd_connector_control_refused_total{reason} counter control-plane calls refused
                                                   (missing, malformed, stale, replayed,
                                                   bad_signature: transfer.control_auth)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics, KVConnectorStats)
except Exception:  # pragma: no cover - unit tests without vLLM
    @dataclass
    class KVConnectorStats:  # type: ignore[no-redef]
        data: dict[str, Any] = field(default_factory=dict)

    class KVConnectorPromMetrics:  # type: ignore[no-redef]
        pass

_GAUGES = ("pending_blocks", "pending_reqs", "recv_inflight_blocks")


def _empty() -> dict[str, Any]:
    return {"xfer_s": [], "bytes": [], "descs": [], "failures": {}, "control_refused": {},
            "expired_blocks": 0, "expired_reqs": 0, "renewals": 0, "push_grants": {},
            "pending_blocks": None, "pending_reqs": None, "recv_inflight_blocks": None}


@dataclass
class PdConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        base = _empty()
        base.update(self.data or {})
        self.data = base

    def reset(self) -> None:
        self.data = _empty()

    def record_transfer(self, nbytes: int, seconds: float, descs: int) -> None:
        self.data["bytes"].append(int(nbytes))
        self.data["xfer_s"].append(float(seconds))
        self.data["descs"].append(int(descs))

    def record_failure(self, reason: str) -> None:
        f = self.data["failures"]
        f[reason] = f.get(reason, 0) + 1

    def record_control_refused(self, reason: str, n: int = 1) -> None:
        r = self.data["control_refused"]
        r[reason] = r.get(reason, 0) + int(n)

    def record_expired(self, nblocks: int) -> None:
        self.data["expired_blocks"] += int(nblocks)
        self.data["expired_reqs"] += 1

    def record_renewals(self, n: int) -> None:
        self.data["renewals"] = self.data.get("renewals", 0) + int(n)

    def record_push_grants(self, granted: int, refused: int) -> None:
        g = self.data.setdefault("push_grants", {})
        for result, n in (("granted", granted), ("refused", refused)):
            if n:
                g[result] = g.get(result, 0) + int(n)

    def set_gauge(self, name: str, value: int) -> None:
        assert name in _GAUGES
        self.data[name] = int(value)

    def aggregate(self, other: "KVConnectorStats") -> "PdConnectorStats":
        o = other.data
        d = self.data
        for k in ("xfer_s", "bytes", "descs"):
            d[k] = list(d[k]) + list(o.get(k, []))
        for r, n in (o.get("failures") or {}).items():
            d["failures"][r] = d["failures"].get(r, 0) + n
        for r, n in (o.get("control_refused") or {}).items():
            d["control_refused"][r] = d["control_refused"].get(r, 0) + n
        d["expired_blocks"] += o.get("expired_blocks", 0)
        d["expired_reqs"] += o.get("expired_reqs", 0)
        d["renewals"] = d.get("renewals", 0) + o.get("renewals", 0)
        g = d.setdefault("push_grants", {})
        for r, n in (o.get("push_grants") or {}).items():
            g[r] = g.get(r, 0) + n
        for g in _GAUGES:
            if o.get(g) is not None:
                d[g] = o[g]  # latest wins (gauges come from the scheduler only)
        return self

    def is_empty(self) -> bool:
        d = self.data
        return (not d["xfer_s"] and not d["failures"] and not d["expired_blocks"]
                and not d.get("renewals") and not d.get("push_grants")
                and not d.get("control_refused")
                and all(d.get(g) is None for g in _GAUGES))

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        n = len(d["xfer_s"])
        tot_b = sum(d["bytes"])
        tot_s = sum(d["xfer_s"])
        xs = sorted(d["xfer_s"])
        return {
            "Num transfers": n,
            "Avg xfer time (ms)": round(1e3 * tot_s / n, 3) if n else 0.0,
            "P90 xfer time (ms)": round(1e3 * xs[int(0.9 * (n - 1))], 3) if n else 0.0,
            "Avg MB per transfer": round(tot_b / n / 1e6, 3) if n else 0.0,
            "Throughput (GB/s)": round(tot_b / tot_s / 1e9, 3) if tot_s else 0.0,
            "Num failures": sum(d["failures"].values()),
            "Expired blocks": d["expired_blocks"],
            "Refused control calls": sum((d.get("control_refused") or {}).values()),
        }


class PdPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        from vllm.v1.metrics.utils import create_metric_per_engine as per_engine
        H, C, G = self._histogram_cls, self._counter_cls, self._gauge_cls
        pe = self.per_engine_labelvalues
        self.bytes = per_engine(C(name="pd_connector_bytes_transferred",
                                  documentation="KV bytes moved by the PdConnector.",
                                  labelnames=labelnames), pe)
        self.transfers = per_engine(C(name="pd_connector_transfers",
                                      documentation="Completed PdConnector KV transfers.",
                                      labelnames=labelnames), pe)
        self.xfer_s = per_engine(H(
            name="pd_connector_transfer_seconds",
            documentation="PdConnector KV transfer time (submit to completion).",
            buckets=[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 5.0], labelnames=labelnames), pe)
        self.xfer_bytes = per_engine(H(
            name="pd_connector_transfer_bytes",
            documentation="PdConnector KV bytes per transfer.",
            buckets=[2 ** (10 + i) for i in range(1, 25, 2)], labelnames=labelnames), pe)
        self.gbps = per_engine(H(
            name="pd_connector_transfer_gbps",
            documentation="PdConnector KV transfer throughput per transfer (GB/s).",
            buckets=[0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 400, 1000],
            labelnames=labelnames), pe)
        self._fail = C(name="pd_connector_failures",
                       documentation="PdConnector failed KV loads by reason.",
                       labelnames=labelnames + ["reason"])
        self._refused = C(name="pd_connector_control_refused",
                          documentation="Control-plane calls refused (unauthenticated, "
                                        "forged, stale or replayed), by reason.",
                          labelnames=labelnames + ["reason"])
        self.expired_blocks = per_engine(C(
            name="pd_connector_expired_blocks",
            documentation="Prefill KV blocks freed unread after their lease expired.",
            labelnames=labelnames), pe)
        self.renewals = per_engine(C(
            name="pd_connector_lease_renewals",
            documentation="Prefill KV leases renewed by a decode engine whose request waits.",
            labelnames=labelnames), pe)
        self._grants = C(name="pd_connector_push_write_grants",
                         documentation="Push write grants a prefill engine asked of this "
                                       "decode engine, by result (granted, refused).",
                         labelnames=labelnames + ["result"])
        self.expired_reqs = per_engine(C(
            name="pd_connector_expired_requests",
            documentation="Prefill requests whose KV lease expired unread.",
            labelnames=labelnames), pe)
        self.gauges = {
            "pending_blocks": per_engine(G(
                name="pd_connector_blocks_pending_pickup",
                documentation="Prefill KV blocks held for a decode engine to read.",
                labelnames=labelnames, multiprocess_mode="mostrecent"), pe),
            "pending_reqs": per_engine(G(
                name="pd_connector_requests_pending_pickup",
                documentation="Prefill requests whose KV is held for a decode engine.",
                labelnames=labelnames, multiprocess_mode="mostrecent"), pe),
            "recv_inflight_blocks": per_engine(G(
                name="pd_connector_recv_blocks_inflight",
                documentation="Decode KV blocks waiting for their transfer.",
                labelnames=labelnames, multiprocess_mode="mostrecent"), pe),
        }
        # pre-create reason children so the family is visible at 0
        from ..control_auth import REFUSAL_REASONS
        from ..errors import FailureReason
        for idx, lv in pe.items():
            for r in FailureReason:
                self._fail.labels(*lv, r)
            for r in REFUSAL_REASONS:
                self._refused.labels(*lv, r)
            for r in ("granted", "refused"):
                self._grants.labels(*lv, r)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = transfer_stats_data
        xs, bs = d.get("xfer_s", []), d.get("bytes", [])
        for s, b in zip(xs, bs):
            self.xfer_s[engine_idx].observe(s)
            self.xfer_bytes[engine_idx].observe(b)
            if s > 0:
                self.gbps[engine_idx].observe(b / s / 1e9)
        if bs:
            self.bytes[engine_idx].inc(sum(bs))
            self.transfers[engine_idx].inc(len(bs))
        lv = self.per_engine_labelvalues[engine_idx]
        for r, n in (d.get("failures") or {}).items():
            self._fail.labels(*lv, r).inc(n)
        for r, n in (d.get("control_refused") or {}).items():
            self._refused.labels(*lv, r).inc(n)
        if d.get("expired_blocks"):
            self.expired_blocks[engine_idx].inc(d["expired_blocks"])
        if d.get("expired_reqs"):
            self.expired_reqs[engine_idx].inc(d["expired_reqs"])
        if d.get("renewals"):
            self.renewals[engine_idx].inc(d["renewals"])
        for r, n in (d.get("push_grants") or {}).items():
            self._grants.labels(*lv, r).inc(n)
        for g, m in self.gauges.items():
            if d.get(g) is not None:
                m[engine_idx].set(d[g])
