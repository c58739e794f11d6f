"""Benchmark: PdConnector push mode (layer-wise WRITEs) vs pull mode, same engines.

One PdConnector pair (prefill and decode engines pinned to their own cores) serves
both modes; every request has a fresh random prompt (no prefix-cache hits). Per
request:

- pull: prefill leg (``do_remote_decode``, max_tokens=1), then the decode leg with the
  returned params (max_tokens=1). TTFT = both legs; tail = the decode leg (transfer +
  one decode step), i.e. what is still to do when the prefill response arrives.
- push: both legs at once, linked by a push id; the prefill engine WRITEs each layer's
  blocks from ``save_kv_layer`` while its forward runs. TTFT = until the decode leg
  answers; tail = decode answer minus prefill answer.
- aggregated: the prefill engine alone, max_tokens=1 (reference).

The connector's own view is reported too: pull READ time, push tail (forward end to
last WRITE done) and push window (first WRITE to last).

    flock /tmp/pdsidecar-engines.lock python -m bench.push --layers 24 --tokens 2000 -n 8

Use a model whose KV is not negligible (default: 24 layers, 4 KV heads of 64,
bf16 = 24 KiB per token, 47 MiB for 2000 tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.connector import ours_config, post  # noqa: E402
from pdsidecar.dev.engines import pd_pair_configs, start_engines  # noqa: E402
from pdsidecar.dev.tiny_models import ensure_model  # noqa: E402


def control_addr(decode_url: str) -> str:
    """The decode engine's control plane, read off a 1-token prefill it serves."""
    r = post(decode_url, {"prompt": [11, 12, 13], "max_tokens": 1,
                          "kv_transfer_params": {"do_remote_decode": True}})
    return r["kv_transfer_params"]["pd_control_addr"]


def one_pull(p_url: str, d_url: str, toks: list[int]) -> dict[str, float]:
    t0 = time.perf_counter()
    pr = post(p_url, {"prompt": toks, "max_tokens": 1,
                      "kv_transfer_params": {"do_remote_decode": True}})
    t1 = time.perf_counter()
    dr = post(d_url, {"prompt": toks, "max_tokens": 1, "temperature": 0,
                      "kv_transfer_params": pr["kv_transfer_params"]})
    t2 = time.perf_counter()
    tr = dr.get("kv_transfer_params", {}).get("pd_transfer", {})
    if tr.get("error"):
        raise RuntimeError(f"pull transfer failed: {tr}")
    return {"ttft": t2 - t0, "prefill": t1 - t0, "tail": t2 - t1,
            "connector_ms": float(tr.get("ms", 0.0)), "bytes": float(tr.get("bytes", 0))}


def one_push(p_url: str, d_url: str, d_addr: str, toks: list[int]) -> dict[str, float]:
    push_id = "bench-" + uuid.uuid4().hex
    out: dict[str, Any] = {}

    def leg(name: str, url: str, body: dict) -> None:
        try:
            out[name] = post(url, body)
        except Exception as e:  # reported below
            out[name] = e
        out["t_" + name] = time.perf_counter()

    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=leg, args=("d", d_url, {
            "prompt": toks, "max_tokens": 1, "temperature": 0,
            "kv_transfer_params": {"do_remote_prefill": True, "transfer_mode": "push",
                                   "remote_request_id": push_id}})),
        threading.Thread(target=leg, args=("p", p_url, {
            "prompt": toks, "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True, "transfer_mode": "push",
                                   "remote_request_id": push_id, "push_target": d_addr}})),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for k in ("d", "p"):
        if isinstance(out.get(k), Exception) or k not in out:
            raise RuntimeError(f"push {k} leg failed: {out.get(k)!r}")
    tr = out["d"].get("kv_transfer_params", {}).get("pd_transfer", {})
    if tr.get("error") or tr.get("mode") != "push":
        raise RuntimeError(f"push transfer failed: {tr}; prefill leg answered "
                           f"{out['p'].get('kv_transfer_params')} after {out['t_p'] - t0:.2f} s")
    return {"ttft": out["t_d"] - t0, "prefill": out["t_p"] - t0, "tail": out["t_d"] - out["t_p"],
            "connector_ms": float(tr.get("ms", 0.0)), "window_ms": float(tr.get("window_ms", 0.0)),
            "bytes": float(tr.get("bytes", 0))}


def one_agg(p_url: str, toks: list[int]) -> dict[str, float]:
    t0 = time.perf_counter()
    post(p_url, {"prompt": toks, "max_tokens": 1, "temperature": 0})
    return {"ttft": time.perf_counter() - t0}


def median(rows: list[dict[str, float]], key: str) -> float | None:
    xs = [r[key] for r in rows if key in r]
    return statistics.median(xs) if xs else None


def _configure(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2000, help="prompt length")
    ap.add_argument("-n", type=int, default=8, help="timed requests per mode")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write raw samples and medians here")
    return ap


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("push", help="push mode (layer-wise) vs pull on real CPU engines",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    p.set_defaults(func=run)
    return p


def run(a: argparse.Namespace) -> int:
    for name in ("layers", "hidden_size", "kv_heads", "tokens", "n"):
        if getattr(a, name) < 1:
            print(f"pdbench push: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    model_dir = Path.home() / ".cache" / "pdsidecar" / "models" / \
        f"bench-llama-l{a.layers}-h{a.hidden_size}-kv{a.kv_heads}"
    model = str(ensure_model("llama", model_dir, num_layers=a.layers, hidden_size=a.hidden_size,
                             num_heads=a.hidden_size // 64, num_kv_heads=a.kv_heads))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(a.seed)
    prompt = lambda: [rng.randrange(10, vocab - 1) for _ in range(a.tokens)]  # noqa: E731
    p, d = start_engines(pd_pair_configs(model, ours_config(transfer_mode="push", push_wait_s=300),
                                         max_model_len=max(4096, a.tokens + 64)))
    rows: dict[str, list[dict[str, float]]] = {"pull": [], "push": [], "aggregated": []}
    try:
        d_addr = control_addr(d.url)
        for i in range(a.warmup + a.n):
            # interleave the modes so drift hits all three alike
            sample = {"pull": one_pull(p.url, d.url, prompt()),
                      "push": one_push(p.url, d.url, d_addr, prompt()),
                      "aggregated": one_agg(p.url, prompt())}
            if i >= a.warmup:
                for k, v in sample.items():
                    rows[k].append(v)
            print(f"[{i + 1}/{a.warmup + a.n}] pull ttft {sample['pull']['ttft'] * 1e3:.1f} ms "
                  f"tail {sample['pull']['tail'] * 1e3:.1f} | push ttft "
                  f"{sample['push']['ttft'] * 1e3:.1f} tail {sample['push']['tail'] * 1e3:.1f} | "
                  f"agg {sample['aggregated']['ttft'] * 1e3:.1f}", file=sys.stderr)
    finally:
        for e in (p, d):
            e.stop()
    med = {mode: {k: median(r, k) for k in ("ttft", "prefill", "tail", "connector_ms",
                                             "window_ms", "bytes")}
           for mode, r in rows.items()}
    kv_mib = (med["pull"]["bytes"] or 0) / 2**20
    print(f"\nmodel: llama {a.layers} layers, hidden {a.hidden_size}, {a.kv_heads} KV heads; "
          f"{a.tokens}-token prompts; KV {kv_mib:.1f} MiB per request; medians of {a.n}")
    print("| mode | TTFT ms | prefill answer ms | tail ms (after prefill answer) | connector ms |")
    print("|---|---|---|---|---|")
    for mode in ("aggregated", "pull", "push"):
        m = med[mode]
        f = lambda v: "–" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
        conn = m.get("connector_ms")
        conn_s = "–" if conn is None else (f"{conn:.2f} (READ)" if mode == "pull" else
                                           f"{conn:.2f} tail, {m['window_ms']:.1f} window")
        print(f"| {mode} | {f(m['ttft'])} | {f(m.get('prefill'))} | {f(m.get('tail'))} | {conn_s} |")
    if med["pull"]["ttft"] and med["push"]["ttft"]:
        print(f"\npush/pull TTFT {med['push']['ttft'] / med['pull']['ttft']:.3f}; tail "
              f"{med['push']['tail'] * 1e3:.1f} vs {med['pull']['tail'] * 1e3:.1f} ms")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a) | {"func": None}, "samples": rows,
                                            "medians": med}, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_configure(argparse.ArgumentParser(prog="python -m bench.push",
                                                  description=__doc__)).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
