"""``pdbench e2e``: where a request's TTFT goes, from the metrics every hop exports.

Snapshots of the decode sidecar, the prefill sidecar and both engines' ``/metrics`` taken
around a request (sequential requests: exact per-request values, since each histogram
grew by one observation) or around the whole workload (means over the window). Sources:

* decode sidecar: ``pd_ttft_seconds`` (request in -> first byte out), ``pd_prefill_leg_seconds``
  (round trip to the prefill sidecar), ``pd_decode_leg_seconds`` (send to the local vLLM ->
  first byte), ``pd_sidecar_overhead_seconds{role="decode"}``
* prefill sidecar: ``pd_request_duration_seconds{role="prefill"}``
* each engine (vLLM 0.26 and 0.32 export the same names): ``vllm:time_to_first_token_seconds``
  (the API server's arrival -> first token), ``vllm:request_queue_time_seconds`` (queued ->
  first scheduled; on the decode engine this includes waiting for the KV, vLLM records no
  SCHEDULED event while a request is WAITING_FOR_REMOTE_KVS), ``vllm:request_prefill_time_seconds``
  (first scheduled -> first token: the compute), ``vllm:e2e_request_latency_seconds``.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from bench.e2e_metrics import scrape

# key -> (source, metric family, labels); values are seconds per request
SERIES: dict[str, tuple[str, str, dict[str, str]]] = {
    "sc_ttft": ("decode_sidecar", "pd_ttft_seconds", {}),
    "sc_prefill_leg": ("decode_sidecar", "pd_prefill_leg_seconds", {}),
    "sc_decode_leg": ("decode_sidecar", "pd_decode_leg_seconds", {}),
    "sc_overhead": ("decode_sidecar", "pd_sidecar_overhead_seconds", {"role": "decode"}),
    "psc_request": ("prefill_sidecar", "pd_request_duration_seconds", {"role": "prefill"}),
    "p_ttft": ("prefill_engine", "vllm:time_to_first_token_seconds", {}),
    "p_queue": ("prefill_engine", "vllm:request_queue_time_seconds", {}),
    "p_compute": ("prefill_engine", "vllm:request_prefill_time_seconds", {}),
    "p_e2e": ("prefill_engine", "vllm:e2e_request_latency_seconds", {}),
    "d_ttft": ("decode_engine", "vllm:time_to_first_token_seconds", {}),
    "d_queue": ("decode_engine", "vllm:request_queue_time_seconds", {}),
    "d_compute": ("decode_engine", "vllm:request_prefill_time_seconds", {}),
    "d_e2e": ("decode_engine", "vllm:e2e_request_latency_seconds", {}),
}


def sources(target: Any) -> dict[str, str | None]:
    """The URLs to scrape for `target` (a bench.e2e_targets.Target); agg: its one engine;
    agg-sc: its sidecar and the engine behind it."""
    if target.sidecar_url is None and target.engine_kv_url is None:
        return {"decode_engine": target.url}
    return {"decode_sidecar": target.sidecar_url, "prefill_sidecar": target.prefill_sidecar_url,
            "decode_engine": target.engine_kv_url or getattr(target, "engine_url", None),
            "prefill_engine": getattr(target, "prefill_engine_url", None)}


def snapshot(srcs: dict[str, str | None]) -> dict[str, dict | None]:
    return {name: scrape(url) for name, url in srcs.items() if url}


def _hist(snap: dict | None, family: str, labels: dict[str, str], part: str) -> float:
    if not snap:
        return 0.0
    name = f"{family}_{part}"
    return sum(v for (n, ls), v in snap.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def delta(before: dict[str, dict | None], after: dict[str, dict | None]) -> dict[str, dict[str, float]]:
    """key -> {"sum", "count"} grown between two snapshots (keys whose source was unreadable are left out).
    ``sc_first_token``: the share of the window's requests whose first token the decode
    sidecar took from the prefill leg (``--first-token-from-prefill``)."""
    out = {}
    for key, (src, fam, labels) in SERIES.items():
        if before.get(src) is None or after.get(src) is None:
            continue
        out[key] = {p: _hist(after[src], fam, labels, p) - _hist(before[src], fam, labels, p) for p in ("sum", "count")}
    if "sc_ttft" in out:
        b, a = before["decode_sidecar"], after["decode_sidecar"]
        ft = _hist(a, "pd_first_token_from_prefill", {}, "total") - \
            _hist(b, "pd_first_token_from_prefill", {}, "total")
        out["sc_first_token"] = {"sum": ft, "count": out["sc_ttft"]["count"]}
    return out


def means(d: dict[str, dict[str, float]]) -> dict[str, float]:
    """key -> mean seconds per observation (only keys observed in the window)."""
    return {k: v["sum"] / v["count"] for k, v in d.items() if v["count"] > 0}


async def settled_snapshot(srcs: dict[str, str | None], before: dict[str, dict | None],
                           tries: int = 20) -> dict[str, dict | None]:
    """A snapshot once the decode-side engine has published the finished request's stats
    (its e2e histogram grew), or after `tries` x 50 ms."""
    after = await asyncio.to_thread(snapshot, srcs)
    for _ in range(tries):
        if delta(before, after).get("d_e2e", {}).get("count", 1) >= 1:
            break
        await asyncio.sleep(0.05)
        after = await asyncio.to_thread(snapshot, srcs)
    return after


def derived(b: dict[str, float], push: bool, client_ttft: float | None) -> dict[str, float]:
    """The gaps between the measured pieces (seconds): prefill hops (prefill leg minus the
    prefill engine's own e2e), decode hop (decode leg minus the decode engine's TTFT), and
    the rest of the client's TTFT (client <-> decode sidecar and the sidecar itself)."""
    out: dict[str, float] = {}
    if "sc_prefill_leg" in b and "p_e2e" in b:
        out["pre_hops"] = b["sc_prefill_leg"] - b["p_e2e"]
    if "sc_decode_leg" in b and "d_ttft" in b:
        out["dec_hop"] = b["sc_decode_leg"] - b["d_ttft"]
    if client_ttft is not None:
        if "sc_decode_leg" in b:
            # a first token taken from the prefill leg leaves the decode leg off the TTFT path
            on_path = 1.0 - min(1.0, b.get("sc_first_token", 0.0))
            legs = b["sc_decode_leg"] * on_path + (0.0 if push else b.get("sc_prefill_leg", 0.0))
            out["rest"] = client_ttft - legs
        elif "d_ttft" in b:
            out["rest"] = client_ttft - b["d_ttft"]
    return out


def medians(recs: list[dict[str, Any]]) -> dict[str, float]:
    """key -> median over the requests that carry a per-request breakdown."""
    keys = sorted({k for r in recs for k in (r.get("breakdown") or {})})
    return {k: statistics.median(r["breakdown"][k] for r in recs if k in (r.get("breakdown") or {})) for k in keys}


# column -> breakdown key (ms in the table)
COLUMNS = (
    ("pre leg", "sc_prefill_leg"), ("P e2e", "p_e2e"), ("P queue", "p_queue"), ("P compute", "p_compute"),
    ("P other", "p_other"), ("pre hops", "pre_hops"), ("dec leg", "sc_decode_leg"), ("D TTFT", "d_ttft"),
    ("D queue", "d_queue"), ("D compute", "d_compute"), ("D other", "d_other"), ("KV", "kv"), ("dec hop", "dec_hop"),
    ("rest", "rest"),
)
LEGEND = """\
  TTFT      client's TTFT (bench)          pre leg   decode sidecar -> prefill sidecar -> prefill engine -> back
  P e2e     prefill engine: arrival -> done  P queue/P compute: its queue time / its prefill compute (vLLM metrics)
  pre hops  pre leg - P e2e (both sidecars, HTTP, the prefill engine's API server)
  dec leg   decode sidecar: send -> first byte from the decode engine
  D TTFT    decode engine: arrival -> first token; D queue: queued -> scheduled (includes waiting for the KV);
            D compute: scheduled -> first token; for agg the D columns are the one engine
  P/D other P e2e - queue - compute, D TTFT - queue - compute: the engine's API server (tokenizing, the
            hand-off to the engine core and back) outside the scheduler's clock
  KV        in-engine KV transfer per request (decode engine's connector metrics; pd-stock-push: the prefill
            engine's; † our push: KV tail only)
  dec hop   dec leg - D TTFT (HTTP to the decode engine, its API server, first byte out)
  rest      TTFT - legs (pull: both legs; push: the decode leg; agg: the engine's TTFT): client <-> decode
            sidecar and the sidecar itself; a request whose first token came from the prefill leg
            (--first-token-from-prefill) counts the prefill leg only"""


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _with_other(vals: dict[str, Any]) -> dict[str, Any]:
    """Adds p_other / d_other: the engine's time outside its queue and compute."""
    out = dict(vals)
    for side, total in (("p", "p_e2e"), ("d", "d_ttft")):
        parts = [out.get(total), out.get(f"{side}_queue"), out.get(f"{side}_compute")]
        if all(x is not None for x in parts):
            out[f"{side}_other"] = parts[0] - parts[1] - parts[2]
    return out


def format_breakdown(cfgs: dict[str, dict[str, Any]], has_numbers: Any, is_push: Any) -> str | None:
    """'Where TTFT goes': per configuration the workload means and the sweep's per-length medians."""
    rows = []
    for name, c in cfgs.items():
        if not has_numbers(c):
            continue
        push = is_push(name, c)
        mark = "†" if push else ""
        b = c.get("breakdown_mean")
        if b:
            kv = (c.get("kv") or {}).get("seconds_per_request")
            vals = _with_other({**b, "kv": kv})
            rows.append([name, "load mean", _ms(c["summary"]["ttft_s"]["mean"])]
                        + [_ms(vals.get(k)) + (mark if k == "kv" and vals.get(k) is not None else "") for _, k in COLUMNS])
        bm = c.get("breakdown_median")
        if bm:
            ttfts = sorted(r["ttft_s"] for r in c.get("requests", []) if r.get("breakdown"))
            vals = _with_other({**bm, "kv": statistics.median(
                [r["kv_seconds"] for r in c.get("requests", []) if r.get("kv_seconds")] or [None])})
            rows.append([name, "load p50", _ms(statistics.median(ttfts) if ttfts else None)]
                        + [_ms(vals.get(k)) + (mark if k == "kv" and vals.get(k) is not None else "") for _, k in COLUMNS])
        for p in (c.get("sweep") or {}).get("points", []):
            bm = p.get("breakdown_median")
            if not bm:
                continue
            vals = _with_other({**bm, "kv": p.get("kv_seconds_median")})
            rows.append([name, f"{p['tokens']} tok p50", _ms(p["ttft_s_median"])]
                        + [_ms(vals.get(k)) + (mark if k == "kv" and vals.get(k) is not None else "") for _, k in COLUMNS])
    if not rows:
        return None
    headers = ["config", "requests", "TTFT"] + [h for h, _ in COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(x.rjust(w) if i > 1 else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = ["\nWhere TTFT goes (ms; 'load mean' = means over the workload from histogram deltas; 'load p50' "
             "(--concurrency 1) and 'N tok p50' = medians of per-request values, one request at a time)",
             fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows), LEGEND]
    return "\n".join(lines)
