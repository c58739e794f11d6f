"""``pdbench e2e``: the command line checked and turned into a :class:`Plan`
(configurations, workload, timeouts, outputs); bad values raise ``UsageError``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.e2e_workload import UsageError, Workload, load_prompts, parse_dist


CONFIGS = ("agg", "agg-sc", "pd-ours", "pd-ours-ft", "pd-ours-push", "pd-stock", "pd-stock-push", "pd-ours-pods")
PROG = "pdbench e2e"


@dataclass
class Plan:
    configs: list[str]
    connect: dict[str, dict[str, Any]]
    model_dir: str | None
    arch: str
    workload: Workload
    rate: float | None
    concurrency: int | None
    num_requests: int | None
    duration: float | None
    warmup: int
    seed: int
    request_timeout: float
    startup_timeout: float
    max_model_len: int
    sweep_tokens: list[int]
    sweep_n: int
    sweep_output: int
    json_path: str | None
    plot_dir: str | None
    title: str | None
    progress: bool
    strict: bool
    log_dir: str | None
    sidecar_args: list[str]
    model_name: str | None
    gpu_util: float | None = None
    config_timeout: float = 600.0
    sm_share: tuple[int, int] | None = None  # CUDA MPS: prefill, decode engines' % of the SMs
    arrivals: list[float] = field(default_factory=list)


def _num(v: str | None, name: str, kind: type = float, lo: float | None = None, lo_open: bool = False):
    if v is None:
        return None
    try:
        x = kind(v)
    except (TypeError, ValueError):
        raise UsageError(f"--{name}: expected {'an integer' if kind is int else 'a number'}, got {v!r}") from None
    if kind is float and (x != x or x in (float("inf"), float("-inf"))):
        raise UsageError(f"--{name}: expected a finite number, got {v!r}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise UsageError(f"--{name}: must be {'>' if lo_open else '>='} {lo:g}, got {v}")
    return x


def _url(v: str | None, name: str) -> str | None:
    if v is None:
        return None
    if not v.startswith(("http://", "https://")):
        raise UsageError(f"--{name}: expected an http(s):// URL, got {v!r}")
    return v.rstrip("/")


def make_plan(args: argparse.Namespace) -> Plan:
    connect: dict[str, dict[str, Any]] = {}
    agg_url, dec_url = _url(args.agg_url, "agg-url"), _url(args.decode_url, "decode-url")
    pre_url, eng_url = _url(args.prefill_url, "prefill-url"), _url(args.decode_engine_url, "decode-engine-url")
    peng_url = _url(args.prefill_engine_url, "prefill-engine-url")
    if (pre_url or eng_url or peng_url) and not dec_url:
        raise UsageError("--prefill-url/--decode-engine-url/--prefill-engine-url need --decode-url (the decode sidecar)")
    if agg_url:
        connect["agg"] = {"url": agg_url}
    if dec_url:
        label = args.pd_label.strip()
        if not label or label == "agg" or "," in label:
            raise UsageError(f"--pd-label: bad name {args.pd_label!r}")
        connect[label] = {"url": dec_url, "prefill_url": pre_url, "engine_url": eng_url, "prefill_engine_url": peng_url}
    if connect:
        configs = list(connect)
    else:
        configs = [c.strip() for c in str(args.configs).split(",") if c.strip()]
        bad = [c for c in configs if c not in CONFIGS]
        if bad:
            raise UsageError(f"--configs: unknown configuration {bad[0]!r}: choose from {', '.join(CONFIGS)}")
        if not configs:
            raise UsageError("--configs: empty list")
        configs = list(dict.fromkeys(configs))
    if args.arch not in ("llama", "mixtral"):
        raise UsageError(f"--arch: unknown architecture {args.arch!r}: choose llama or mixtral")

    rate = _num(args.rate, "rate", float, 0, lo_open=True)
    conc = _num(args.concurrency, "concurrency", int, 1)
    if rate is not None and conc is not None:
        raise UsageError("--rate and --concurrency exclude each other: pick one")
    if rate is None and conc is None:
        rate = 2.0
    nreq = _num(args.num_requests, "num-requests", int, 0)
    dur = _num(args.duration, "duration", float, 0, lo_open=True)
    if nreq is not None and dur is not None:
        raise UsageError("--num-requests and --duration exclude each other: pick one")
    if nreq is None and dur is None:
        nreq = 32
    warm = _num(args.warmup, "warmup", int, 0)
    seed = _num(args.seed, "seed", int)
    rto = _num(args.request_timeout, "request-timeout", float, 0, lo_open=True)
    cto = _num(args.config_timeout, "config-timeout", float, 0, lo_open=True)
    sto = _num(args.startup_timeout, "startup-timeout", float, 0, lo_open=True)
    mml = _num(args.max_model_len, "max-model-len", int, 16)
    lf = _num(args.long_fraction, "long-fraction", float, 0)
    if lf > 1:
        raise UsageError(f"--long-fraction: must be between 0 and 1, got {args.long_fraction}")
    dists = {}
    for name in ("prompt_len", "output_len", "long_prompt_len", "long_output_len"):
        try:
            dists[name] = parse_dist(getattr(args, name))
        except UsageError as e:
            raise UsageError(f"--{name.replace('_', '-')}: {e}") from None
    sweep: list[int] = []
    if args.sweep_tokens:
        try:
            sweep = [int(x) for x in args.sweep_tokens.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--sweep-tokens: expected comma-separated integers, got {args.sweep_tokens!r}") from None
        if not sweep or min(sweep) < 1:
            raise UsageError(f"--sweep-tokens: lengths must be >= 1, got {args.sweep_tokens!r}")
    sweep_n = _num(args.sweep_n, "sweep-n", int, 1)
    sweep_out = _num(args.sweep_output, "sweep-output", int, 1)
    items = load_prompts(args.prompts) if args.prompts else None
    if args.model is not None and not Path(args.model, "config.json").is_file():
        raise UsageError(f"--model: {args.model} is not a model folder (no config.json); "
                         f"make one with `pdsidecar models make --out {args.model}`")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'pdsidecar[bench]'") from None
    for opt in ("json", "plot"):
        val = getattr(args, opt)
        if val:
            parent = Path(val).parent if opt == "json" else Path(val)
            probe = parent if parent.exists() else parent.parent
            if probe.exists() and not os.access(probe, os.W_OK):
                raise UsageError(f"--{opt}: cannot write to {val}")
    wl = Workload(seed, dists["prompt_len"], dists["output_len"], dists["long_prompt_len"] if lf > 0 else None,
                  dists["long_output_len"], lf, None, items)
    if wl.max_total_tokens() > mml:
        raise UsageError(f"prompt + output tokens reach {wl.max_total_tokens()} > --max-model-len {mml}")
    if sweep and max(sweep) + sweep_out > mml:
        raise UsageError(f"--sweep-tokens: {max(sweep)} + {sweep_out} output tokens > --max-model-len {mml}")
    gpu = _num(args.gpu_util, "gpu-util", float, 0, lo_open=True)
    if gpu is not None and gpu > 0.5:
        raise UsageError(f"--gpu-util: a P/D pair shares one GPU, so at most 0.5, got {args.gpu_util}")
    share = _sm_share(args.gpu_sm_share, gpu)
    return Plan(configs, connect, args.model, args.arch, wl, rate, conc, nreq, dur, warm, seed, rto, sto, mml,
                sweep, sweep_n, sweep_out, args.json, args.plot, args.title, not args.no_progress, args.strict,
                args.log_dir, list(args.sidecar_arg), args.model_name, gpu, cto, share)


def mps_pipe_dir() -> str:
    """Where CUDA clients look for the MPS control daemon (CUDA's default unless set)."""
    return os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"


def _sm_share(v: str | None, gpu: float | None) -> tuple[int, int] | None:
    """`--gpu-sm-share PREFILL,DECODE`: two percentages in 1..100, GPU engines, a running
    MPS daemon (its control pipe in `mps_pipe_dir()`)."""
    if v is None:
        return None
    if gpu is None:
        raise UsageError("--gpu-sm-share needs --gpu-util (GPU engines)")
    parts = v.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and 1 <= int(p) <= 100 for p in parts):
        raise UsageError(f"--gpu-sm-share: expected PREFILL,DECODE percentages in 1..100, got {v!r}")
    pipe = Path(mps_pipe_dir()) / "control"
    if not pipe.exists():
        raise UsageError(f"--gpu-sm-share: no CUDA MPS daemon ({pipe} is missing); start one with "
                         "`nvidia-cuda-mps-control -d` (same CUDA_MPS_PIPE_DIRECTORY)")
    return int(parts[0]), int(parts[1])
