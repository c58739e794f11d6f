"""Scenarios of `pdbench chaos`: a real local P/D stack, a bounded load generator, faults,
leak checks, hostile input and drain.

The stack: a prefill and a decode vLLM engine (`pdsidecar.dev.engines`), a prefill and a
decode sidecar as real `pdsidecar run` subprocesses, and a `FaultProxy` on loopback between
the decode sidecar and the prefill sidecar (the decode sidecar's KV_TRANSFER_TARGET is the
proxy). Every scenario runs a bounded number of requests, each with a client-side bound
(the sidecar's total timeout + slack: past it a request counts as *hung*), then waits
for the stack to settle and checks for leaks (engine KV usage and running/waiting
requests back to 0, sidecar pending maps empty).

All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import secrets
import signal
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from bench.chaos_faults import ROGUE_MODES, Detector, FaultProxy, RoguePeer
from pdsidecar.dev.engines import Engine, EngineConfig, pd_pair_configs, stock_nixl_config
from pdsidecar.dev.local_sidecars import SidecarProcess
from pdsidecar.dev.procs import free_port

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega cache block token layer expert "
         "router prefill decode transfer memory tensor vector matrix queue stream server client request river "
         "mountain forest story engine").split()


# --------------------------------------------------------------------------- #
# profiles


@dataclass(frozen=True)
class Profile:
    name: str
    load_n: int
    load_c: int
    fault_n: int
    fault_c: int
    cancel_n: int
    max_tokens: int = 8
    identity_sample: int = 12


PROFILES = {
    "short": Profile("short", load_n=60, load_c=16, fault_n=24, fault_c=6, cancel_n=16),
    "full": Profile("full", load_n=1000, load_c=64, fault_n=200, fault_c=32, cancel_n=100, identity_sample=40),
}


# --------------------------------------------------------------------------- #
# metrics helpers


def _get(url: str, timeout: float = 3.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def prom_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for fam in text_string_to_metric_families(_get(url + "/metrics").decode()):
        for s in fam.samples:
            out.append((s.name, dict(s.labels), s.value))
    return out


def engine_state(url: str) -> dict[str, float]:
    """running, waiting, kv usage (0..1) and total KV blocks of a vLLM engine."""
    st = {"running": 0.0, "waiting": 0.0, "usage": 0.0, "blocks": 0.0}
    for name, labels, v in prom_samples(url):
        if name == "vllm:num_requests_running":
            st["running"] += v
        elif name == "vllm:num_requests_waiting":
            st["waiting"] += v
        elif name == "vllm:kv_cache_usage_perc":
            st["usage"] = max(st["usage"], v)
        elif name == "vllm:cache_config_info" and labels.get("num_gpu_blocks", "").isdigit():
            st["blocks"] = float(labels["num_gpu_blocks"])
    return st


def sidecar_state(url: str) -> dict[str, Any]:
    """pending requests (stats + pd_pending_kv_requests gauge), in-flight, draining."""
    stats = json.loads(_get(url + "/pd/v1/stats"))
    gauge = sum(v for n, _, v in prom_samples(url) if n == "pd_pending_kv_requests")
    pend = stats.get("pending") or {}
    return {"pending": int(pend.get("requests", 0) or 0), "pending_gauge": gauge,
            "in_flight": int(stats.get("in_flight", 0) or 0), "draining": bool(stats.get("draining"))}


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


# --------------------------------------------------------------------------- #
# the stack


@dataclass
class StackOptions:
    connect_timeout_s: float = 1.0
    prefill_timeout_s: float = 10.0
    decode_timeout_s: float = 30.0
    total_timeout_s: float = 30.0
    drain_grace_s: float = 30.0
    kv_ttl_s: float = 8.0
    kv_lease_s: int = 8  # stock NixlConnector: prefill frees unread KV after this (kv_lease_duration)
    client_slack_s: float = 10.0
    server_keepalive_s: float = 20.0
    log_level: str = "info"

    @property
    def client_bound_s(self) -> float:
        """A request not answered within this is *hung* (sidecar total timeout + slack)."""
        return self.total_timeout_s + self.client_slack_s


def chaos_connector_config(kind: str, opts: StackOptions | None = None) -> dict[str, Any]:
    """The engines' kv-transfer-config: stock NixlConnector (with a short KV lease and
    recompute on load failure, as a deployment would set them) or ours."""
    opts = opts or StackOptions()
    if kind == "ours":
        from pdsidecar.dev.local import connector_config

        return connector_config("ours")[1]
    cfg = stock_nixl_config()
    cfg["kv_load_failure_policy"] = "recompute"
    cfg["kv_connector_extra_config"] = {"kv_lease_duration": opts.kv_lease_s}
    return cfg


def chaos_engine_configs(model: str, connector: str, log_dir: str | None, opts: StackOptions | None = None
                         ) -> list[EngineConfig]:
    return pd_pair_configs(model, chaos_connector_config(connector, opts), stock=(connector == "stock"),
                           log_dir=log_dir)


class ChaosStack:
    """Engines + both sidecars (subprocesses) + a FaultProxy between the sidecars."""

    def __init__(self, engines: list[Engine], log_dir: str | Path, opts: StackOptions | None = None):
        self.prefill_engine, self.decode_engine = engines
        self.model = self.prefill_engine.model_name
        self.opts = opts or StackOptions()
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.p_port = free_port()
        self.d_port = free_port()
        self.proxy = FaultProxy(self.p_port)
        self.prefill: SidecarProcess | None = None
        self.decode: SidecarProcess | None = None
        self.owned_engines: list[Engine] = []
        self._incarnation = 0
        self.all_logs: list[Path] = []

    # --------------------------------------------------------------- sidecars
    def _common(self) -> list[str]:
        o = self.opts
        return ["--host", "127.0.0.1", "--auth-token", self.token, "--log-level", o.log_level,
                "--log-format", "json", "--connect-timeout", str(o.connect_timeout_s),
                "--prefill-timeout", str(o.prefill_timeout_s), "--decode-timeout", str(o.decode_timeout_s),
                "--total-timeout", str(o.total_timeout_s), "--drain-grace", str(o.drain_grace_s),
                "--server-keepalive", str(o.server_keepalive_s)]

    def _logdir(self, role: str) -> Path:
        self._incarnation += 1
        d = self.log_dir / f"{role}-{self._incarnation}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start_prefill_sidecar(self) -> SidecarProcess:
        d = self._logdir("prefill")
        self.prefill = SidecarProcess("prefill", [*self._common(), "--port", str(self.p_port),
                                                  "--vllm-url", self.prefill_engine.url,
                                                  "--advertise", f"127.0.0.1:{self.p_port}",
                                                  "--allowed-peers", f"127.0.0.1:{self.d_port}",
                                                  "--kv-ttl", str(self.opts.kv_ttl_s)], self.p_port, d)
        self.all_logs.append(self.prefill.log_path)
        self.prefill.wait_ready()
        return self.prefill

    def start_decode_sidecar(self) -> SidecarProcess:
        d = self._logdir("decode")
        self.decode = SidecarProcess("decode", [*self._common(), "--port", str(self.d_port),
                                                "--vllm-url", self.decode_engine.url,
                                                "--advertise", f"127.0.0.1:{self.d_port}",
                                                "--kv-transfer-target", f"127.0.0.1:{self.proxy.port}",
                                                "--peer-stats-interval", "1"], self.d_port, d)
        self.all_logs.append(self.decode.log_path)
        self.decode.wait_ready()
        return self.decode

    def start(self) -> "ChaosStack":
        self.proxy.start()
        self.start_prefill_sidecar()
        self.start_decode_sidecar()
        return self

    @property
    def decode_url(self) -> str:
        return f"http://127.0.0.1:{self.d_port}"

    @property
    def prefill_url(self) -> str:
        return f"http://127.0.0.1:{self.p_port}"

    def ensure_up(self) -> None:
        """Restart whatever a scenario left stopped (sidecars, proxy mode)."""
        self.proxy.set_mode("pass")
        if self.prefill is None or self.prefill.proc.poll() is not None:
            self.start_prefill_sidecar()
        if self.decode is None or self.decode.proc.poll() is not None:
            self.start_decode_sidecar()

    def restart_prefill_engine(self) -> Engine:
        """A fresh prefill engine on the same port (new engine id): the decode engine must
        notice the stale peer and handshake again."""
        old = self.prefill_engine
        old.kill(signal.SIGKILL)
        old.stop()
        cfg = dataclasses.replace(old.config, port=old.port)
        new = Engine(cfg)
        new.start()
        new.wait_ready()
        self.owned_engines.append(new)
        self.prefill_engine = new
        return new

    def close(self) -> None:
        for sc in (self.decode, self.prefill):
            if sc is not None:
                try:
                    sc.stop(timeout_s=10)
                except Exception:
                    pass
        self.proxy.stop()
        for e in self.owned_engines:
            e.stop()

    def logs_text(self) -> str:
        out = []
        for p in self.all_logs:
            try:
                out.append(p.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)

    # ------------------------------------------------------------ settle/leaks
    def settle(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait until nothing is held anywhere; return the last observation.

        `leaked_blocks` = KV blocks still in use on both engines (usage x total blocks);
        `pending` = sidecar pending entries; `busy` = engine running+waiting requests."""
        o = self.opts
        timeout_s = timeout_s if timeout_s is not None else o.kv_lease_s + o.kv_ttl_s + 15
        end = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while True:
            try:
                dead = {"running": 0.0, "waiting": 0.0, "usage": 0.0, "blocks": 0.0}
                pe = engine_state(self.prefill_engine.url) if self.prefill_engine.alive() else dead
                de = engine_state(self.decode_engine.url)
                ps = sidecar_state(self.prefill_url) if self._alive(self.prefill) else {"pending": 0, "pending_gauge": 0, "in_flight": 0}
                ds = sidecar_state(self.decode_url) if self._alive(self.decode) else {"pending": 0, "pending_gauge": 0, "in_flight": 0}
                leaked = round(pe["usage"] * pe["blocks"]) + round(de["usage"] * de["blocks"])
                last = {"leaked_blocks": leaked, "prefill_usage": pe["usage"], "decode_usage": de["usage"],
                        "busy": int(pe["running"] + pe["waiting"] + de["running"] + de["waiting"]),
                        "pending": ps["pending"] + ds["pending"],
                        "pending_gauge": ps["pending_gauge"] + ds["pending_gauge"],
                        "in_flight": ps["in_flight"] + ds["in_flight"]}
                if (leaked == 0 and last["busy"] == 0 and last["pending"] == 0 and last["pending_gauge"] == 0
                        and last["in_flight"] == 0):
                    last["settled"] = True
                    return last
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = {**last, "error": f"{type(e).__name__}"}
            if time.monotonic() > end:
                last["settled"] = False
                return last
            time.sleep(0.5)

    @staticmethod
    def _alive(sc: SidecarProcess | None) -> bool:
        return sc is not None and sc.proc.poll() is None


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


# --------------------------------------------------------------------------- #
# scenarios


async def _to_thread(fn, *a):
    return await asyncio.to_thread(fn, *a)


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


async def _fault_scenario(stack: ChaosStack, prof: Profile, name: str, seed: int, fault, allowed=(),
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


async def scn_slow_prefill_path(stack: ChaosStack, prof: Profile) -> Result:
    """Every chunk between the sidecars delayed 0.3 s (below the prefill timeout)."""
    n = prof.fault_n

    async def fault(p: Progress):
        await p.reached(0.2 * n)
        stack.proxy.set_mode("delay", delay_up_s=0.3, delay_down_s=0.3)
        await p.reached(0.7 * n)
        stack.proxy.set_mode("pass")

    res, outs, reqs = await _fault_scenario(stack, prof, "slow_prefill_path", 11, fault)
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

    res, _, _ = await _fault_scenario(stack, prof, "blackhole_prefill_path", 12, fault, need_fallback=True)
    add_leaks(res, stack)
    return res


async def scn_transfer_timeout(stack: ChaosStack, prof: Profile) -> Result:
    """Prefill answers arrive after the decode sidecar's prefill timeout: the KV was
    computed but is never picked up; it must expire (sidecar --kv-ttl, engine KV lease)."""
    o = stack.opts

    async def fault(p: Progress):
        await p.reached(0.2 * prof.fault_n)
        stack.proxy.set_mode("delay", delay_down_s=o.prefill_timeout_s + 3)
        await asyncio.sleep(o.prefill_timeout_s + 2)
        stack.proxy.set_mode("pass")

    res, _, _ = await _fault_scenario(stack, prof, "transfer_timeout", 13, fault, need_fallback=True)
    add_leaks(res, stack)
    return res


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

    res, _, _ = await _fault_scenario(stack, prof, "prefill_engine_stall", 14, fault, need_fallback=True)
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
        info["rc"] = await _to_thread(sc.proc.wait, stack.opts.drain_grace_s + 15)
        await p.reached(0.6 * prof.fault_n)
        await _to_thread(stack.start_prefill_sidecar)

    res, _, _ = await _fault_scenario(stack, prof, "prefill_sidecar_sigterm", 15, fault, need_fallback=True,
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
        await _to_thread(stack.decode.proc.wait, 10)
        await _to_thread(stack.start_decode_sidecar)
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

    res, _, _ = await _fault_scenario(stack, prof, "client_cancel", 17, None, allowed=("cancelled",),
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
        info["rc"] = await _to_thread(stack.decode.proc.wait, stack.opts.drain_grace_s + 15)

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
    await _to_thread(stack.start_decode_sidecar)
    add_leaks(res, stack)
    return res


async def scn_prefill_engine_kill(stack: ChaosStack, prof: Profile) -> Result:
    """SIGKILL the prefill engine (whole process group) under load: later requests fall
    back to local prefill; in-flight ones complete or fail cleanly."""

    async def fault(p: Progress):
        await p.reached(0.3 * prof.fault_n)
        stack.prefill_engine.kill(signal.SIGKILL)

    res, _, _ = await _fault_scenario(stack, prof, "prefill_engine_kill", 19, fault, need_fallback=True)
    add_leaks(res, stack)
    return res


async def scn_prefill_engine_restart(stack: ChaosStack, prof: Profile) -> Result:
    """A fresh prefill engine on the same port (new engine id): the decode engine must
    drop the stale peer and handshake again; answers are disaggregated and identical."""
    t0 = time.monotonic()
    await _to_thread(stack.restart_prefill_engine)
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


# --------------------------------------------------------------------------- #
# hostile input (shared by the CLI's `hostile` scenario and tests/test_fuzz*.py)


@dataclass
class RawResponse:
    status: int | None  # None: no HTTP answer (connection dropped / timed out)
    headers: dict[str, str]
    body: bytes
    kind: str  # answered | dropped | timeout
    seconds: float


def raw_request(port: int, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                body: bytes = b"", timeout_s: float = 10.0, host: str = "127.0.0.1",
                raw_head: bytes | None = None) -> RawResponse:
    """One HTTP/1.1 request over a fresh loopback socket (arbitrary headers allowed)."""
    if host not in ("127.0.0.1", "::1"):
        raise ValueError("loopback only")
    t0 = time.monotonic()
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect((host, port))
        if raw_head is None:
            hs = [("Host", f"127.0.0.1:{port}"), ("Connection", "close"), *(headers or [])]
            if body or method == "POST":
                hs.append(("Content-Length", str(len(body))))
            raw_head = (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs) + "\r\n").encode(
                "latin-1")
        s.sendall(raw_head + body)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except socket.timeout:
        return RawResponse(None, {}, b"", "timeout", time.monotonic() - t0)
    except OSError:
        chunks = chunks if "chunks" in locals() else []
        if not chunks:
            return RawResponse(None, {}, b"", "dropped", time.monotonic() - t0)
    finally:
        s.close()
    data = b"".join(chunks)
    if not data.startswith(b"HTTP/"):
        return RawResponse(None, {}, data, "dropped", time.monotonic() - t0)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return RawResponse(status, hdrs, rest, "answered", time.monotonic() - t0)


SSRF_TEMPLATES = (
    "127.0.0.2:{p}",  # other host, allowed port
    "127.0.0.1:{q}",  # allowed host, other port
    "[::ffff:127.0.0.1]:{q}",  # IPv4-mapped IPv6, other port
    "2130706433:{q}", "0177.0.0.1:{q}", "0x7f.0.0.1:{q}", "0x7f000001:{q}", "127.1:{q}",
    "017700000001:{q}", "127.0.0.1.:{q}",
    "a@127.0.0.1:{q}", "127.0.0.1:{p}@127.0.0.1:{q}", "user:pw@127.0.0.1:{p}",
    "http://127.0.0.1:{q}", "http://127.0.0.1:{p}", "127.0.0.1:{q}/x",
    "127.0.0.1:{p}/../x", "127.0.0.1:{p}?x=1", "127.0.0.1:{p}#x",
    "localhost:{q}", "localhost:{p}", "127.0.0.1:0{p}",
    "127.0.0.1:{p_wrap}", "127.0.0.1:-{p}", "127.0.0.1:{p}:{q}",
    "127.0.0.1 :{p}", "127.0.0.1:{q},127.0.0.1:{p}", "127.0.0.1%00:{q}",
    "[127.0.0.1]:{q}", "127.0.0.1:*", "0.0.0.0:{q}", "[::]:{q}", "[fe80::1%lo]:{q}",
    "[::1]:{q6}", "[0:0:0:0:0:0:0:1]:{q6}", "[::1]:{p}",
)


def ssrf_header_values(allowed_port: int, probe_port: int, probe6_port: int | None) -> list[tuple[str, str]]:
    """(template, value) of x-prefiller-host-port values that must NOT make the decode
    sidecar connect anywhere but its configured prefill peer ({p}); probes ({q}, {q6})
    listen on 127.0.0.1 / ::1."""
    out = []
    for t in SSRF_TEMPLATES:
        if "{q6}" in t and probe6_port is None:
            continue
        out.append((t, t.format(p=allowed_port, q=probe_port, q6=probe6_port, p_wrap=allowed_port + 65536)))
    return out


def _ipv6_loopback_ok() -> bool:
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


# hostile cases that fail because of known bugs in the sidecar (docs/reliability.md)
KNOWN_BUGS = {
    "prefill: replayed signed leg": "B1",
    "decode: deeply nested JSON": "B2",
}


def hostile_cases(decode_port: int, prefill_port: int, allowed_prefill_port: int, token: str, model: str,
                  decode_identity: str, max_body_bytes: int = 16 * 2**20) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    """(name, check) pairs; each check sends one hostile request and says whether the
    sidecar answered as it must (4xx/drop, no 500, no traceback, nothing forwarded)."""
    from proxy import auth

    body_c = json.dumps({"model": model, "prompt": "hello hostile world", "max_tokens": 2}).encode()
    cases: list[tuple[str, Callable[[], tuple[bool, str]]]] = []

    def expect_4xx(r: RawResponse, allowed=range(400, 500), drop_ok: bool = False) -> tuple[bool, str]:
        if r.status is None:
            return drop_ok, f"no answer ({r.kind})"
        if b"Traceback" in r.body:
            return False, "traceback in body"
        return r.status in allowed, f"status {r.status}"

    # -- SSRF through x-prefiller-host-port: 4xx and no connection to any probe
    def ssrf_all() -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
        out = []
        det = Detector("127.0.0.1")
        det6 = Detector("::1") if _ipv6_loopback_ok() else None
        for tmpl, v in ssrf_header_values(allowed_prefill_port, det.port, det6.port if det6 else None):
            def check(v=v):
                before = len(det.hits) + (len(det6.hits) if det6 else 0)
                try:
                    r = raw_request(decode_port, "POST", "/v1/completions",
                                    [("Content-Type", "application/json"), ("x-prefiller-host-port", v)], body_c)
                except UnicodeEncodeError:
                    return True, "unsendable"
                time.sleep(0.05)
                hits = len(det.hits) + (len(det6.hits) if det6 else 0) - before
                if hits:
                    return False, f"sidecar connected to the probe ({hits}x)"
                if r.status == 200 and v in (f"[::ffff:127.0.0.1]:{allowed_prefill_port}",):
                    return True, "canonical form of the allowed peer"
                return expect_4xx(r)
            out.append((f"ssrf {tmpl}", check))
        out.append(("ssrf probes closed", lambda: (det.close(), det6 and det6.close(), (True, "closed"))[-1]))
        return out

    cases += ssrf_all()

    # -- prefill sidecar: unauthenticated, forged, stale, wrong path, not allowed, replayed
    def prefill_leg(headers: list[tuple[str, str]], path="/v1/completions", rid="chaos-auth-1", body=body_c):
        return raw_request(prefill_port, "POST", path,
                           [("Content-Type", "application/json"), ("x-request-id", rid), *headers], body)

    def signed(rid: str, path="/v1/completions", peer=decode_identity, now=None, tok=token, body=body_c):
        return list(auth.sign(tok, peer, rid, path, body, now=now).items())  # signs the body it is sent with

    cases += [
        ("prefill: no auth headers", lambda: expect_4xx(prefill_leg([]), (401,))),
        ("prefill: no x-request-id", lambda: expect_4xx(raw_request(
            prefill_port, "POST", "/v1/completions", [("Content-Type", "application/json")], body_c), (400, 401))),
        ("prefill: forged signature", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-2", tok="not-the-token-0123456789"), rid="chaos-auth-2"), (401,))),
        ("prefill: stale signature", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-3", now=time.time() - 3600), rid="chaos-auth-3"), (401,))),
        ("prefill: signature for another path", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-4", path="/v1/chat/completions"), rid="chaos-auth-4"), (401,))),
        ("prefill: signature for another request id", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-5"), rid="chaos-auth-5b"), (401,))),
        ("prefill: signed peer not allowlisted", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-6", peer="127.0.0.1:1"), rid="chaos-auth-6"), (403,))),
        ("prefill: release unauthenticated", lambda: expect_4xx(raw_request(
            prefill_port, "POST", "/pd/v1/release", [("Content-Type", "application/json"),
                                                     ("x-request-id", "chaos-rel-1")],
            b'{"releases":[{"id":"x","status":"picked_up"}]}'), (401,))),
    ]

    def replay() -> tuple[bool, str]:
        rid = f"chaos-replay-{secrets.token_hex(4)}"
        h = signed(rid)
        first = prefill_leg(h, rid=rid)
        second = prefill_leg(h, rid=rid)
        if first.status != 200:
            return False, f"the genuine leg got {first.status}"
        return expect_4xx(second, range(400, 500))

    cases.append(("prefill: replayed signed leg", replay))

    # -- oversized bodies and headers, malformed requests (decode sidecar)
    big = b'{"model":"m","prompt":"' + b"a" * (max_body_bytes + 1024) + b'"}'
    cases += [
        ("decode: body over --max-body-bytes", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")], big, 30), (413,),
            drop_ok=True)),
        ("decode: Content-Length over limit, no body", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", raw_head=(
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {max_body_bytes * 4}\r\nConnection: close\r\n\r\n").encode(), timeout_s=10),
            (413,), drop_ok=True)),
        ("decode: 64 KiB header", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [("x-big", "a" * 65536)], body_c), drop_ok=True)),
        ("decode: 2000 headers", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [(f"x-h{i}", "v") for i in range(2000)], body_c),
            drop_ok=True)),
        ("decode: 64 KiB request line", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions?" + "a" * 65536, [], body_c), drop_ok=True)),
        ("decode: deeply nested JSON", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")],
            b'{"model":"m","prompt":' + b"[" * 100000 + b"]" * 100000 + b"}"))),
        ("decode: invalid UTF-8", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")],
            b'{"model":"m","prompt":"\xff\xfe"}'))),
        ("decode: JSON array body", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/chat/completions", [("Content-Type", "application/json")], b"[1,2]"))),
        ("decode: bad Content-Length", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", raw_head=b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: -5\r\nConnection: close\r\n\r\n"), drop_ok=True)),
        ("decode: request smuggling (CL+TE)", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", raw_head=b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"),
            drop_ok=True)),
        ("decode: client kv_transfer_params naming a host", lambda: _kv_params_not_trusted(
            decode_port, model)),
    ]

    # -- issue 17: transfer fields a client hides elsewhere, leaks
    def xargs_params(local: bool) -> tuple[bool, str]:
        with Detector("127.0.0.1") as det:
            body = {"model": model, "prompt": "x y z", "max_tokens": 2,
                    "vllm_xargs": {"kv_transfer_params": f"127.0.0.1:{det.port}"}}
            if local:
                body["n"] = 2  # served locally: the path that forwarded the client's bytes raw
            r = raw_request(decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")],
                            json.dumps(body).encode(), 30)
            time.sleep(0.3)
            if det.hits:
                return False, "something connected to the host named in vllm_xargs"
            return (r.status == 200, f"status {r.status}")

    def duplicate_key() -> tuple[bool, str]:
        with Detector("127.0.0.1") as det:
            evil = json.dumps({"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": det.port,
                               "remote_engine_id": "evil", "remote_block_ids": [[1, 2, 3]],
                               "remote_request_id": "evil-2"})
            raw = (f'{{"model":{json.dumps(model)},"prompt":"x y z","max_tokens":2,"n":2,'
                   f'"kv_transfer_params":{evil},"kv_transfer_params":null}}').encode()
            r = raw_request(decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")], raw, 30)
            time.sleep(0.3)
            if det.hits:
                return False, "something connected to the host in the first of two kv_transfer_params"
            return (r.status == 200, f"status {r.status}")

    def other_transfer_fields() -> tuple[bool, str]:
        body = {"model": model, "prompt": "x y z", "max_tokens": 2, "ec_transfer_params": {"evil": 1},
                "vllm_xargs": {"ec_transfer_params": "evil", "kv_cache_report_mode": "full"}}
        r = raw_request(decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")],
                        json.dumps(body).encode(), 30)
        return (r.status == 200, f"status {r.status}")

    def no_banner(port: int) -> tuple[bool, str]:
        r = raw_request(port, "GET", "/health")
        srv = r.headers.get("server", "")
        return ("aiohttp" not in srv and "python" not in srv.lower()), f"Server: {srv!r}"

    def models_signed() -> tuple[bool, str]:
        unsigned = raw_request(prefill_port, "GET", "/v1/models", [("x-request-id", "chaos-models-1")])
        if unsigned.status != 401:
            return False, f"unsigned /v1/models on the prefill sidecar: {unsigned.status}"
        rid = "chaos-models-" + secrets.token_hex(4)
        h = list(auth.sign(token, decode_identity, rid, "/v1/models", b"", method="GET").items())
        ok = raw_request(prefill_port, "GET", "/v1/models", [("x-request-id", rid), *h])
        return ok.status == 200, f"unsigned 401, signed {ok.status}"

    cases += [
        ("decode: vllm_xargs kv_transfer_params (local path)", lambda: xargs_params(True)),
        ("decode: vllm_xargs kv_transfer_params (disagg path)", lambda: xargs_params(False)),
        ("decode: duplicate kv_transfer_params key", duplicate_key),
        ("decode: ec_transfer_params and kv_cache_report_mode", other_transfer_fields),
        ("decode: no Server version banner", lambda: no_banner(decode_port)),
        ("prefill: no Server version banner", lambda: no_banner(prefill_port)),
        ("prefill: /v1/models needs the signature", models_signed),
    ]
    return cases


def rogue_peer_cases(decode_port: int, prefill_port: int, token: str, model: str,
                     retarget: Callable[[int], None], restore: Callable[[], None]
                     ) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    """Issue 17: something answers on the prefill peer's address (`retarget` points the
    decode sidecar's path there, `restore` undoes it). Every forged answer must end in a
    local fallback counted as peer_answer_rejected, and nothing may connect to the engine
    address the answer names."""
    def rejected() -> float:
        return sum(v for n, lb, v in prom_samples(f"http://127.0.0.1:{decode_port}")
                   if n == "pd_fallbacks_total" and lb.get("reason") == "peer_answer_rejected")

    def case(mode: str) -> Callable[[], tuple[bool, str]]:
        def check() -> tuple[bool, str]:
            body = json.dumps({"model": model, "prompt": "rogue peer answer", "max_tokens": 2}).encode()
            with Detector("127.0.0.1") as det, RoguePeer(mode, det.port, relay_port=prefill_port,
                                                         token=token) as rogue:
                retarget(rogue.port)
                try:
                    if mode == "replayed":  # the first leg is relayed: a genuine, signed answer
                        for _ in range(2):
                            first = raw_request(decode_port, "POST", "/v1/completions",
                                                [("Content-Type", "application/json")], body, 60)
                            if rogue.captured:
                                break
                        if first.status != 200 or first.headers.get("x-pd-path") != "disagg":
                            return False, f"relayed leg: {first.status} {first.headers.get('x-pd-path')}"
                    detail = ""
                    for _ in range(2):  # a pooled connection the retarget closed may cost one try
                        before = rejected()
                        r = raw_request(decode_port, "POST", "/v1/completions",
                                        [("Content-Type", "application/json")], body, 60)
                        time.sleep(0.3)
                        if det.hits:
                            return False, f"something connected to the engine the {mode} answer named"
                        path = r.headers.get("x-pd-path")
                        detail = f"status {r.status}, path {path}, peer_answer_rejected +{rejected() - before:g}"
                        if r.status != 200 or path != "fallback":
                            return False, detail
                        if rejected() > before:
                            return True, detail
                    return False, detail
                finally:
                    restore()
        return check

    return [(f"peer answer: {m}", case(m)) for m in ROGUE_MODES]


def _kv_params_not_trusted(decode_port: int, model: str) -> tuple[bool, str]:
    """A client's own kv_transfer_params (remote host/port of a probe) must never make the
    decode engine connect there: the sidecar drops them."""
    with Detector("127.0.0.1") as det:
        body = json.dumps({"model": model, "prompt": "x y z", "max_tokens": 2, "kv_transfer_params": {
            "do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": det.port,
            "remote_engine_id": "evil", "remote_block_ids": [[1, 2, 3]], "remote_request_id": "evil-1"}}).encode()
        r = raw_request(decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")], body, 30)
        time.sleep(0.3)
        if det.hits:
            return False, "something connected to the host named in client kv_transfer_params"
        if r.status is None or r.status >= 500:
            return False, f"status {r.status}"
        return True, f"status {r.status}"


def slowloris(port: int, n: int, bound_s: float, body: bool) -> tuple[int, int, float]:
    """n connections that stall (mid-headers, or mid-body when `body`); returns
    (closed by the server within bound_s, still open at bound_s, seconds until the last close)."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if body:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model\":")
        else:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        s.setblocking(False)
        socks.append(s)
    t0 = time.monotonic()
    open_ = set(range(n))
    answers: list[bytes] = []
    last = 0.0
    while open_ and time.monotonic() - t0 < bound_s:
        for i in list(open_):
            try:
                b = socks[i].recv(65536)
                if not b or b.startswith(b"HTTP/1.1 4") or b.startswith(b"HTTP/1.1 5"):
                    # closed, or answered with an error (408/413/504...): the request is over
                    answers.append(b[:12])
                    open_.discard(i)
                    last = time.monotonic() - t0
                    continue
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(i)
                last = time.monotonic() - t0
        time.sleep(0.2)
    for s in socks:
        s.close()
    slowloris.last_answers = answers  # type: ignore[attr-defined]
    return n - len(open_), len(open_), last


LOG_SECRETS_CHECKED = ("auth token", "prompt text", "Traceback")


def log_hygiene(logs: str, token: str, prompts: list[str]) -> dict[str, int]:
    """Count sidecar log lines leaking the token or prompt text, or carrying tracebacks."""
    lines = logs.splitlines()
    return {"lines": len(lines),
            "token": sum(token in ln for ln in lines),
            "prompt": sum(any(p in ln for p in prompts) for ln in lines),
            "traceback": sum("Traceback" in ln for ln in lines),
            "unhandled": sum('"unhandled error"' in ln for ln in lines)}


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


# order matters: scenarios that kill engines go last
SCENARIOS: list[tuple[str, Callable[[ChaosStack, Profile], Awaitable[Result]]]] = [
    ("load", scn_load),
    ("hostile", scn_hostile),
    ("slow_prefill_path", scn_slow_prefill_path),
    ("blackhole_prefill_path", scn_blackhole_prefill_path),
    ("transfer_timeout", scn_transfer_timeout),
    ("prefill_engine_stall", scn_prefill_engine_stall),
    ("client_cancel", scn_client_cancel),
    ("prefill_sidecar_sigterm", scn_prefill_sidecar_sigterm),
    ("decode_sidecar_restart", scn_decode_sidecar_restart),
    ("drain_decode", scn_drain_decode),
    ("prefill_engine_kill", scn_prefill_engine_kill),
    ("prefill_engine_restart", scn_prefill_engine_restart),
    ("log_hygiene", scn_log_hygiene),
]
