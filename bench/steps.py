"""Benchmark: where one pull load's time goes in the PdConnector, and what an
in-flight transfer costs the decode engine's steps.

One PdConnector pair (prefill and decode engines pinned to their own cores), tiny
Llama, random-token prompts (no prefix hits):

- stages: per prompt length, the decode response's ``pd_transfer.stages_ms``
  (scheduler allocation -> step metadata -> worker ``start_load_kv`` -> READs posted
  -> completion seen by a poll -> returned to vLLM -> seen by the scheduler),
  medians over ``-n`` requests;
- steps: inter-token gaps of a streamed decode-engine request, alone and while
  other requests' KV loads run on the same engine (prefill leg + decode leg with
  ``max_tokens=1`` in a loop). The gap is one engine step as the client sees it.

    flock /tmp/pd-engines.lock python -m bench.steps -n 8 --spin-us 0 3000

Each ``--spin-us`` value starts its own engine pair (``spin_wait_us`` of the decode
worker). Run it under the engine flock: the machine has 2 cores shared with others.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.connector import metric_sum, ours_config, post  # noqa: E402
from bench.output import emit  # noqa: E402
from pdsidecar.dev.engines import pd_pair_configs, start_engines, stock_nixl_config  # noqa: E402

#: in-engine transfer time histograms (decode engine): ours, stock NixlConnector
XFER = {"ours": "pd_connector_transfer_seconds", "stock": "vllm:nixl_xfer_time_seconds"}
from pdsidecar.dev.tiny_models import ensure_model  # noqa: E402


def prefill_leg(p_url: str, model: str, toks: list[int]) -> dict[str, Any]:
    """A one-token prefill request straight to the engine; its answer's ``kv_transfer_params``."""
    r1 = post(p_url, {"model": model, "prompt": toks, "max_tokens": 1,
                      "kv_transfer_params": {"do_remote_decode": True}})
    return r1["kv_transfer_params"]


def pd_once(p_url: str, d_url: str, model: str, toks: list[int]) -> dict[str, Any]:
    """One P/D request straight to the engines (one token each leg): both legs' times
    and the decode's ``pd_transfer``."""
    t0 = time.perf_counter()
    params = prefill_leg(p_url, model, toks)
    t1 = time.perf_counter()
    r2 = post(d_url, {"model": model, "prompt": toks, "max_tokens": 1, "temperature": 0,
                      "kv_transfer_params": params})
    leg = time.perf_counter() - t1
    pt = (r2.get("kv_transfer_params") or {}).get("pd_transfer") or {}
    return {"prefill_leg_ms": (t1 - t0) * 1e3, "decode_leg_ms": leg * 1e3, "pd_transfer": pt}


def stream_gaps(url: str, model: str, toks: list[int], n_out: int,
                kv_transfer_params: dict | None = None) -> list[float]:
    """Milliseconds between streamed tokens of one request (ignore_eos, greedy), the
    first token's gap left out; with ``kv_transfer_params``: a P/D decode leg."""
    body = {"model": model, "prompt": toks, "max_tokens": n_out, "temperature": 0,
            "ignore_eos": True, "stream": True}
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_transfer_params
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    stamps = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(stamps[1:], stamps[2:])]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def xfer(url: str, which: str) -> tuple[float, float]:
    return (metric_sum(url, XFER[which] + "_sum"), metric_sum(url, XFER[which] + "_count"))


def settled(url: str, which: str) -> tuple[float, float]:
    """The transfer histogram once the engine published this step's stats."""
    prev = xfer(url, which)
    for _ in range(40):
        time.sleep(0.05)
        cur = xfer(url, which)
        if cur == prev:
            return cur
        prev = cur
    return prev


def run(model: str, spin_us: float | None, lengths: list[int], n: int, n_out: int,
        log_dir: str | None, vocab: int) -> dict[str, Any]:
    """One engine pair: ours with ``spin_wait_us = spin_us``, or stock (None)."""
    rng = random.Random(7)
    prompt = lambda k: [rng.randrange(10, vocab) for _ in range(k)]  # noqa: E731
    which = "stock" if spin_us is None else "ours"
    kv = stock_nixl_config() if spin_us is None else ours_config(spin_wait_us=spin_us)
    p, d = start_engines(pd_pair_configs(model, kv, stock=spin_us is None, log_dir=log_dir))
    out: dict[str, Any] = {"connector": which, "spin_wait_us": spin_us, "stages": {},
                           "steps": {}}
    try:
        for _ in range(3):  # warm-up: handshake, first-transfer costs
            pd_once(p.url, d.url, model, prompt(64))
        for k in lengths:
            s0, c0 = settled(d.url, which)
            rows = [pd_once(p.url, d.url, model, prompt(k)) for _ in range(n)]
            s1, c1 = settled(d.url, which)
            stages = [r["pd_transfer"].get("stages_ms", {}) for r in rows]
            keys = sorted({key for s in stages for key in s})
            out["stages"][k] = {
                "n": n, "errors": sum(1 for r in rows if r["pd_transfer"].get("error")),
                "engine_xfer_mean_ms": (s1 - s0) / (c1 - c0) * 1e3 if c1 > c0 else float("nan"),
                "engine_xfers": c1 - c0,
                "decode_leg_ms": statistics.median(r["decode_leg_ms"] for r in rows),
                "transfer_ms": statistics.median(r["pd_transfer"].get("ms", 0) for r in rows)
                if which == "ours" else float("nan"),
                **{key: statistics.median(s.get(key, float("nan")) for s in stages)
                   for key in keys}}
        if not n_out:
            return out
        alone = stream_gaps(d.url, model, prompt(32), n_out)
        stop = threading.Event()
        loads = [0]

        def load_loop() -> None:
            while not stop.is_set():
                pd_once(p.url, d.url, model, prompt(rng.choice(lengths)))
                loads[0] += 1
        th = threading.Thread(target=load_loop, daemon=True)
        th.start()
        busy = stream_gaps(d.url, model, prompt(32), n_out)
        stop.set()
        th.join(timeout=60)
        for name, g in (("alone", alone), ("with_loads", busy)):
            out["steps"][name] = {"gaps": len(g), "p50_ms": pct(g, 0.5), "p90_ms": pct(g, 0.9),
                                  "max_ms": max(g) if g else float("nan")}
        out["steps"]["with_loads"]["loads_during"] = loads[0]
    finally:
        for e in (p, d):
            e.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache/pdsidecar/models/tiny-llama"))
    ap.add_argument("-n", type=int, default=8, help="requests per prompt length")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 1024, 2048])
    ap.add_argument("--spin-us", type=float, nargs="+", default=[0.0],
                    help="one PdConnector pair per value (its decode worker's spin_wait_us)")
    ap.add_argument("--stock", action="store_true", help="also a stock NixlConnector pair")
    ap.add_argument("--no-steps", action="store_true", help="skip the step-time measurement")
    ap.add_argument("--out-tokens", type=int, default=256, help="streamed request length")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    model = str(ensure_model("llama", Path(a.model_dir)))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    runs: list[float | None] = list(a.spin_us) + ([None] if a.stock else [])
    results = [run(model, s, a.lengths, a.n, 0 if a.no_steps else a.out_tokens, a.log_dir,
                   vocab) for s in runs]
    return emit(results, a.json)


if __name__ == "__main__":
    sys.exit(main())
