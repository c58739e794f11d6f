"""`pdbench proxy`: latency the sidecar adds, at 1, 16 and 64 concurrent streams.

Each level sends the same number of streaming requests straight to the upstream and
through the sidecar, interleaved in one run (each worker alternates), and reports
time-to-first-byte and whole-request percentiles for both plus the difference.

Upstreams:
  --upstream fake   a fast fake vLLM (aiohttp, uvloop, own process) that answers prefill
                    legs with kv_transfer_params and streams SSE chunks: isolates the
                    sidecar's own cost.
  --upstream vllm   real vLLM engines (tiny model on CPU; `--model DIR`): the local path
                    (decode sidecar -> vLLM) vs vLLM directly, and the P/D path vs the
                    same two legs done by the client itself.
Paths (--path): local (decode sidecar -> upstream) and disagg (decode sidecar -> prefill
sidecar -> upstream prefill; then upstream decode), each against its direct baseline.
--workers 1,4: the decode sidecars run with `--workers N` (SO_REUSEPORT worker processes),
one full sweep per value (the prefill sidecar always runs one process).

Run as `pdbench proxy ...` or `python -m bench.proxy ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
import urllib.request
from pathlib import Path

from bench.proxy_servers import (ALL_CPUS, cpu_plan, pin_to, serve_bare_hop, serve_fake, start_sidecar,
                                 stop_processes, wait_http, wait_workers)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("proxy", help="latency added by the sidecar (p50/p99 at 1/16/64 streams)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", default="1,16,64", help="comma list of concurrent streams")
    p.add_argument("--requests", type=int, default=400, help="requests per level and target")
    p.add_argument("--warmup", type=int, default=50, help="untimed requests per level and target")
    p.add_argument("--chunks", type=int, default=8, help="SSE chunks per fake response")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="fake upstream: delay between chunks")
    p.add_argument("--path", choices=["local", "disagg", "both"], default="both")
    p.add_argument("--workers", default="1", help="comma list: decode sidecars' --workers, one sweep each")
    p.add_argument("--upstream", choices=["fake", "vllm"], default="fake")
    p.add_argument("--model", default=None, help="model folder for --upstream vllm (default: tiny Llama cache)")
    p.add_argument("--max-tokens", type=int, default=8, help="--upstream vllm: tokens per request")
    p.add_argument("--log-level", default="info", help="sidecars' log level (info logs one JSON line per request)")
    p.add_argument("--hop-baseline", action="store_true",
                   help="local path: also time a bare aiohttp pass-through proxy (no sidecar logic), the "
                        "floor of one Python HTTP hop, in the same run")
    p.add_argument("--json", default=None, help="also write results to this JSON file")



# --------------------------------------------------------------------------- load


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


async def _one_stream(session, url: str, body: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.read())[:200]!r}")
        first = None
        async for _ in r.content.iter_any():
            if first is None:
                first = time.perf_counter()
    return first - t0, time.perf_counter() - t0


async def _direct_disagg(session, prefill_url: str, decode_url: str, body: dict) -> tuple[float, float]:
    """The minimum a P/D client must do itself: prefill leg, then decode leg."""
    t0 = time.perf_counter()
    pb = dict(body, stream=False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    async with session.post(prefill_url, json=pb) as r:
        kv = (await r.json())["kv_transfer_params"]
    db = dict(body, kv_transfer_params=kv)
    async with session.post(decode_url, json=db) as r:
        first = None
        async for _ in r.content.iter_any():
            if first is None:
                first = time.perf_counter()
    return first - t0, time.perf_counter() - t0


async def _level(conc: int, n: int, warmup: int, targets: dict, make_body) -> dict:
    import aiohttp

    results: dict[str, dict[str, list[float]]] = {k: {"ttfb": [], "total": []} for k in targets}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def run(total: int, record: bool) -> None:
            counter = iter(range(total * len(targets)))

            async def worker(w: int) -> None:
                names = list(targets)
                for i in counter:
                    name = names[i % len(names)]
                    ttfb, tot = await targets[name](s, make_body(i))
                    if record:
                        results[name]["ttfb"].append(ttfb)
                        results[name]["total"].append(tot)

            await asyncio.gather(*(worker(w) for w in range(conc)))

        await run(warmup, False)
        await run(n, True)
    out = {}
    for name, r in results.items():
        out[name] = {f"{m}_{q}_ms": round(_pct(r[m], q) * 1000, 3) for m in ("ttfb", "total") for q in (50, 99)}
        out[name]["n"] = len(r["ttfb"])
    return out


def _sidecar_overhead(url: str) -> dict:
    """p50 of pd_sidecar_overhead_seconds from the sidecar's own histogram (bucket bound)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith('pd_sidecar_overhead_seconds_bucket{') and 'role="decode"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    res = {}
    for q in (50, 99):
        for le, c in buckets:
            if c >= total * q / 100:
                res[f"overhead_p{q}_le_ms"] = le * 1000
                break
    return res


def _start_sidecars(args: argparse.Namespace, prefill_vllm: str, decode_vllm: str, workers: int,
                    procs: list) -> dict[str, str]:
    """Prefill + decode sidecars (P/D path) and a peerless decode sidecar (local path)."""
    from pdsidecar.dev.procs import free_port

    ps_port, ds_port, local_port = free_port(), free_port(), free_port()
    procs.append(start_sidecar("prefill", ps_port, prefill_vllm, ["--allowed-peers", f"127.0.0.1:{ds_port}"],
                                args.log_level, "prefill"))
    procs.append(start_sidecar("decode", ds_port, decode_vllm, ["--kv-transfer-target", f"127.0.0.1:{ps_port}"],
                                args.log_level, "decode", workers))
    procs.append(start_sidecar("decode", local_port, decode_vllm, [], args.log_level, "local", workers))
    urls = {"prefill": f"http://127.0.0.1:{ps_port}", "disagg": f"http://127.0.0.1:{ds_port}",
            "local": f"http://127.0.0.1:{local_port}"}
    for name, url in urls.items():
        wait_http(url + "/ready")
        wait_workers(url, 1 if name == "prefill" else workers)
    return urls


def _sweep(args: argparse.Namespace, tag: str, urls: dict[str, str], prefill_vllm: str, decode_vllm: str,
           levels: list[int], paths: list[str], make_body) -> dict:
    """Every path at every concurrency level against its direct baseline."""
    def streamer(url):
        async def f(s, body):
            return await _one_stream(s, url, json.dumps(body).encode())
        return f

    async def direct_pd(s, body):
        return await _direct_disagg(s, prefill_vllm + "/v1/completions", decode_vllm + "/v1/completions", body)

    out: dict = {}
    for path in paths:
        direct = streamer(decode_vllm + "/v1/completions") if path == "local" else direct_pd
        targets = {"direct": direct, "sidecar": streamer(urls[path] + "/v1/completions")}
        if path == "local" and "bare-hop" in urls:
            targets["bare-hop"] = streamer(urls["bare-hop"] + "/v1/completions")
        per_level: dict = {}
        for conc in levels:
            r = asyncio.run(_level(conc, args.requests, args.warmup, targets, make_body))
            added = {k.replace("_ms", "_added_ms"): round(r["sidecar"][k] - r["direct"][k], 3)
                     for k in r["direct"] if k.endswith("_ms")}
            per_level[conc] = {**r, "added": added}
            hop = ""
            if "bare-hop" in r:
                per_level[conc]["bare_hop_added"] = {
                    k.replace("_ms", "_added_ms"): round(r["bare-hop"][k] - r["direct"][k], 3)
                    for k in r["direct"] if k.endswith("_ms")}
                b = per_level[conc]["bare_hop_added"]
                hop = f" | bare hop added p50 {b['ttfb_50_added_ms']:+.3f} p99 {b['ttfb_99_added_ms']:+.3f}"
            print(f"[{tag}/{path}] c={conc:<3} direct ttfb p50 {r['direct']['ttfb_50_ms']:.3f} "
                  f"p99 {r['direct']['ttfb_99_ms']:.3f} | sidecar p50 {r['sidecar']['ttfb_50_ms']:.3f} "
                  f"p99 {r['sidecar']['ttfb_99_ms']:.3f} | added p50 {added['ttfb_50_added_ms']:+.3f} "
                  f"p99 {added['ttfb_99_added_ms']:+.3f} ms{hop} (n={r['sidecar']['n']})", flush=True)
        per_level["sidecar_histogram"] = _sidecar_overhead(urls[path])
        print(f"[{tag}/{path}] sidecar's own pd_sidecar_overhead_seconds: {per_level['sidecar_histogram']}",
              flush=True)
        out[path] = per_level
    return out


def run(args: argparse.Namespace) -> int:
    from pdsidecar.dev.procs import free_port

    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
        worker_counts = [int(x) for x in str(args.workers).split(",") if x.strip()]
    except ValueError:
        print("pdbench proxy: error: --concurrency and --workers are comma lists of integers", file=sys.stderr)
        return 2
    if not worker_counts or not all(1 <= w <= 64 for w in worker_counts):
        print("pdbench proxy: error: --workers values must be 1-64", file=sys.stderr)
        return 2
    paths = ["local", "disagg"] if args.path == "both" else [args.path]
    procs: list = []
    sidecars: list = []
    engines = []
    results: dict = {"upstream": args.upstream, "levels": levels, "requests": args.requests, "workers": {},
                     "cpus": os.cpu_count()}
    try:
        if args.upstream == "fake":
            ctx = mp.get_context("spawn")
            p_port, d_port = free_port(), free_port()
            for port, pin in ((p_port, "fake-prefill"), (d_port, "fake-decode")):
                pr = ctx.Process(target=serve_fake, args=(port, args.chunks, args.chunk_delay_ms / 1000, pin),
                                 daemon=True)
                pr.start()
                procs.append(pr)
            prefill_vllm, decode_vllm = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{d_port}"
            model = "fake"
        else:
            from pdsidecar.dev.engines import pd_pair_configs, start_engines, stock_nixl_config
            from pdsidecar.dev.tiny_models import ensure_model

            model = args.model or str(ensure_model("llama", Path.home() / ".cache" / "pdsidecar" / "models" / "tiny-llama"))
            engines = start_engines(pd_pair_configs(model, stock_nixl_config(), stock=True))
            prefill_vllm, decode_vllm = engines[0].url, engines[1].url
        for u in (prefill_vllm, decode_vllm):
            wait_http(u + "/health")
        hop_url = None
        if args.hop_baseline and "local" in paths:
            hop_port = free_port()
            plan = cpu_plan(max(worker_counts))
            pin = "bare-hop" if args.upstream == "fake" and plan and "bare-hop" in plan else None
            pr = mp.get_context("spawn").Process(target=serve_bare_hop, args=(hop_port, decode_vllm, pin),
                                                 daemon=True)
            pr.start()
            procs.append(pr)
            hop_url = f"http://127.0.0.1:{hop_port}"
            wait_http(hop_url + "/health")
        words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega cache block token".split()

        def make_body(i: int) -> dict:
            # distinct prompts (no prefix-cache shortcuts on real engines)
            prompt = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(48)) + f" {i}"
            b = {"model": model, "prompt": prompt, "stream": True, "max_tokens": args.max_tokens, "temperature": 0}
            if args.upstream == "vllm":
                b["ignore_eos"] = True
            return b

        for workers in worker_counts:
            urls = _start_sidecars(args, prefill_vllm, decode_vllm, workers, sidecars)
            if hop_url:
                urls["bare-hop"] = hop_url
            pinned = args.upstream == "fake" and cpu_plan(workers) is not None
            if pinned:
                pin_to("client", workers)
            elif ALL_CPUS:
                os.sched_setaffinity(0, ALL_CPUS)  # an earlier sweep may have pinned the client
            tag = f"{args.upstream}/w{workers}"
            res = _sweep(args, tag, urls, prefill_vllm, decode_vllm, levels, paths, make_body)
            results["workers"][workers] = {"pinned": pinned, "paths": res}
            stop_processes(sidecars)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    finally:
        stop_processes(sidecars)
        stop_processes(procs)
        for e in engines:
            e.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
