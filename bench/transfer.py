"""``pdbench transfer``: KV block transfer sweep (our engines vs raw NIXL vs torch).

A target process (spawned) owns a paged cache ``[layers, pool_blocks, block_bytes]``;
this process is the initiator with a cache of the same shape. For every shape
(block bytes x blocks per request x layers), op (read/write) and backend it runs
``--iters`` transfers of random non-contiguous block ids and prints a nixlbench-like
table. Backends:

* ``nixl``      our NixlTransferEngine (prepped descriptor lists + index arrays)
* ``raw-nixl``  baseline: plain nixl_agent, one descriptor per block per layer built
                from tuples, ``initialize_xfer`` per transfer
* ``ipc``       our CUDA IPC engine, one Triton launch per layer group (VRAM)
* ``ipc-torch`` our CUDA IPC engine, torch index_select/index_copy_ per layer (VRAM)
* ``torch``     baseline: in-process torch copy of the same blocks (no peer)
* ``memcpy``    reference: one contiguous device-to-device ``copy_`` of the same
                byte count (the copy-bandwidth ceiling; VRAM only, no peer)

``ipc`` also records CUDA events around its work: ``dev us`` is that device time
(id upload + copy kernel), next to the host wall-clock latency.

``--prepare-only`` (nixl, raw-nixl) builds every transfer and releases it unposted:
nothing moves, so ``prep us`` is the CPU cost of preparing alone, without the cache
and scheduling after-effects of the previous transfer (latency columns are then
prepare + release, not transfers).

Run standalone: ``python -m bench.transfer --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from bench.transfer_plan import ALL_BACKENDS, MODELS, UsageError, make_plan
from bench.transfer_report import format_table, plot, ratios
from bench.transfer_sweep import run_plan


# ----------------------------------------------------------------------------- CLI
def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--mem", default="DRAM", help="DRAM or VRAM (default DRAM)")
    p.add_argument("--backends", default="",
                   help=f"comma list of {','.join(ALL_BACKENDS)} "
                        "(default: DRAM nixl,raw-nixl,torch; VRAM ipc,ipc-torch,nixl,raw-nixl,torch)")
    p.add_argument("--ops", default="read,write", help="comma list of read,write")
    p.add_argument("--block-bytes", default="65536", help="bytes per block per layer (list)")
    p.add_argument("--blocks", default="1,16,64,256", help="blocks per request (list)")
    p.add_argument("--layers", default="1,8", help="layers per request (list)")
    p.add_argument("--model", default="",
                   help=f"{'|'.join(MODELS)}|FILE.json: real shapes (with --tokens)")
    p.add_argument("--tokens", default="", help="tokens per request (list) with --model")
    p.add_argument("--iters", default="30", help="timed transfers per case")
    p.add_argument("--warmup", default="3", help="untimed transfers per case")
    p.add_argument("--max-seconds", default="3", help="stop a case after this long")
    p.add_argument("--protocol", default="rdma", help="NIXL protocol: rdma or tcp")
    p.add_argument("--timeout", default="30", help="seconds before a transfer counts as hung")
    p.add_argument("--seed", default="0")
    p.add_argument("--json", default="", help="write all results to this JSON file")
    p.add_argument("--plot", default="", help="write a GB/s plot (PNG, needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--prepare-only", action="store_true",
                   help="nixl, raw-nixl: build each transfer and release it unposted "
                        "(times prepare alone; nothing moves)")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``transfer`` on the ``pdbench`` sub-command parser."""
    p = subparsers.add_parser("transfer", help="KV block transfer benchmark",
                              description=__doc__.split("\n\n")[0])
    _configure(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point for ``pdbench transfer``; returns the exit status."""
    try:
        plan = make_plan(args)
    except UsageError as e:
        print(f"pdbench transfer: error: {e}", file=sys.stderr)
        return 2
    try:
        rows = run_plan(plan)
    except KeyboardInterrupt:
        print("pdbench transfer: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"pdbench transfer: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_table(rows))
    rl = ratios(rows)
    if rl:
        print("\nratios (same run):")
        print("\n".join("  " + x for x in rl))
    if plan.prepare_only:
        plan.notes.append("--prepare-only: transfers built and released unposted; nothing "
                          "moved (GB/s and latency columns are not transfers)")
    if plan.notes:
        print("\nnotes:")
        print("\n".join("  " + x for x in plan.notes))
    if plan.json:
        meta = _environment()
        with open(plan.json, "w") as f:
            json.dump({"env": meta, "results": rows, "ratios": rl, "notes": plan.notes},
                      f, indent=1)
    if plan.plot:
        print(plot(rows, plan.plot), file=sys.stderr)
    return 1 if any("gbps" not in r for r in rows) else 0


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        from importlib.metadata import version
        env["nixl"] = version("nixl")
    except Exception:
        pass
    return env


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = _configure(_OneLineParser(prog="pdbench transfer", description=__doc__.split("\n\n")[0]))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
