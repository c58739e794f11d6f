"""``pdbench e2e``: P/D disaggregation vs aggregated serving, real engines, one run.

Starts each configuration in turn (never two at once), sends it the same workload
through the OpenAI streaming API and measures TTFT, ITL, TPOT and end-to-end latency per
request, plus the KV bytes and transfer time the decode engine reports:

* ``agg``       one vLLM engine pinned to all the cores the P/D pair uses together
* ``pd-ours``   prefill + decode engines (one core slice each), our ``PdConnector``,
                a prefill and a decode ``pdsidecar`` in front
* ``pd-ours-ft``  ``pd-ours`` with the decode sidecar's ``--first-token-from-prefill all``:
                the client's first token comes from the prefill leg (docs/sidecar.md 6a)
* ``pd-stock``  the same with vLLM's stock ``NixlConnector``
* ``pd-ours-push`` / ``pd-stock-push``  push mode: ours (layer-wise WRITEs, both legs at
                once) and vLLM's ``NixlPushConnector`` (WRITE after the prefill)
* ``pd-ours-pods``  ``deploy/overlays/dev-cpu`` as network-namespace pods (root): the
                prefill and decode pods each with its own IP, KV crossing pods over UCX;
                the client talks to the decode pod from the node side of the pod bridge

The default workload is mixed: short, decode-heavy requests while long-prompt requests
arrive (Poisson, ``--rate``), which is where P/D helps (decode ITL stays flat) and where
it costs (TTFT of short prompts pays a second hop). A "where TTFT goes" table splits each
TTFT over the hops from the sidecars' and engines' own metrics (bench.e2e_breakdown). The
JSON is rewritten after every configuration; ``--config-timeout`` bounds each one. Run it
under the engine lock:

    flock /tmp/pdsidecar-engines.lock pdbench e2e --json e2e.json --plot bench/results/e2e
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e_load import sweep_summary  # noqa: E402
from bench.e2e_plan import PROG, make_plan  # noqa: E402
from bench.e2e_run import execute, finalize  # noqa: E402
from bench.e2e_workload import UsageError  # noqa: E402


# ============================================================================ CLI
def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("configurations")
    g.add_argument("--configs", default="agg,pd-ours,pd-stock",
                   help="comma list of agg, agg-sc (agg behind a decode sidecar with no prefill peer), pd-ours, pd-ours-ft (first token from the prefill leg), pd-ours-push, pd-stock (vLLM's NixlConnector), "
                        "pd-stock-push (vLLM's NixlPushConnector), pd-ours-pods (root: dev-cpu overlay across "
                        "network-namespace pods) (default: agg,pd-ours,pd-stock, run one after another)")
    g.add_argument("--gpu-util", default=None,
                   help="run the engines on the GPU, each with --gpu-memory-utilization GPU_UTIL (a P/D pair "
                        "shares the one GPU; engines start one after another); default: CPU engines")
    g.add_argument("--gpu-sm-share", default=None, metavar="PREFILL,DECODE",
                   help="GPU only: run every engine as a client of a running CUDA MPS daemon, a P/D pair's "
                        "prefill and decode engines limited to these percentages of the SMs "
                        "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; e.g. 60,40), an aggregated engine to all of "
                        "them: compute isolation of two engines on one GPU")
    g.add_argument("--arch", default="llama", help="tiny generated model when --model is not given: llama|mixtral")
    g.add_argument("--model", default=None, help="model folder (default: the generated tiny model in the cache)")
    g.add_argument("--max-model-len", default="4096", help="engines' --max-model-len (default 4096)")
    g.add_argument("--startup-timeout", default="300", help="seconds to wait for each engine (default 300)")
    g.add_argument("--log-dir", default=None, help="engine and sidecar logs (default: a temp dir)")
    g.add_argument("--sidecar-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the decode sidecar (repeatable), e.g. --sidecar-arg=--reuse-token-ids=off")
    c = p.add_argument_group("connect to running services instead of starting engines")
    c.add_argument("--agg-url", default=None, help="an aggregated vLLM (or sidecar) URL: config 'agg'")
    c.add_argument("--decode-url", default=None, help="a decode sidecar URL: config --pd-label")
    c.add_argument("--prefill-url", default=None, help="its prefill sidecar URL (recorded, metrics read)")
    c.add_argument("--decode-engine-url", default=None, help="the decode vLLM URL, for KV figures from its /metrics")
    c.add_argument("--prefill-engine-url", default=None,
                   help="the prefill vLLM URL, for its request metrics in the 'where TTFT goes' table")
    c.add_argument("--pd-label", default="pd", help="name of the --decode-url configuration (default pd)")
    c.add_argument("--model-name", default=None, help="served model name (default: asked from /v1/models)")
    w = p.add_argument_group("workload")
    w.add_argument("--prompt-len", default="uniform:32-96", help="short requests' prompt tokens: fixed:N|uniform:A-B")
    w.add_argument("--output-len", default="fixed:64", help="short requests' output tokens (default fixed:64)")
    w.add_argument("--long-prompt-len", default="uniform:1536-2048",
                   help="long requests' prompt tokens (default uniform:1536-2048)")
    w.add_argument("--long-output-len", default="fixed:4", help="long requests' output tokens (default fixed:4)")
    w.add_argument("--long-fraction", default="0.25", help="share of long requests, 0..1 (0: no long requests)")
    w.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help="prompts file: one {\"prompt\": str, \"max_tokens\": int?} per line (replaces the lengths)")
    w.add_argument("--rate", default=None, help="Poisson arrivals, requests/s (default 2 unless --concurrency)")
    w.add_argument("--concurrency", default=None, help="closed loop with C requests in flight instead of --rate")
    w.add_argument("--num-requests", default=None, help="measured requests per configuration (default 32)")
    w.add_argument("--duration", default=None, help="seconds of load per configuration instead of --num-requests")
    w.add_argument("--warmup", default="2", help="unmeasured requests per configuration first (default 2)")
    w.add_argument("--seed", default="0")
    w.add_argument("--request-timeout", default="120", help="seconds per request (default 120)")
    w.add_argument("--config-timeout", default="600",
                   help="seconds of load + sweep per configuration (engine start-up not counted: --startup-timeout); "
                        "past it the configuration is stopped, recorded as 'timeout' with the requests done so far, "
                        "and the next one runs (default 600)")
    s = p.add_argument_group("prompt-length sweep")
    s.add_argument("--sweep-tokens", default=None,
                   help="comma list of prompt lengths (e.g. 128,512,2048): after the workload, sequential requests "
                        "at each length; prints the slope (ms per 1k tokens) and R² of TTFT and KV transfer time")
    s.add_argument("--sweep-n", default="3", help="requests per sweep length (default 3)")
    s.add_argument("--sweep-output", default="4", help="output tokens of sweep requests (default 4)")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE", help="write every number and request to FILE")
    o.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots to DIR (matplotlib)")
    o.add_argument("--title", default=None, help="plot title suffix (default: machine and model)")
    o.add_argument("--report", default=None, metavar="FILE",
                   help="no engines: re-print the tables (and --plot) from a saved --json FILE")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.add_argument("--strict", action="store_true", help="exit 1 when any configuration is unavailable")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``e2e`` on the ``pdbench`` sub-command parser."""
    p = subparsers.add_parser("e2e", help="disaggregated vs aggregated serving on real engines",
                              description=__doc__.split("\n\n")[0])
    _configure(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point for ``pdbench e2e``; returns the exit status."""
    from bench.e2e_report import format_tables

    if args.report:
        return report_only(args)
    def partial(result: dict[str, Any]) -> None:
        # after each configuration: the tables so far, and the JSON rewritten (marked partial)
        # so a run killed later keeps what finished
        print(format_tables(result) + "\n(partial: configurations still to run: "
              + ", ".join(n for n in result["meta"]["configs_planned"] if n not in result["configs"]) + ")\n",
              flush=True)
        if plan.json_path:
            write_json(plan.json_path, result)

    try:
        plan = make_plan(args)
        result = execute(plan, partial)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(format_tables(result))
    if plan.json_path:
        write_json(plan.json_path, result)
        print(f"\njson: {plan.json_path}")
    if plan.plot_dir:
        from bench.e2e_plots import write_plots

        for f in write_plots(result, plan.plot_dir):
            print(f"plot: {f}")
    ok = [n for n, c in result["configs"].items() if c.get("status") == "ok"]
    if not ok:
        return 1
    if plan.strict and len(ok) < len(result["configs"]):
        return 1
    return 0


def write_json(path: str, result: dict[str, Any]) -> None:
    """Atomic rewrite: a reader (or a kill) never sees half a file."""
    import os
    import tempfile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(result, indent=1, default=str) + "\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report_only(args: argparse.Namespace) -> int:
    from bench.e2e_report import format_tables

    try:
        result = json.loads(Path(args.report).read_text())
        cfgs = result["configs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"{PROG}: error: cannot read report {args.report}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    from bench.e2e_breakdown import medians
    from bench.e2e_report import is_push

    for name, c in cfgs.items():
        if c.get("sweep"):
            c["sweep"] = sweep_summary(c["sweep"]["requests"], push=is_push(name, c))
        bm = medians(c.get("requests") or [])
        if bm:
            c["breakdown_median"] = bm
        k = c.get("kv") or {}
        if is_push(name, c) and k.get("gbps") is not None:
            k["gbps"] = None  # saved by an older pdbench: the push KV tail is not a transfer time
            k["seconds_meaning"] = "push KV tail: wait after the prefill's last layer, not a transfer time"
    finalize(result)
    print(format_tables(result))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        from bench.e2e_plots import write_plots

        for f in write_plots(result, args.plot):
            print(f"plot: {f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    _configure(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
