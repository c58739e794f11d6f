"""`pdbench chaos`: requests, the bounded load generator, the identity check against
aggregated serving, and a scenario's :class:`Result` (errors by kind, hung, leaks).

Every request has a client-side bound; "hung" means not answered within it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp

from bench.chaos_stack import WORDS, ChaosStack, Profile


# --------------------------------------------------------------------------- #
# requests and the load generator


@dataclass
class Req:
    idx: int
    api: str  # completions | chat
    stream: bool
    body: dict[str, Any]


@dataclass
class Outcome:
    idx: int
    api: str
    stream: bool
    kind: str  # ok | http_<status>[:code] | refused | reset | truncated | hung | cancelled
    status: int = 0
    path: str = ""
    text: str = ""
    t_start: float = 0.0
    t_end: float = 0.0
    traceback: bool = False


def make_prompt(rng: random.Random) -> str:
    r = rng.random()
    n = rng.randint(3, 10) if r < 0.4 else rng.randint(50, 150) if r < 0.8 else rng.randint(300, 600)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_requests(n: int, model: str, seed: int, max_tokens: int = 8) -> list[Req]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        api = "chat" if rng.random() < 0.5 else "completions"
        stream = rng.random() < 0.5
        p = make_prompt(rng)
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if api == "chat":
            body["messages"] = [{"role": "user", "content": p}]
        else:
            body["prompt"] = p
        out.append(Req(i, api, stream, body))
    return out


API_PATH = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _text_of(api: str, obj: dict, stream: bool) -> str:
    ch = obj.get("choices") or []
    if not ch:
        return ""
    c = ch[0]
    if api == "completions":
        return c.get("text") or ""
    if stream:
        return (c.get("delta") or {}).get("content") or ""
    return (c.get("message") or {}).get("content") or ""


async def send(session: aiohttp.ClientSession, url: str, req: Req, bound_s: float,
               cancel_after_s: float | None = None, cancel_mid_stream: bool = False) -> Outcome:
    """One request; never raises. `cancel_after_s`/`cancel_mid_stream` make the client leave."""
    o = Outcome(req.idx, req.api, req.stream, "ok", t_start=time.monotonic())
    try:
        async with asyncio.timeout(cancel_after_s if cancel_after_s is not None else bound_s):
            async with session.post(url + API_PATH[req.api], json=req.body,
                                    headers={"x-request-id": f"chaos-{req.idx}-{secrets.token_hex(4)}"}) as r:
                o.status, o.path = r.status, r.headers.get("x-pd-path", "")
                if r.status != 200:
                    raw = await r.read()
                    o.traceback = b"Traceback" in raw
                    code = ""
                    try:
                        code = str((json.loads(raw).get("error") or {}).get("code") or "")
                    except (ValueError, AttributeError):
                        pass
                    o.kind = f"http_{r.status}" + (f":{code}" if code else "")
                elif req.stream:
                    parts, done = [], False
                    async for line in r.content:
                        line = line.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            break
                        try:
                            parts.append(_text_of(req.api, json.loads(data), True))
                        except ValueError:
                            pass
                        if cancel_mid_stream:
                            o.kind = "cancelled"
                            r.close()
                            break
                    o.text = "".join(parts)
                    if o.kind != "cancelled" and not done:
                        o.kind = "truncated"
                else:
                    obj = await r.json(content_type=None)
                    o.text = _text_of(req.api, obj, False)
    except TimeoutError:
        o.kind = "cancelled" if cancel_after_s is not None else "hung"
    except aiohttp.ClientConnectorError:
        o.kind = "refused"
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError):
        o.kind = "reset"
    except aiohttp.ClientError as e:
        o.kind = f"client_{type(e).__name__}"
    except ValueError:
        o.kind = "bad_json"
    o.t_end = time.monotonic()
    return o


class Progress:
    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self._cond = asyncio.Condition()

    async def tick(self) -> None:
        async with self._cond:
            self.done += 1
            self._cond.notify_all()

    async def reached(self, k: float) -> None:
        k = min(int(k), self.total)
        async with self._cond:
            await self._cond.wait_for(lambda: self.done >= k)


async def run_load(url: str, reqs: list[Req], concurrency: int, bound_s: float,
                   fault: Callable[[Progress], Awaitable[None]] | None = None,
                   cancel: Callable[[Req], tuple[float | None, bool]] | None = None,
                   pace_s: float = 0.0) -> list[Outcome]:
    """Send `reqs` with at most `concurrency` in flight (fresh session, bounded), while
    `fault(progress)` runs alongside. Returns outcomes in request order."""
    prog = Progress(len(reqs))
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency + 8, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def one(req: Req) -> Outcome:
            async with sem:
                ca, mid = cancel(req) if cancel else (None, False)
                try:
                    return await send(session, url, req, bound_s, ca, mid)
                finally:
                    await prog.tick()
                    if pace_s:
                        await asyncio.sleep(pace_s)

        load = asyncio.gather(*(one(r) for r in reqs))
        if fault is None:
            return list(await load)
        fault_task = asyncio.ensure_future(fault(prog))
        outs = list(await load)
        # the fault's recovery steps must not outlive the load by more than a bound
        await asyncio.wait_for(fault_task, timeout=600)
        return outs


async def aggregated_text(session: aiohttp.ClientSession, engine_url: str, req: Req) -> str | None:
    body = dict(req.body, stream=False)
    try:
        async with session.post(engine_url + API_PATH[req.api], json=body,
                                timeout=aiohttp.ClientTimeout(total=120)) as r:
            if r.status != 200:
                return None
            return _text_of(req.api, await r.json(), False)
    except (aiohttp.ClientError, TimeoutError):
        return None


async def identity_check(engine_url: str, reqs: list[Req], outs: list[Outcome], k: int) -> tuple[int, int, list[int]]:
    """Compare up to `k` completed P/D answers with the aggregated reference (the prefill
    engine, no kv_transfer_params). Returns (checked, identical, differing request idx)."""
    cand = [o for o in outs if o.kind == "ok" and o.path == "disagg"]
    rng = random.Random(0)
    sample = rng.sample(cand, min(k, len(cand)))
    same, diff = 0, []
    async with aiohttp.ClientSession() as s:
        for o in sample:
            ref = await aggregated_text(s, engine_url, reqs[o.idx])
            if ref == o.text:
                same += 1
            else:
                diff.append(o.idx)
    return len(sample), same, diff


# --------------------------------------------------------------------------- #
# results


@dataclass
class Result:
    scenario: str
    requests: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    hung: int = 0
    leaked_blocks: int | None = None
    pending_left: int | None = None
    result: str = "PASS"
    paths: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, why: str) -> None:
        self.result = "FAIL"
        self.notes.append(why)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(name: str, outs: list[Outcome], allowed: tuple[str, ...] = ()) -> Result:
    """Counts; FAIL on hung requests, tracebacks, truncated streams or error kinds not in `allowed`
    (prefix match: `http_503` allows `http_503:draining`)."""
    res = Result(name, requests=len(outs))
    kinds = Counter(o.kind for o in outs)
    res.completed = kinds.pop("ok", 0)
    res.hung = kinds.pop("hung", 0)
    res.errors = dict(sorted(kinds.items()))
    res.paths = dict(sorted(Counter(o.path or "-" for o in outs if o.kind == "ok").items()))
    if res.hung:
        res.fail(f"{res.hung} request(s) hung past the client bound")
    if any(o.traceback for o in outs):
        res.fail("an error body carried a Python traceback")
    bad = {k: v for k, v in kinds.items() if not any(k == a or k.startswith(a + ":") for a in allowed)}
    if bad:
        res.fail(f"unexpected outcomes {bad}")
    return res


def add_leaks(res: Result, stack: ChaosStack, timeout_s: float | None = None) -> dict[str, Any]:
    st = stack.settle(timeout_s)
    res.leaked_blocks = st.get("leaked_blocks")
    res.pending_left = st.get("pending")
    if not st.get("settled"):
        res.fail(f"did not settle: {st}")
    return st


async def to_thread(fn, *a):
    return await asyncio.to_thread(fn, *a)


async def fault_scenario(stack: ChaosStack, prof: Profile, name: str, seed: int, fault, allowed=(),
                          need_fallback: bool = False, max_tokens: int | None = None, n: int | None = None,
                          cancel=None) -> tuple[Result, list[Outcome], list[Req]]:
    reqs = make_requests(n or prof.fault_n, stack.model, seed, max_tokens or prof.max_tokens)
    t0 = time.monotonic()
    outs = await run_load(stack.decode_url, reqs, prof.fault_c, stack.opts.client_bound_s, fault, cancel)
    res = summarize(name, outs, allowed)
    res.seconds = round(time.monotonic() - t0, 1)
    if need_fallback and not res.paths.get("fallback"):
        res.notes.append("fault not exercised: no request fell back")
    return res, outs, reqs
