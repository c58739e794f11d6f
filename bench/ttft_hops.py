"""Where a long prompt's first token loses time on the P/D path (probe, not a benchmark).

One PdConnector pair with sidecars (`--first-token-from-prefill all`). For each prompt
length (`--tokens 2048,8064`), per iteration, each variant with its own fresh prompt, in
rotating order:
  direct_stream   client -> prefill engine, streaming, max_tokens 1 (aggregated serving's path)
  direct_stream_tok  the same, while the decode engine's /tokenize tokenizes the same prompt
                  (what the decode sidecar does beside the prefill leg: does it slow the prefill?)
  direct_stream_kv   streaming, max_tokens 1, with `do_remote_decode` (the connector's work
                  for a prefill leg, without vLLM's non-streaming answer)
  direct_leg_plain   non-streaming, max_tokens 1, no kv_transfer_params (vLLM's non-streaming
                  answer, without the connector's work)
  direct_leg      client -> prefill engine, the prefill leg's body (non-streaming, no token ids)
  direct_leg_ids  the same with `return_token_ids` (the prefill leg before 2026-12-07 evening)
  sidecar_ft      client -> decode sidecar (first token from the prefill leg; the
                  continuation's prompt ids from the decode engine's /tokenize)
  sidecar_ft_pids the same through a second decode sidecar with `--first-token-ids prefill`
For each: the client's time to the first byte, the prefill engine's own e2e for the
request (metrics delta), `path` = client time - the prefill engine's e2e of the same request
(what the hops and API servers add, without the engine's compute noise), and for the sidecar
variants the sidecars' histograms. Also micro timings of the JSON work on a real prefill
answer. The prefill engine's lease is 5 s here (`kv_lease_s`): the direct legs' KV is never
read, and 8k-token leases of 30 s would fill the probe's small KV cache.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import statistics
import time
import timeit

import aiohttp

from bench.e2e import write_json
from bench.e2e_breakdown import _hist, delta, snapshot
from bench.e2e_workload import Vocabulary


def leg_body(client: dict, ids: bool = False) -> dict:
    """The body the decode sidecar sends as the prefill leg (proxy.body.prefill_body, as
    sent with --first-token-from-prefill): non-streaming, one token; `ids`: token ids back."""
    b = {**client, "stream": False, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    return {**b, "return_token_ids": True} if ids else b


async def timed(s: aiohttp.ClientSession, url: str, body: dict) -> float:
    """Seconds to the first byte of a streamed answer, or to the whole of another."""
    t = time.perf_counter()
    async with s.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {(await r.text())[:300]}")
        if body.get("stream"):
            async for _ in r.content.iter_any():
                break
            t1 = time.perf_counter()
            await r.read()
        else:
            await r.read()
            t1 = time.perf_counter()
    return t1 - t


def micro(raw: bytes, raw_ids: bytes) -> dict[str, float]:
    """Seconds per call of the JSON work a prefill answer costs a sidecar (`raw`: as sent
    now, `raw_ids`: with the prompt's token ids)."""
    import hashlib

    import msgspec
    ids = json.loads(raw_ids)["choices"][0]["prompt_token_ids"]
    fns = {
        "json.loads(answer)": lambda: json.loads(raw),
        "msgspec decode(answer)": lambda: msgspec.json.decode(raw),
        "msgspec decode(answer with ids)": lambda: msgspec.json.decode(raw_ids),
        "sha256 of ids (pd_prompt_sha256)": lambda: hashlib.sha256(msgspec.json.encode(ids)).hexdigest(),
        "ids check genexpr": lambda: all(type(x) is int and x >= 0 for x in ids),
        "ids check set(map(type))": lambda: set(map(type, ids)) <= {int} and min(ids) >= 0,
        "json.dumps(ids)": lambda: json.dumps(ids),
        "msgspec encode(ids)": lambda: msgspec.json.encode(ids),
    }
    return {k: timeit.timeit(f, number=200) / 200 for k, f in fns.items()}


async def timed_with_tokenize(s: aiohttp.ClientSession, url: str, body: dict, tok_url: str) -> float:
    """`timed`, while `tok_url` tokenizes the same prompt."""
    tok = asyncio.ensure_future(s.post(tok_url, json={"model": body["model"], "prompt": body["prompt"]}))
    try:
        return await timed(s, url, body)
    finally:
        (await tok).release()


async def run(args, p, dec, sc) -> dict:
    """All lengths of `args.tokens` on the same engines, one after another."""
    voc = Vocabulary.from_model(args.model)
    rng = random.Random(7)
    srcs = {"decode_sidecar": sc.decode_url, "prefill_sidecar": sc.prefill_url, "prefill_engine": p.url,
            "decode_sidecar2": sc.decode2.url}
    async with aiohttp.ClientSession() as s:
        res = {"tokens": args.tokens, "n": args.n, "model": args.model, "by_tokens": {}}
        for tokens in args.tokens:
            res["by_tokens"][str(tokens)] = await one_length(args, s, voc, rng, tokens, p, dec, sc, srcs)
            if args.json:  # after each length, atomically: a run cut short keeps what finished
                write_json(args.json, res)
    return res


async def one_length(args, s: aiohttp.ClientSession, voc, rng, tokens: int, p, dec, sc, srcs) -> dict:
    names = ["direct_stream", "direct_stream_tok", "direct_stream_kv", "direct_leg_plain", "direct_leg",
             "direct_leg_ids", "sidecar_ft", "sidecar_ft_pids"]
    out: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(args.warmup + args.n):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            client = {"model": p.model_name, "prompt": voc.prompt(tokens, rng), "max_tokens": 4,
                      "temperature": 0, "stream": True}
            url, body = {"direct_stream": (p.url + "/v1/completions", {**client, "max_tokens": 1}),
                         "direct_stream_tok": (p.url + "/v1/completions", {**client, "max_tokens": 1}),
                         "direct_stream_kv": (p.url + "/v1/completions",
                                              {**client, "max_tokens": 1,
                                               "kv_transfer_params": {"do_remote_decode": True}}),
                         "direct_leg_plain": (p.url + "/v1/completions",
                                              {**client, "max_tokens": 1, "stream": False}),
                         "direct_leg": (p.url + "/v1/completions", leg_body(client)),
                         "direct_leg_ids": (p.url + "/v1/completions", leg_body(client, ids=True)),
                         "sidecar_ft": (sc.decode_url + "/v1/completions", client),
                         "sidecar_ft_pids": (sc.decode2.url + "/v1/completions", client)}[name]
            before = await asyncio.to_thread(snapshot, srcs)
            t = (await timed_with_tokenize(s, url, body, dec.url + "/tokenize") if name == "direct_stream_tok"
                 else await timed(s, url, body))
            await asyncio.sleep(0.3)  # let the engines publish the request's stats
            after = await asyncio.to_thread(snapshot, srcs)
            d = {k: v["sum"] for k, v in delta(before, after).items() if v["count"] == 1}
            for src, lab, role in (("prefill_sidecar", "prefill", "prefill"), ("decode_sidecar", "decode", "decode"),
                                   ("decode_sidecar2", "decode2", "decode")):
                fam = "pd_sidecar_overhead_seconds"
                d[f"{lab}_sc_overhead"] = (_hist(after[src], fam, {"role": role}, "sum")
                                           - _hist(before[src], fam, {"role": role}, "sum"))
            d["client"] = t
            if "p_e2e" in d:
                d["path"] = t - d["p_e2e"]
            if i >= args.warmup:
                out[name].append(d)
    raw = await (await s.post(p.url + "/v1/completions", json=leg_body(client))).read()
    raw_ids = await (await s.post(p.url + "/v1/completions", json=leg_body(client, ids=True))).read()
    res: dict = {"tokens": tokens, "n": args.n, "variants": {}}
    for name, recs in out.items():
        keys = sorted({k for r in recs for k in r})
        res["variants"][name] = {k: statistics.median(r[k] for r in recs if k in r) * 1e3 for k in keys}
    base = [r["client"] for r in out["direct_stream"]]
    for name in ("sidecar_ft", "sidecar_ft_pids"):  # ratio of medians, client TTFT, same run
        res["variants"][name]["ratio_to_direct_stream"] = (statistics.median(r["client"] for r in out[name])
                                                           / statistics.median(base))
    res["answer_bytes"] = len(raw)
    res["answer_bytes_with_ids"] = len(raw_ids)
    res["micro_ms"] = {k: v * 1e3 for k, v in micro(raw, raw_ids).items()}
    return res


def summary(res: dict) -> str:
    """Medians per length and variant (ms): client TTFB, prefill engine e2e and compute, path."""
    lines = []
    for tokens, r in res["by_tokens"].items():
        lines.append(f"{tokens} tokens, n={r['n']}: variant client / p_e2e / p_compute / path (ms)")
        for name, v in r["variants"].items():
            ratio = v.get("ratio_to_direct_stream")
            lines.append(f"  {name:18s} " + " / ".join(f"{v.get(k, float('nan')):7.2f}"
                                                       for k in ("client", "p_e2e", "p_compute", "path"))
                         + (f"   ratio {ratio:.3f}" if ratio is not None else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=lambda v: [int(x) for x in v.split(",")], default=[8064],
                    help="prompt lengths, comma-separated (each on the same engines, in turn)")
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gpu-util", type=float, default=None)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--log-dir", default="/tmp/ttft-hops")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from pdsidecar.dev.engines import EngineConfig, start_engines
    from pdsidecar.dev.local import connector_config
    from pdsidecar.dev.local_sidecars import start_sidecars
    from pdsidecar.dev.procs import cpu_slices, free_port

    _, base = connector_config("ours")
    configs = []
    for role, bind in zip(("prefill", "decode"), cpu_slices(2)):
        cfg = copy.deepcopy(base)
        cfg["kv_connector_extra_config"]["control_port"] = free_port()
        cfg["kv_connector_extra_config"]["kv_lease_s"] = 5.0
        gpu = args.gpu_util is not None
        configs.append(EngineConfig(model=args.model, name=role, kv_transfer_config=cfg,
                                    cpu_bind=None if gpu else bind, pin_process=not gpu,
                                    max_model_len=args.max_model_len, log_dir=args.log_dir,
                                    extra_args=["--gpu-memory-utilization", str(args.gpu_util)] if gpu else []))
    engines = start_engines(configs, sequential=args.gpu_util is not None)
    try:
        sc = start_sidecars(engines[0], engines[1], extra_decode_args=["--first-token-from-prefill", "all"],
                            second_decode_args=["--first-token-ids", "prefill"])
        try:
            res = asyncio.run(run(args, engines[0], engines[1], sc))
        finally:
            sc.stop()
    finally:
        for e in engines:
            e.stop()
    if not args.json:
        print(json.dumps(res, indent=1))
    print(summary(res))


if __name__ == "__main__":
    main()
