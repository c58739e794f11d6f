"""`pdbench chaos` scenarios, network family: mixed load, and faults on the path between
the decode and the prefill sidecar (the fault proxy delays or black-holes it, or holds
the KV past the transfer timeout)."""

from __future__ import annotations

import asyncio

from bench.chaos_load import (Progress, Result, add_leaks, fault_scenario, identity_check, make_requests, run_load,
                              summarize)
from bench.chaos_stack import ChaosStack, Profile, rss_bytes


async def scn_load(stack: ChaosStack, prof: Profile) -> Result:
    """Mixed load: streaming/non-streaming, completions/chat, short/medium/long prompts."""
    url, bound = stack.decode_url, stack.opts.client_bound_s
    await run_load(url, make_requests(6, stack.model, 99, prof.max_tokens), 3, bound)  # warm-up
    pids = {"decode": stack.decode.proc.pid, "prefill": stack.prefill.proc.pid}
    rss0 = {k: rss_bytes(p) for k, p in pids.items()}
    reqs = make_requests(prof.load_n, stack.model, 1, prof.max_tokens)
    outs = await run_load(url, reqs, prof.load_c, bound)
    rss1 = {k: rss_bytes(p) for k, p in pids.items()}
    res = summarize("load", outs)
    checked, same, diff = await identity_check(stack.prefill_engine.url, reqs, outs, prof.identity_sample)
    res.notes.append(f"identical to aggregated {same}/{checked}")
    if checked == 0:
        res.fail("no disaggregated answer to compare")
    elif diff:
        res.fail(f"outputs differ from aggregated for requests {diff[:5]}")
    if res.paths.get("fallback"):
        res.notes.append(f"{res.paths['fallback']} fell back to local prefill under load")
    for k in pids:
        grow = (rss1[k] - rss0[k]) / 2**20
        res.notes.append(f"{k} sidecar RSS {rss0[k] / 2**20:.0f}->{rss1[k] / 2**20:.0f} MiB")
        if grow > 64 + 0.1 * prof.load_n / 10:
            res.fail(f"{k} sidecar RSS grew {grow:.0f} MiB")
    add_leaks(res, stack)
    return res


async def scn_slow_prefill_path(stack: ChaosStack, prof: Profile) -> Result:
    """Every chunk between the sidecars delayed 0.3 s (below the prefill timeout)."""
    n = prof.fault_n

    async def fault(p: Progress):
        await p.reached(0.2 * n)
        stack.proxy.set_mode("delay", delay_up_s=0.3, delay_down_s=0.3)
        await p.reached(0.7 * n)
        stack.proxy.set_mode("pass")

    res, outs, reqs = await fault_scenario(stack, prof, "slow_prefill_path", 11, fault)
    add_leaks(res, stack)
    return res


async def scn_blackhole_prefill_path(stack: ChaosStack, prof: Profile) -> Result:
    """The prefill path swallows everything (open and in-flight connections) for
    prefill-timeout + 2 s: legs time out, requests fall back to local prefill."""
    window = stack.opts.prefill_timeout_s + 2

    async def fault(p: Progress):
        await p.reached(0.2 * prof.fault_n)
        stack.proxy.set_mode("blackhole")
        await asyncio.sleep(window)
        stack.proxy.set_mode("pass")

    res, _, _ = await fault_scenario(stack, prof, "blackhole_prefill_path", 12, fault, need_fallback=True)
    add_leaks(res, stack)
    return res


async def scn_transfer_timeout(stack: ChaosStack, prof: Profile) -> Result:
    """Prefill answers arrive after the decode sidecar's prefill timeout: the KV was
    computed but is never picked up; it must expire (the engine KV lease; the sidecar forgets it at that lease)."""
    o = stack.opts

    async def fault(p: Progress):
        await p.reached(0.2 * prof.fault_n)
        stack.proxy.set_mode("delay", delay_down_s=o.prefill_timeout_s + 3)
        await asyncio.sleep(o.prefill_timeout_s + 2)
        stack.proxy.set_mode("pass")

    res, _, _ = await fault_scenario(stack, prof, "transfer_timeout", 13, fault, need_fallback=True)
    add_leaks(res, stack)
    return res
