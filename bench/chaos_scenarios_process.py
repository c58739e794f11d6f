"""`pdbench chaos` scenarios, process family: engines and sidecars stalled, stopped,
killed, restarted or drained under load, and clients that cancel mid-request."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from typing import Any

from bench.chaos_load import (Progress, Req, Result, add_leaks, fault_scenario, identity_check, make_requests,
                              run_load, summarize, to_thread)
from bench.chaos_stack import ChaosStack, Profile


async def scn_prefill_engine_stall(stack: ChaosStack, prof: Profile) -> Result:
    """SIGSTOP the prefill engine for prefill-timeout + 2 s, then SIGCONT."""
    o = stack.opts

    async def fault(p: Progress):
        await p.reached(0.2 * prof.fault_n)
        stack.prefill_engine.kill(signal.SIGSTOP)
        try:
            await asyncio.sleep(o.prefill_timeout_s + 2)
        finally:
            stack.prefill_engine.kill(signal.SIGCONT)

    res, _, _ = await fault_scenario(stack, prof, "prefill_engine_stall", 14, fault, need_fallback=True)
    add_leaks(res, stack)
    return res


async def scn_prefill_sidecar_sigterm(stack: ChaosStack, prof: Profile) -> Result:
    """SIGTERM the prefill sidecar under load (drain), restart it later: every client
    request completes (in-flight legs finish; later ones fall back)."""
    info: dict[str, Any] = {}

    async def fault(p: Progress):
        await p.reached(0.25 * prof.fault_n)
        sc = stack.prefill
        sc.proc.send_signal(signal.SIGTERM)
        info["rc"] = await to_thread(sc.proc.wait, stack.opts.drain_grace_s + 15)
        await p.reached(0.6 * prof.fault_n)
        await to_thread(stack.start_prefill_sidecar)

    res, _, _ = await fault_scenario(stack, prof, "prefill_sidecar_sigterm", 15, fault, need_fallback=True,
                                      max_tokens=24)
    res.notes.append(f"prefill sidecar exit code {info.get('rc')}")
    if info.get("rc") != 0:
        res.fail(f"prefill sidecar did not drain cleanly (exit {info.get('rc')})")
    add_leaks(res, stack)
    return res


async def scn_decode_sidecar_restart(stack: ChaosStack, prof: Profile) -> Result:
    """SIGKILL the decode sidecar under load and start it again: in-flight requests see a
    dropped connection, requests in the gap connection refused, later ones succeed;
    nothing hangs and nothing stays held."""
    info: dict[str, float] = {}

    async def fault(p: Progress):
        await p.reached(0.3 * prof.fault_n)
        stack.decode.proc.kill()
        await to_thread(stack.decode.proc.wait, 10)
        await to_thread(stack.start_decode_sidecar)
        info["up"] = time.monotonic()

    reqs = make_requests(prof.fault_n, stack.model, 16, prof.max_tokens)
    t0 = time.monotonic()
    # paced, so that requests keep coming while the sidecar is down and after it is back
    outs = await run_load(stack.decode_url, reqs, prof.fault_c, stack.opts.client_bound_s, fault, pace_s=0.5)
    res = summarize("decode_sidecar_restart", outs, allowed=("refused", "reset"))
    res.seconds = round(time.monotonic() - t0, 1)
    up = info.get("up", float("inf"))
    after = [o for o in outs if o.t_start > up]
    bad = [o for o in after if o.kind != "ok"]
    res.notes.append(f"{len(after)} requests after the restart, {len(bad)} failed")
    if bad:
        res.fail(f"{len(bad)} request(s) failed after the restart: {Counter(o.kind for o in bad)}")
    if not after:
        res.notes.append("no request was sent after the restart")
    add_leaks(res, stack)
    return res


async def scn_client_cancel(stack: ChaosStack, prof: Profile) -> Result:
    """Clients leave at random points (during the prefill leg, before the first token,
    mid-stream); nothing may stay held afterwards."""
    rng = random.Random(17)

    def cancel(req: Req) -> tuple[float | None, bool]:
        r = rng.random()
        if r < 0.4:
            return rng.uniform(0.01, 0.4), False
        if r < 0.8 and req.stream:
            return None, True
        return None, False

    res, _, _ = await fault_scenario(stack, prof, "client_cancel", 17, None, allowed=("cancelled",),
                                      max_tokens=32, n=prof.cancel_n, cancel=cancel)
    add_leaks(res, stack)
    return res


async def scn_drain_decode(stack: ChaosStack, prof: Profile) -> Result:
    """SIGTERM the decode sidecar under streaming load: every request accepted before the
    signal completes; later ones get 503 + Retry-After or connection refused."""
    info: dict[str, Any] = {}
    margin = 0.3

    async def fault(p: Progress):
        await p.reached(0.3 * prof.fault_n)
        info["t"] = time.monotonic()
        stack.decode.proc.send_signal(signal.SIGTERM)
        info["rc"] = await to_thread(stack.decode.proc.wait, stack.opts.drain_grace_s + 15)

    reqs = make_requests(prof.fault_n, stack.model, 18, 48)
    for r in reqs:  # long streams: many requests are in flight when the signal comes
        r.stream = r.body["stream"] = True
    outs = await run_load(stack.decode_url, reqs, prof.fault_c, stack.opts.client_bound_s, fault)
    res = summarize("drain_decode", outs, allowed=("http_503:draining", "refused", "reset"))
    t = info.get("t", float("inf"))
    lost = [o for o in outs if o.t_start < t - margin and o.kind != "ok"]
    after_reset = [o for o in outs if o.kind == "reset" and o.t_start < t - margin]
    accepted = sum(1 for o in outs if o.t_start < t - margin)
    res.notes.append(f"{accepted} accepted before SIGTERM, {len(lost)} lost; decode sidecar exit {info.get('rc')}")
    if lost:
        res.fail(f"{len(lost)} request(s) accepted before SIGTERM did not complete: "
                 f"{Counter(o.kind for o in lost)}")
    if after_reset:
        res.fail("connections reset")
    if info.get("rc") != 0:
        res.fail(f"decode sidecar did not drain cleanly (exit {info.get('rc')})")
    await to_thread(stack.start_decode_sidecar)
    add_leaks(res, stack)
    return res


async def scn_prefill_engine_kill(stack: ChaosStack, prof: Profile) -> Result:
    """SIGKILL the prefill engine (whole process group) under load: later requests fall
    back to local prefill; in-flight ones complete or fail cleanly."""

    async def fault(p: Progress):
        await p.reached(0.3 * prof.fault_n)
        stack.prefill_engine.kill(signal.SIGKILL)

    res, _, _ = await fault_scenario(stack, prof, "prefill_engine_kill", 19, fault, need_fallback=True)
    add_leaks(res, stack)
    return res


async def scn_prefill_engine_restart(stack: ChaosStack, prof: Profile) -> Result:
    """A fresh prefill engine on the same port (new engine id): the decode engine must
    drop the stale peer and handshake again; answers are disaggregated and identical."""
    t0 = time.monotonic()
    await to_thread(stack.restart_prefill_engine)
    boot = time.monotonic() - t0
    reqs = make_requests(prof.fault_n, stack.model, 20, prof.max_tokens)
    outs = await run_load(stack.decode_url, reqs, prof.fault_c, stack.opts.client_bound_s)
    res = summarize("prefill_engine_restart", outs)
    res.notes.append(f"engine restarted in {boot:.0f}s")
    if not res.paths.get("disagg"):
        res.fail("no request was disaggregated after the restart (stale peer not replaced?)")
    checked, same, diff = await identity_check(stack.prefill_engine.url, reqs, outs, prof.identity_sample)
    res.notes.append(f"identical to aggregated {same}/{checked}")
    if diff:
        res.fail(f"outputs differ from aggregated for requests {diff[:5]}")
    add_leaks(res, stack)
    return res
