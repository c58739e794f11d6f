"""Statistics, ratios, fits and terminal tables for ``pdbench e2e``."""

from __future__ import annotations

import math
from typing import Any

PCTS = (50, 90, 99)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def dist_stats(values: list[float]) -> dict[str, Any]:
    """n, mean, p50/p90/p99, max of `values` (seconds stay seconds)."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    d: dict[str, Any] = {"n": len(values), "mean": sum(values) / len(values)}
    for q in PCTS:
        d[f"p{q}"] = pct(values, q)
    d["max"] = max(values)
    return d


def linfit(xs: list[float], ys: list[float]) -> dict[str, Any] | None:
    """Least-squares line y = slope*x + intercept (numpy.polyfit) with R²; None if < 2 distinct x."""
    import numpy as np

    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "n": len(xs)}


def summarize(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Per-configuration summary of the measured (non-warm-up, non-sweep) requests."""
    ok = [r for r in records if r.get("error") is None]
    out: dict[str, Any] = {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
                           "wall_s": wall_s}
    out_tokens = sum(r["output_tokens"] for r in ok)
    out["throughput_req_s"] = len(ok) / wall_s if wall_s > 0 else None
    out["throughput_out_tok_s"] = out_tokens / wall_s if wall_s > 0 else None
    out["output_tokens"] = out_tokens
    out["prompt_tokens"] = sum(r["prompt_tokens"] for r in ok)
    out["ttft_s"] = dist_stats([r["ttft_s"] for r in ok])
    out["e2e_s"] = dist_stats([r["e2e_s"] for r in ok])
    out["tpot_s"] = dist_stats([r["tpot_s"] for r in ok if r.get("tpot_s") is not None])
    out["itl_s"] = dist_stats([x for r in ok for x in r.get("itl_s", [])])
    classes = sorted({r["cls"] for r in ok})
    if len(classes) > 1 or (classes and classes[0] in ("short", "long")):
        out["by_class"] = {}
        for c in classes:
            rs = [r for r in ok if r["cls"] == c]
            out["by_class"][c] = {
                "n": len(rs),
                "ttft_s": dist_stats([r["ttft_s"] for r in rs]),
                "itl_s": dist_stats([x for r in rs for x in r.get("itl_s", [])]),
                "tpot_s": dist_stats([r["tpot_s"] for r in rs if r.get("tpot_s") is not None]),
                "e2e_s": dist_stats([r["e2e_s"] for r in rs]),
            }
    paths: dict[str, int] = {}
    for r in ok:
        paths[r.get("path") or "direct"] = paths.get(r.get("path") or "direct", 0) + 1
    out["paths"] = paths
    return out


def _get(d: dict[str, Any], path: str) -> float | None:
    cur: Any = d
    for k in path.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur if isinstance(cur, (int, float)) and not isinstance(cur, bool) else None


# metric path -> label; ratios are config / reference (< 1 is better for latencies, > 1 for throughput)
RATIO_KEYS = (
    ("by_class.short.ttft_s.p50", "TTFT p50 (short)"),
    ("by_class.long.ttft_s.p50", "TTFT p50 (long)"),
    ("ttft_s.p50", "TTFT p50 (all)"),
    ("ttft_s.p99", "TTFT p99 (all)"),
    ("by_class.short.itl_s.p50", "ITL p50 (short)"),
    ("by_class.short.itl_s.p99", "ITL p99 (short)"),
    ("itl_s.p99", "ITL p99 (all)"),
    ("tpot_s.p50", "TPOT p50"),
    ("tpot_s.p99", "TPOT p99"),
    ("e2e_s.p50", "E2E p50"),
    ("e2e_s.p99", "E2E p99"),
    ("throughput_req_s", "req/s"),
    ("throughput_out_tok_s", "out tok/s"),
)


def ratios(summary: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, float] | None:
    if ref is None:
        return None
    out = {}
    for key, _label in RATIO_KEYS:
        a, b = _get(summary, key), _get(ref, key)
        if a is not None and b:
            out[key] = a / b
    return out


PUSH_NOTE = ("† push: the WRITEs run layer by layer during the prefill engine's forward pass; the decode "
             "engine's figure is only the wait left after the last layer (KV tail), not a transfer time, "
             "so no GB/s is computed from it")


def layerwise_push(name: str) -> bool:
    """Our push mode (pd-ours-push, pd-ours-pods-push): the sidecar sends both legs at once
    and the prefill engine WRITEs layer by layer. vLLM's NixlPushConnector (pd-stock-push)
    WRITEs once the prefill has finished, after the prefill leg: its time is a transfer time."""
    return name.startswith("pd-ours") and name.endswith("-push")


def is_push(name: str, c: dict[str, Any]) -> bool:
    """The configuration's KV figure is our push's KV tail (PUSH_NOTE)."""
    return bool(c.get("push")) if "push" in c else layerwise_push(name)


def kv_summary(kv_delta: dict[str, float] | None, sidecar: dict[str, Any] | None, n_ok: int,
               push: bool = False) -> dict[str, Any]:
    """KV bytes/time per request and the decode leg's time not spent moving bytes. With
    `push` the time is the KV tail (see PUSH_NOTE): no GB/s."""
    out: dict[str, Any] = {"source": None}
    if kv_delta and kv_delta.get("transfers", 0) > 0:
        b, s, t = kv_delta["bytes"], kv_delta["seconds"], kv_delta["transfers"]
        out.update(source="decode engine /metrics", bytes_total=b, seconds_total=s, transfers=t,
                   bytes_per_request=b / n_ok if n_ok else None,
                   seconds_per_request=s / n_ok if n_ok else None,
                   seconds_per_transfer=s / t, gbps=(b / s / 1e9) if s > 0 and b > 0 and not push else None)
        if push:
            out["seconds_meaning"] = "push KV tail: wait after the prefill's last layer, not a transfer time"
    if sidecar:
        leg = sidecar.get("decode_leg_disagg")
        if leg and leg.get("count"):
            mean_leg = leg["sum"] / leg["count"]
            out["decode_leg_mean_s"] = mean_leg
            xfer = out.get("seconds_per_request")
            if xfer is None and sidecar.get("kv_seconds", {}).get("count"):
                xfer = sidecar["kv_seconds"]["sum"] / sidecar["kv_seconds"]["count"]
                out["source"] = out["source"] or "sidecar /metrics"
            if xfer is not None:
                out["decode_leg_not_transfer_s"] = mean_leg - xfer
                out["decode_leg_transfer_share"] = xfer / mean_leg if mean_leg > 0 else None
        pre = sidecar.get("prefill_leg")
        if pre and pre.get("count"):
            out["prefill_leg_mean_s"] = pre["sum"] / pre["count"]
        ov = sidecar.get("overhead_decode")
        if ov and ov.get("count"):
            out["sidecar_overhead_mean_s"] = ov["sum"] / ov["count"]
    return out


# ------------------------------------------------------------------ tables
def _ms(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 1000:.{digits}f}"


def _ratio(v: float | None, ref: float | None) -> str:
    """`v / ref` as "1.020x"; "-" without both."""
    return f"{v / ref:.3f}x" if v is not None and ref else "-"


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([line, sep, *body])


def _has(c: dict[str, Any]) -> bool:
    """Finished, or stopped by --config-timeout with the requests done so far."""
    return c.get("status") in ("ok", "timeout") and c.get("summary") is not None


def format_tables(result: dict[str, Any]) -> str:
    cfgs = result["configs"]
    parts = []
    rows, notes = [], []
    for name, c in cfgs.items():
        if not _has(c):
            notes.append(f"  {name}: UNAVAILABLE - {c.get('reason')}")
            continue
        if c.get("status") == "timeout":
            notes.append(f"  {name}: TIMEOUT - {c.get('reason')} (numbers below: the requests done)")
        s = c["summary"]
        sh = s.get("by_class", {}).get("short", s)
        lg = s.get("by_class", {}).get("long", {})
        rows.append([
            name, f"{s['ok']}/{s['requests']}",
            _num(s["throughput_req_s"]), _num(s["throughput_out_tok_s"], "{:.1f}"),
            _ms(sh["ttft_s"]["p50"]), _ms(sh["ttft_s"]["p99"]),
            _ms(lg.get("ttft_s", {}).get("p50")), _ms(lg.get("ttft_s", {}).get("p99")),
            _ms(sh["itl_s"]["p50"]), _ms(sh["itl_s"]["p90"]), _ms(sh["itl_s"]["p99"]),
            _ms(s["tpot_s"]["p50"]), _ms(s["tpot_s"]["p99"]),
            _ms(s["e2e_s"]["p50"]), _ms(s["e2e_s"]["p99"]),
        ])
    parts.append("Latency (ms; 'short' = decode-heavy requests, 'long' = long prompts arriving meanwhile)")
    parts.append(_table(["config", "ok", "req/s", "tok/s", "TTFTs p50", "TTFTs p99", "TTFTl p50", "TTFTl p99",
                         "ITLs p50", "ITLs p90", "ITLs p99", "TPOT p50", "TPOT p99", "E2E p50", "E2E p99"], rows))
    if notes:
        parts.append("\n".join(notes))

    kv_rows, any_push = [], False
    for name, c in cfgs.items():
        if not _has(c) or not name.startswith("pd"):
            continue
        k = c.get("kv", {})
        push = is_push(name, c)
        any_push |= push
        kv_rows.append([name, c.get("connector", "-"),
                        _num(k.get("bytes_per_request") and k["bytes_per_request"] / 1e6, "{:.3f}"),
                        _ms(k.get("seconds_per_request"), 3) + ("†" if push else ""),
                        "-" if push else _num(k.get("gbps"), "{:.2f}"),
                        _ms(k.get("prefill_leg_mean_s")), _ms(k.get("decode_leg_mean_s")),
                        _ms(k.get("decode_leg_not_transfer_s")), _ms(k.get("sidecar_overhead_mean_s"), 2),
                        " ".join(f"{p}={n}" for p, n in sorted(c["summary"].get("paths", {}).items()))])
    if kv_rows:
        parts.append("\nKV transfer and legs (means per request; decode leg = sidecar's send -> first byte)")
        parts.append(_table(["config", "connector", "KV MB/req", "xfer ms", "GB/s", "prefill leg", "decode leg",
                             "leg-not-xfer", "sidecar ovh", "x-pd-path"], kv_rows))
        if any_push:
            parts.append(PUSH_NOTE)

    for ref_key, ref_name in (("vs_agg", "agg"), ("vs_agg_sc", "agg-sc"), ("vs_stock", "pd-stock")):
        rrows = []
        for name, c in cfgs.items():
            r = (c.get("ratios") or {}).get(ref_key)
            if not _has(c) or not r or name == ref_name:
                continue
            rrows.append([name] + [_num(r.get(k), "{:.2f}x") for k, _ in RATIO_KEYS])
        if rrows:
            parts.append(f"\nRatio to {ref_name} (same run; < 1 = lower, for latencies better; req/s, tok/s > 1 = better)")
            parts.append(_table(["config"] + [lbl for _, lbl in RATIO_KEYS], rrows))

    sweep_rows = []
    for name, c in cfgs.items():
        sw = c.get("sweep")
        if not _has(c) or not sw:
            continue
        ft, fx = sw.get("fit_ttft"), sw.get("fit_transfer")
        mark = "†" if is_push(name, c) else ""
        sweep_rows.append([name,
                           _num(ft and ft["slope"] * 1e6, "{:.2f}"), _num(ft and ft["r2"], "{:.3f}"),
                           _num(fx and fx["slope"] * 1e6, "{:.4f}") + (mark if fx else ""),
                           _num(fx and fx["r2"], "{:.3f}"), _num(fx and fx["intercept"] * 1e3, "{:.3f}")])
    if sweep_rows:
        parts.append("\nPrompt-length sweep: least-squares slope (ms per 1k prompt tokens) and R²")
        parts.append(_table(["config", "TTFT ms/1k", "R²", "xfer ms/1k", "R²", "xfer ms @0"], sweep_rows))
        pts = []
        sweep_push = False
        refs = [r for r in ("agg", "agg-sc") if _has(cfgs.get(r, {})) and cfgs[r].get("sweep")]
        ref_ttft = {r: {p["tokens"]: p["ttft_s_median"] for p in cfgs[r]["sweep"]["points"]} for r in refs}
        for name, c in cfgs.items():
            sw = c.get("sweep")
            if not _has(c) or not sw:
                continue
            push = is_push(name, c)
            sweep_push |= push
            for p in sw["points"]:
                x = _ms(p.get("kv_seconds_median"), 3)
                pts.append([name, str(p["tokens"]), _ms(p["ttft_s_median"])]
                           + [_ratio(p["ttft_s_median"], ref_ttft[r].get(p["tokens"])) for r in refs]
                           + [_num(p.get("kv_bytes_median") and p["kv_bytes_median"] / 1e6, "{:.3f}"),
                              x + ("†" if push and x != "-" else ""),
                              "-" if push else _num(p.get("gbps_median"), "{:.2f}")])
        parts.append(_table(["config", "prompt tok", "TTFT ms"] + [f"TTFT/{r}" for r in refs]
                            + ["KV MB", "xfer ms", "GB/s"], pts))
        if sweep_push:
            parts.append(PUSH_NOTE)

    from bench.e2e_breakdown import format_breakdown

    bd = format_breakdown(cfgs, _has, is_push)
    if bd:
        parts.append(bd)

    g = result.get("greedy_match")
    if g:
        parts.append(f"\nGreedy outputs (temperature 0) vs {g['reference']}: {g['matched']}/{g['compared']} identical"
                     + (f"; mismatches: {g['mismatches'][:5]}" if g["mismatches"] else ""))
    return "\n".join(parts)
