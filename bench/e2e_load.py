"""``pdbench e2e``: the load generator: streamed OpenAI requests (TTFT, ITL, TPOT),
Poisson or closed-loop arrivals, the prompt-length sweep and its fits."""

from __future__ import annotations

import asyncio
import inspect
import statistics
import sys
import time
from typing import Any

from bench import e2e_breakdown as breakdown
from bench.e2e_metrics import kv_figures, kv_sub, scrape, settled_kv
from bench.e2e_plan import Plan
from bench.e2e_targets import Target
from bench.e2e_workload import RequestSpec, sweep_request


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


def one_line(e: BaseException) -> str:
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
        rec["error"] = one_line(e)
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


class LoadState:
    """What a load (or sweep) has done so far: kept by the caller, so a configuration stopped
    by ``--config-timeout`` still reports the requests that finished."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.t0: float | None = None
        self.t_end: float | None = None
        self.snap0: tuple | None = None  # (decode sidecar, decode engine KV, breakdown snapshot) after warm-up

    def wall(self) -> float:
        """Seconds from the first measured request to the last one's end (or to now)."""
        if self.t0 is None:
            return 0.0
        return (self.t_end or time.perf_counter()) - self.t0


async def _with_kv(client, target: Target, spec: RequestSpec, timeout: float) -> dict[str, Any]:
    """A request sent alone, with the decode engine's KV figures and every hop's metrics
    (bench.e2e_breakdown) read around it."""
    srcs = breakdown.sources(target)
    before = await settled_kv(target.kv_url or target.engine_kv_url)
    bd0 = await asyncio.to_thread(breakdown.snapshot, srcs)
    rec = await send(client, target.model, spec, timeout)
    if rec.get("error") is None:
        bd1 = await breakdown.settled_snapshot(srcs, bd0)
        b = breakdown.means(breakdown.delta(bd0, bd1))
        b.update(breakdown.derived(b, target.layerwise_push, rec.get("ttft_s")))
        rec["breakdown"] = b
    if (target.kv_url or target.engine_kv_url) and rec.get("error") is None:
        after = None
        # the engine publishes connector stats with its next stats push: wait briefly for them
        for _ in range(10):
            after = await asyncio.to_thread(kv_figures, target.kv_url or target.engine_kv_url)
            if after and before and after["transfers"] > before["transfers"]:
                break
            await asyncio.sleep(0.05)
        d = kv_sub(after, before)
        if d and d["transfers"] > 0:
            rec.update(kv_bytes=d["bytes"], kv_seconds=d["seconds"], kv_transfers=d["transfers"])
    return rec


async def run_load(target: Target, plan: Plan, label: str, state: LoadState) -> None:
    """Warm-up, metric baselines (``state.snap0``), then the measured requests into
    ``state.records`` as they finish."""
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
        kv0 = await settled_kv(target.kv_url or target.engine_kv_url)
        state.snap0 = (await asyncio.to_thread(scrape, target.sidecar_url), kv0,
                       await asyncio.to_thread(breakdown.snapshot, breakdown.sources(target)))
        records = state.records
        if plan.num_requests == 0:
            return
        prog = Progress(label, plan.num_requests, plan.progress, plan.duration)
        t0 = state.t0 = time.perf_counter()
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
        state.t_end = time.perf_counter()
        prog.close()
    finally:
        await client.close()


async def run_sweep(target: Target, plan: Plan, label: str, state: LoadState) -> None:
    """Sequential requests at each ``--sweep-tokens`` length into ``state.records``."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=target.url + "/v1", api_key="pdbench", max_retries=0,
                         timeout=plan.request_timeout)
    out = state.records
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
    finally:
        await client.close()


def sweep_summary(recs: list[dict[str, Any]], push: bool = False) -> dict[str, Any]:
    """Per-length medians and fits; with `push` the KV time is the KV tail: no GB/s."""
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
            if not push:
                p["gbps_median"] = statistics.median(r["kv_bytes"] / r["kv_seconds"] / 1e9 for r in kv)
        bd = breakdown.medians(rs)
        if bd:
            p["breakdown_median"] = bd
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
