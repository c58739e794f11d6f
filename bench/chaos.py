"""`pdbench chaos`: reliability and security suite on a real local P/D stack.

Starts a prefill and a decode vLLM engine, both sidecars (real `pdsidecar run`
subprocesses) and a loopback fault proxy between the sidecars, then runs load, faults,
leak checks, hostile input and drain scenarios (bench/chaos_scenarios.py lists them) and prints one
table: scenario, requests, completed, errors by kind, hung, leaked KV blocks, result.

    pdbench chaos --profile short            # CI, a few minutes
    pdbench chaos --profile full --json chaos.json
    python -m bench.chaos --only load,hostile

Run engines under the shared lock on small machines:
`flock /tmp/pdsidecar-engines.lock pdbench chaos ...`. All traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench.chaos_load import Result
from bench.chaos_scenarios import SCENARIOS
from bench.chaos_stack import PROFILES, ChaosStack, StackOptions, chaos_engine_configs


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chaos", help="reliability/security suite: load, faults, leaks, hostile input, drain",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=sorted(PROFILES), default="short")
    p.add_argument("--connector", choices=["stock", "ours"], default="stock",
                   help="KV connector of both engines (ours: pdsidecar.dev.local.connector_config('ours'))")
    p.add_argument("--model", default=None, help="model folder (default: the generated tiny Llama)")
    p.add_argument("--only", default=None, help="comma-separated scenario names (default: all)")
    p.add_argument("--skip", default=None, help="comma-separated scenario names to skip")
    p.add_argument("--json", dest="json_path", default=None, help="write results here")
    p.add_argument("--log-dir", default=None, help="engine and sidecar logs (default: a temp dir)")
    p.add_argument("--list", action="store_true", help="list scenarios and exit")


def format_table(results: list[Result]) -> str:
    rows = [("scenario", "requests", "completed (not disagg)", "errors by kind", "hung", "leaked KV blocks (+pending)",
             "result")]
    for r in results:
        errs = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        leak = "-" if r.leaked_blocks is None else str(r.leaked_blocks)
        if r.pending_left:
            leak += f" (+{r.pending_left} pending)"
        done = str(r.completed)
        via = {k: v for k, v in r.paths.items() if k not in ("disagg", "-")}
        if via:
            done += " (" + ", ".join(f"{k} {v}" for k, v in via.items()) + ")"
        rows.append((r.scenario, str(r.requests), done, errs, str(r.hung), leak, r.result))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _model(args) -> str:
    if args.model:
        return args.model
    from pdsidecar.dev.local import DEFAULT_CACHE
    from pdsidecar.dev.tiny_models import ensure_model

    return str(ensure_model("llama", DEFAULT_CACHE / "models" / "tiny-llama"))


async def run_scenarios(stack: ChaosStack, names: list[str], profile_name: str, echo=print) -> list[Result]:
    prof = PROFILES[profile_name]
    results = []
    for name, fn in SCENARIOS:
        if name not in names:
            continue
        await asyncio.to_thread(stack.ensure_up)
        t0 = time.monotonic()
        try:
            res = await fn(stack, prof)
        except Exception as e:  # a scenario that blows up is a FAIL row, not a crash
            res = Result(name, result="FAIL", notes=[f"scenario error: {type(e).__name__}: {e}"])
        if not res.seconds:
            res.seconds = round(time.monotonic() - t0, 1)
        results.append(res)
        echo(f"[chaos] {name}: {res.result} ({res.completed}/{res.requests} ok, {res.seconds}s)"
             + (f" - {'; '.join(res.notes)}" if res.notes else ""), flush=True)
    return results


def run(args: argparse.Namespace) -> int:
    all_names = [n for n, _ in SCENARIOS]
    if args.list:
        for n, fn in SCENARIOS:
            print(f"{n:26s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    names = all_names if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in all_names]
    if unknown:
        print(f"pdbench chaos: unknown scenario(s) {unknown}; see --list", file=sys.stderr)
        return 2
    if args.skip:
        names = [n for n in names if n not in args.skip.split(",")]
    from pdsidecar.dev.engines import start_engines, vllm_available

    if not vllm_available():
        print("pdbench chaos: vLLM is not installed (scripts/setup.sh)", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdbench-chaos-"))
    opts = StackOptions()
    model = _model(args)
    t0 = time.monotonic()
    print(f"[chaos] profile {args.profile}, connector {args.connector}, model {model}, logs {log_dir}", flush=True)
    engines = start_engines(chaos_engine_configs(model, args.connector, str(log_dir), opts))
    stack = ChaosStack(engines, log_dir / "sidecars", opts)
    try:
        stack.start()
        results = asyncio.run(run_scenarios(stack, names, args.profile))
    finally:
        stack.close()
        for e in engines:
            e.stop()
    print()
    print(format_table(results))
    failed = [r.scenario for r in results if r.result != "PASS"]
    print(f"\n{len(results) - len(failed)}/{len(results)} scenarios passed in {time.monotonic() - t0:.0f}s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json_path:
        meta = {"profile": args.profile, "connector": args.connector, "model": model,
                "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
                "load_avg_at_end": os.getloadavg(), "seconds": round(time.monotonic() - t0, 1)}
        Path(args.json_path).write_text(json.dumps({"meta": meta, "results": [r.as_dict() for r in results]},
                                                   indent=2))
    return 0 if not failed else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
