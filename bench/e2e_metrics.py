"""``pdbench e2e``: Prometheus scrapes of the sidecar and the decode engine, and the
deltas (requests by path, leg times, KV bytes and seconds) around a run."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any


def scrape(url: str | None) -> dict[tuple[str, tuple], float] | None:
    if not url:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _series(snap: dict | None, name: str, **labels: str) -> float:
    if not snap:
        return 0.0
    return sum(v for (n, ls), v in snap.items()
               if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))


def sidecar_delta(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None

    def hist(name: str, **labels: str) -> dict[str, float]:
        return {k: _series(after, f"{name}_{k}", **labels) - _series(before, f"{name}_{k}", **labels)
                for k in ("sum", "count")}

    paths = {}
    for p in ("disagg", "local", "fallback", "error"):
        n = _series(after, "pd_requests_total", path=p) - _series(before, "pd_requests_total", path=p)
        if n:
            paths[p] = n
    return {
        "requests_by_path": paths,
        "ttft_disagg": hist("pd_ttft_seconds", path="disagg"),
        "prefill_leg": hist("pd_prefill_leg_seconds"),
        "decode_leg_disagg": hist("pd_decode_leg_seconds", path="disagg"),
        "overhead_decode": hist("pd_sidecar_overhead_seconds", role="decode"),
        "kv_bytes": hist("pd_kv_transfer_bytes"),
        "kv_seconds": hist("pd_kv_transfer_seconds"),
    }


def kv_figures(url: str | None) -> dict[str, float] | None:
    """KV bytes/seconds/transfers totals on the decode engine's /metrics (None when unreadable)."""
    if not url:
        return None
    from pdsidecar.dev.local import read_kv_figures

    try:
        k = read_kv_figures(url)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    out = {"bytes": k.bytes, "seconds": k.seconds, "transfers": k.transfers}
    if k.transfers and not k.bytes:
        # PdConnector exports its byte count as a counter (pd_connector_bytes_transferred_total),
        # which read_kv_figures does not read (yet): take it from there.
        snap = scrape(url)
        out["bytes"] = _series(snap, "pd_connector_bytes_transferred_total")
    return out


async def settled_kv(url: str | None, tries: int = 20) -> dict[str, float] | None:
    """KV figures once two reads 50 ms apart agree (the engine publishes stats with a lag)."""
    prev = await asyncio.to_thread(kv_figures, url)
    for _ in range(tries):
        if prev is None:
            return None
        await asyncio.sleep(0.05)
        cur = await asyncio.to_thread(kv_figures, url)
        if cur == prev:
            return cur
        prev = cur
    return prev


def kv_sub(a: dict | None, b: dict | None) -> dict[str, float] | None:
    if a is None or b is None:
        return None
    return {k: a[k] - b[k] for k in a}
