"""Benchmark: PdConnector vs vLLM's stock NixlConnector on real CPU engines.

Same run, same prompts, engines pinned to separate cores. For each model and each
connector: aggregated latency (prefill engine, fresh prompt, max_tokens=1), the
prefill leg (max_tokens=1, do_remote_decode) and the decode leg (max_tokens=1, the
prefill response's kv_transfer_params), medians over n random-token prompts.
Reports per-leg ratios ours/stock (<= 1.0 means no worse than stock).

    flock /tmp/pdsidecar-engines.lock python -m bench.connector --models llama mixtral -n 10

Run it under the engine flock: the machine has 2 cores shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pdsidecar.dev.engines import pd_pair_configs, start_engines, stock_nixl_config  # noqa: E402
from pdsidecar.dev.tiny_models import ensure_model  # noqa: E402


def ours_config(**extra: Any) -> dict[str, Any]:
    return {"kv_connector": "PdConnector", "kv_connector_module_path": "transfer.connector",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"control_port": 0, "protocol": "auto", **extra}}


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read()[:500]!r}") from None


def metric_sum(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name + "{") or l.startswith(name + " "))


def run_pair(model: str, kv_cfg: dict, stock: bool, prompts: list[list[int]], warm: int,
             log_dir: str) -> dict[str, list[float]]:
    """Raw samples (seconds) for one engine pair; first ``warm`` prompts discarded."""
    p, d = start_engines(pd_pair_configs(model, kv_cfg, stock=stock, log_dir=log_dir))
    try:
        out: dict[str, list[float]] = {"aggregated": [], "prefill_leg": [], "decode_leg": [],
                                       "transfer": []}
        for i, toks in enumerate(prompts):
            # aggregated reference: the same length, first token changed (fresh, uncached)
            ref = [toks[1]] + toks[1:]
            t0 = time.perf_counter()
            post(p.url, {"model": model, "prompt": ref, "max_tokens": 1, "temperature": 0})
            t1 = time.perf_counter()
            r1 = post(p.url, {"model": model, "prompt": toks, "max_tokens": 1,
                              "kv_transfer_params": {"do_remote_decode": True}})
            t2 = time.perf_counter()
            r2 = post(d.url, {"model": model, "prompt": toks, "max_tokens": 1, "temperature": 0,
                              "kv_transfer_params": r1["kv_transfer_params"]})
            t3 = time.perf_counter()
            if i >= warm:
                out["aggregated"].append(t1 - t0)
                out["prefill_leg"].append(t2 - t1)
                out["decode_leg"].append(t3 - t2)
                pt = (r2.get("kv_transfer_params") or {}).get("pd_transfer") or {}
                if pt.get("ms") is not None:
                    out["transfer"].append(pt["ms"] / 1e3)
        if not out["transfer"]:  # stock: mean from its histogram
            s = metric_sum(d.url, "vllm:nixl_xfer_time_seconds_sum")
            c = metric_sum(d.url, "vllm:nixl_xfer_time_seconds_count")
            out["transfer"] = [s / c] if c else []
        return out
    finally:
        p.stop()
        d.stop()


def summarize(samples: dict[str, list[float]]) -> dict[str, float | None]:
    return {f"{k}_ms": (1e3 * statistics.median(v) if v else None) for k, v in samples.items()}


def _configure(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--models", nargs="+", default=["llama", "mixtral"])
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1502)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "pdsidecar" / "models"))
    ap.add_argument("--log-dir", default="/tmp/pdsidecar-bench-connector")
    ap.add_argument("--json", default="")
    return ap


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``connector`` on the ``pdbench`` sub-command parser."""
    p = subparsers.add_parser("connector", help="PdConnector vs the stock NixlConnector, per leg",
                              description=__doc__.splitlines()[0])
    _configure(p)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(_configure(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv))


def run(a: argparse.Namespace) -> int:
    results: dict[str, Any] = {}
    for m in a.models:
        model = str(ensure_model(m, Path(a.cache) / f"tiny-{m}"))
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        rng = random.Random(a.seed)
        samples: dict[str, dict[str, list[float]]] = {"stock": {}, "ours": {}}
        # interleaved rounds (stock, ours, stock, ours, ...): other jobs on this
        # machine drift over minutes; alternating keeps the comparison fair
        for rnd in range(a.rounds):
            prompts = [[rng.randrange(10, vocab - 1) for _ in range(a.tokens)]
                       for _ in range(a.n + a.warm)]
            for name, cfg, stock in (("stock", stock_nixl_config(), True),
                                     ("ours", ours_config(), False)):
                got = run_pair(model, cfg, stock, prompts, a.warm, a.log_dir)
                for k, v in got.items():
                    samples[name].setdefault(k, []).extend(v)
                print(m, f"round {rnd}", name, json.dumps(
                    {k: round(v, 3) if v else v for k, v in summarize(got).items()}), flush=True)
        res: dict[str, Any] = {n: summarize(samples[n]) for n in samples}
        res["ratio"] = {k: res["ours"][k] / res["stock"][k]
                        for k in ("prefill_leg_ms", "decode_leg_ms", "aggregated_ms")}
        for n in ("stock", "ours"):
            print(m, n, json.dumps({k: round(v, 3) if v else v for k, v in res[n].items()}))
        print(m, "ratio ours/stock", json.dumps({k: round(v, 3) for k, v in res["ratio"].items()}),
              flush=True)
        results[m] = res
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
