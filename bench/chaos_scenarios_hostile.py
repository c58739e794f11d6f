"""`pdbench chaos` scenarios, hostile family: every hostile case plus slowloris while
normal requests keep being served, and the sidecar logs grepped for secrets."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from bench.chaos_hostile import log_hygiene, slowloris
from bench.chaos_hostile_cases import KNOWN_BUGS, hostile_cases, rogue_peer_cases
from bench.chaos_load import Result, add_leaks, make_requests, run_load
from bench.chaos_stack import ChaosStack, Profile


async def scn_hostile(stack: ChaosStack, prof: Profile) -> Result:
    """SSRF, auth/replay, oversized and malformed input, client transfer fields, forged
    prefill answers (a rogue behind the fault proxy), leaks, slowloris; then log hygiene."""
    res = Result("hostile")
    t0 = time.monotonic()
    cases = hostile_cases(stack.d_port, stack.p_port, stack.proxy.port, stack.token, stack.model,
                          f"127.0.0.1:{stack.d_port}")
    cases += rogue_peer_cases(stack.d_port, stack.p_port, stack.token, stack.model,
                              retarget=stack.proxy.retarget, restore=lambda: stack.proxy.retarget(stack.p_port))
    fails = Counter()
    # slow clients hold connections while everything else runs
    # half-sent headers are bounded by the server keep-alive (--server-keepalive), slow
    # bodies by the total timeout
    loris_bound = max(stack.opts.client_bound_s, stack.opts.server_keepalive_s + 10)
    loris = asyncio.ensure_future(asyncio.gather(
        asyncio.to_thread(slowloris, stack.d_port, 8, loris_bound, False),
        asyncio.to_thread(slowloris, stack.d_port, 8, loris_bound, True)))
    for name, check in cases:
        ok, detail = await asyncio.to_thread(check)
        res.requests += 1
        if ok:
            res.completed += 1
        else:
            bug = KNOWN_BUGS.get(name)
            fails[f"{bug} {name.split(': ')[-1]}" if bug else name] += 1
            res.notes.append(f"{name}: {detail}" + (f" (known bug {bug})" if bug else ""))
    # the sidecar must keep serving normal requests while slow clients hold sockets
    reqs = make_requests(6, stack.model, 31, prof.max_tokens)
    outs = await run_load(stack.decode_url, reqs, 3, stack.opts.client_bound_s)
    if any(o.kind != "ok" for o in outs):
        fails["served during slowloris"] += 1
        res.notes.append(f"normal requests during slowloris: {Counter(o.kind for o in outs)}")
    (h_closed, h_open, h_t), (b_closed, b_open, b_t) = await loris
    res.requests += 16
    res.completed += h_closed + b_closed
    res.notes.append(f"slowloris headers: {h_closed}/8 closed by the server (last after {h_t:.0f}s); "
                     f"slow bodies: {b_closed}/8 closed (last after {b_t:.0f}s); bound {loris_bound:.0f}s")
    if h_open:
        fails["slowloris headers"] += h_open
        res.hung += h_open
    if b_open:
        fails["slowloris body"] += b_open
        res.hung += b_open
    res.errors = dict(fails)
    if fails:
        res.result = "FAIL"
    res.seconds = round(time.monotonic() - t0, 1)
    add_leaks(res, stack)
    return res


async def scn_log_hygiene(stack: ChaosStack, prof: Profile) -> Result:
    """Grep every sidecar log of the run for the auth token, prompt text and tracebacks."""
    prompts = []
    for seed, n in ((1, prof.load_n), (11, prof.fault_n), (12, prof.fault_n)):
        prompts += [(r.body.get("prompt") or r.body["messages"][0]["content"]) for r in make_requests(n, stack.model, seed)]
    prompts = [p for p in prompts if len(p) >= 20] + ["hello hostile world"]
    h = log_hygiene(stack.logs_text(), stack.token, prompts)
    res = Result("log_hygiene", requests=h["lines"], completed=h["lines"] - h["token"] - h["prompt"] - h["traceback"])
    res.errors = {k: v for k, v in h.items() if k != "lines" and v}
    res.notes.append(f"{h['lines']} log lines in {len(stack.all_logs)} sidecar logs")
    if h["token"] or h["prompt"] or h["traceback"]:
        res.fail(f"logs leak: {res.errors}")
    if h["unhandled"]:
        res.notes.append(f"{h['unhandled']} 'unhandled error' log lines (500s)")
    return res
