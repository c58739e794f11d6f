"""Benchmark: what makes a P/D decode engine's steps slower than an aggregated engine's.

Three engines from one model: ``plain`` (no KV connector) and a PdConnector pair
(``prefill``, ``decode``), started one after another (on one GPU they share it). Then,
one request at a time, the inter-token gaps of streamed greedy requests (one gap = one
engine step as the client sees it), in this order:

1. ``plain``           the aggregated engine, its neighbours idle
2. ``decode_direct``   the decode engine, a plain request (the connector loaded, no KV to load)
3. ``prefill_direct``  the prefill engine, a plain request
4. ``decode_after_kv`` the decode engine continuing a prefill leg (the P/D path: KV read)
5. ``decode_direct_2`` and ``plain_2``: 2 and 1 again, after the P/D requests

Before those, ``legs``: per prompt length (128, 2048), the plain engine's one-token
request against the prefill leg and the decode leg (non-streamed, straight to the
engines, no sidecar) and the decode's ``pd_transfer.stages_ms``.

Same prompt length and output length everywhere; medians over ``-n`` requests.
``2 ~ 1`` and ``4 > 2`` puts the cost in the P/D path; ``2 > 1`` in the loaded connector;
``1 > plain alone`` (``--plain-alone``) in the neighbours.

    python -m bench.itl_probe --model DIR --gpu-util 0.2 --json out.json      # GPU host
    flock /tmp/pd-engines.lock python -m bench.itl_probe -n 2 --out-tokens 16  # CPU
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.connector import ours_config, post  # noqa: E402
from bench.output import emit  # noqa: E402
from bench.steps import pct, pd_once, prefill_leg, stream_gaps  # noqa: E402
from pdsidecar.dev.engines import EngineConfig, pd_pair_configs, start_engines  # noqa: E402
from pdsidecar.dev.tiny_models import ensure_model  # noqa: E402

LEG_LENGTHS = (128, 2048)  # prompt lengths of the one-token legs, unless --leg-lengths


def summary(gaps: list[float]) -> dict[str, float]:
    return {"gaps": len(gaps), "p50_ms": pct(gaps, 0.5), "p90_ms": pct(gaps, 0.9),
            "mean_ms": statistics.fmean(gaps) if gaps else float("nan")}


def decode_after_kv(p_url: str, d_url: str, model: str, toks: list[int], n_out: int) -> list[float]:
    """Prefill leg on ``p_url``, then the streamed decode on ``d_url`` over the read KV."""
    return stream_gaps(d_url, model, toks, n_out, kv_transfer_params=prefill_leg(p_url, model, toks))


def legs(plain_url: str, p_url: str, d_url: str, model: str, prompt: Callable[[int], list[int]], n: int,
         lengths: tuple[int, ...] = LEG_LENGTHS) -> dict[str, Any]:
    """Per prompt length, medians of: the plain engine's one-token request, the prefill
    leg, the decode leg (one token over the read KV) and the decode's load stages."""
    out: dict[str, Any] = {}
    for k in lengths:
        rows = []
        for _ in range(n):
            toks = prompt(k)
            t0 = time.perf_counter()
            post(plain_url, {"model": model, "prompt": toks, "max_tokens": 1, "temperature": 0})
            plain_ms = (time.perf_counter() - t0) * 1e3
            r = pd_once(p_url, d_url, model, toks)
            pt = r["pd_transfer"]
            rows.append({"plain_ms": plain_ms, "prefill_leg_ms": r["prefill_leg_ms"],
                         "decode_leg_ms": r["decode_leg_ms"],
                         "error": pt.get("error", "no pd_transfer"), "transfer_ms": pt.get("ms"),
                         "stages_ms": pt.get("stages_ms", {})})
        med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
        stage_keys = sorted({s for r in rows for s in r["stages_ms"]})
        out[str(k)] = {"plain_ms": med("plain_ms"), "prefill_leg_ms": med("prefill_leg_ms"),
                       "decode_leg_ms": med("decode_leg_ms"),
                       "errors": [r["error"] for r in rows if r["error"]],
                       "stages_ms": {s: statistics.median(r["stages_ms"].get(s, float("nan"))
                                                          for r in rows) for s in stage_keys}}
        print(f"{k:5d} tokens: plain {out[str(k)]['plain_ms']:7.2f} ms, prefill leg "
              f"{out[str(k)]['prefill_leg_ms']:7.2f} ms, decode leg {out[str(k)]['decode_leg_ms']:7.2f} ms; "
              f"stages {out[str(k)]['stages_ms']}", flush=True)
    return out


def engine_configs(model: str, gpu_util: float | None, max_len: int, log_dir: str | None
                   ) -> list[EngineConfig]:
    kv = ours_config()
    if gpu_util is None:  # CPU: each engine on its own cores
        pair = pd_pair_configs(model, kv, log_dir=log_dir)
        plain = EngineConfig(model=model, name="plain", cpu_bind=pair[0].cpu_bind,
                             log_dir=log_dir, max_model_len=max_len)
        return [plain, *pair]
    gpu = dict(cpu_bind=None, pin_process=False, max_model_len=max_len, log_dir=log_dir,
               extra_args=["--gpu-memory-utilization", str(gpu_util)], startup_timeout_s=600)
    return [EngineConfig(model=model, name="plain", **gpu),
            EngineConfig(model=model, name="prefill", kv_transfer_config=kv, **gpu),
            EngineConfig(model=model, name="decode", kv_transfer_config=kv, **gpu)]


def run(model: str, gpu_util: float | None, n: int, prompt_len: int, n_out: int, max_len: int,
        log_dir: str | None, plain_alone: bool,
        leg_lengths: tuple[int, ...] = LEG_LENGTHS) -> dict[str, Any]:
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(11)

    def prompt(k: int = prompt_len) -> list[int]:
        return [rng.randrange(10, vocab - 1) for _ in range(k)]
    configs = engine_configs(model, gpu_util, max_len, log_dir)
    out: dict[str, Any] = {"model": model, "prompt_len": prompt_len, "out_tokens": n_out, "n": n,
                           "steps": {}, "t_start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    alone = None
    if plain_alone:  # the aggregated engine before its neighbours exist
        (e,) = start_engines(configs[:1])
        try:
            stream_gaps(e.url, model, prompt(), 4)
            alone = [g for _ in range(n) for g in stream_gaps(e.url, model, prompt(), n_out)]
        finally:
            e.stop()
    plain, p, d = start_engines(configs, sequential=True)
    try:
        for url in (plain.url, p.url, d.url):  # warm-up
            stream_gaps(url, model, prompt(), 4)
        decode_after_kv(p.url, d.url, model, prompt(), 4)
        if alone is not None:
            out["steps"]["plain_alone"] = summary(alone)
        order = [("plain", lambda: stream_gaps(plain.url, model, prompt(), n_out)),
                 ("decode_direct", lambda: stream_gaps(d.url, model, prompt(), n_out)),
                 ("prefill_direct", lambda: stream_gaps(p.url, model, prompt(), n_out)),
                 ("decode_after_kv", lambda: decode_after_kv(p.url, d.url, model, prompt(), n_out)),
                 ("decode_direct_2", lambda: stream_gaps(d.url, model, prompt(), n_out)),
                 ("plain_2", lambda: stream_gaps(plain.url, model, prompt(), n_out))]
        out["legs"] = legs(plain.url, p.url, d.url, model, prompt, n, leg_lengths)
        for name, fn in order:
            gaps = [g for _ in range(n) for g in fn()]
            out["steps"][name] = summary(gaps)
            print(f"{name:16s} p50 {out['steps'][name]['p50_ms']:7.2f} ms  "
                  f"p90 {out['steps'][name]['p90_ms']:7.2f} ms  ({len(gaps)} gaps)", flush=True)
    finally:
        for e in (plain, p, d):
            e.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the tiny Llama, made if missing)")
    ap.add_argument("--gpu-util", type=float, default=None,
                    help="GPU engines with this --gpu-memory-utilization each (default: CPU engines)")
    ap.add_argument("-n", type=int, default=3, help="requests per measurement")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out-tokens", type=int, default=48)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--leg-lengths", type=int, nargs="+", default=list(LEG_LENGTHS),
                    help="prompt lengths of the one-token legs (each < --max-model-len)")
    ap.add_argument("--plain-alone", action="store_true",
                    help="first measure the plain engine with no other engine running")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    if a.n < 1 or a.out_tokens < 3 or a.prompt_len < 1:
        ap.error("-n >= 1, --out-tokens >= 3 and --prompt-len >= 1 are required")
    if min(a.leg_lengths) < 1 or max(a.leg_lengths) >= a.max_model_len:
        ap.error("--leg-lengths: each length >= 1 and < --max-model-len")
    model = a.model or str(ensure_model("llama", Path.home() / ".cache/pdsidecar/models/tiny-llama"))
    res = run(model, a.gpu_util, a.n, a.prompt_len, a.out_tokens, a.max_model_len, a.log_dir,
              a.plain_alone, tuple(a.leg_lengths))
    return emit(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
