"""``pdbench proxy``: the processes it runs: fake vLLM upstreams, a bare aiohttp hop,
real sidecar subprocesses, and the CPU pinning plan that keeps them on their own cores."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-proxy-token-0123456789"



ALL_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def cpu_plan(workers: int = 1) -> dict[str, set[int]] | None:
    """Own cores for the upstreams, the prefill sidecar, `workers` cores for each decode
    sidecar and >= 2 for the client, when the machine has that many (else no pinning)."""
    cpus = ALL_CPUS
    if len(cpus) < 5 + 2 * workers:
        return None
    d, loc = 3, 3 + workers
    plan = {"fake-prefill": {cpus[0]}, "fake-decode": {cpus[1]}, "prefill": {cpus[2]},
            "decode": set(cpus[d:d + workers]), "local": set(cpus[loc:loc + workers]),
            "client": set(cpus[loc + workers:])}
    if len(plan["client"]) >= 3:  # the bare hop (--hop-baseline) gets a core of its own
        plan["bare-hop"] = {max(plan["client"])}
        plan["client"] -= plan["bare-hop"]
    return plan


def pin_to(name: str, workers: int = 1) -> None:
    plan = cpu_plan(workers)
    if plan is not None:
        os.sched_setaffinity(0, plan[name])


def _server_process_setup(pin: str | None) -> None:
    """In a bench server process: pin it (when planned) and use uvloop when installed."""
    if pin:
        pin_to(pin)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def serve_fake(port: int, chunks: int, delay_s: float, pin: str | None = None) -> None:
    from aiohttp import web

    _server_process_setup(pin)
    chunk_bodies = [f'data: {{"id":"cmpl-x","object":"text_completion","choices":[{{"index":0,"text":"t{i}",'
                    f'"finish_reason":null}}]}}\n\n'.encode() for i in range(chunks)]
    prefill = json.dumps({"id": "cmpl-p", "object": "text_completion", "choices": [{"index": 0, "text": "x"}],
                          "usage": {"prompt_tokens": 64, "completion_tokens": 1, "total_tokens": 65},
                          "kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": [[1, 2, 3, 4]],
                                                 "remote_engine_id": "e", "remote_request_id": "r",
                                                 "remote_host": "127.0.0.1", "remote_port": 5600}}).encode()

    async def gen(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (body.get("kv_transfer_params") or {}).get("do_remote_decode"):
            return web.Response(body=prefill, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for c in chunk_bodies:
            await resp.write(c)
            if delay_s:
                await asyncio.sleep(delay_s)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(request):
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v1/completions", gen)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, handle_signals=True)


def serve_bare_hop(port: int, upstream: str, pin: str | None = None) -> None:
    """A bare aiohttp pass-through proxy: read the body, POST it upstream on a pooled
    session, stream the answer back. No parsing, metrics, logs or limits: the floor of
    one Python HTTP hop, against which the sidecar's added latency is read."""
    import aiohttp
    from aiohttp import web

    _server_process_setup(pin)
    state: dict = {}

    async def hop(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        async with state["session"].post(upstream + request.path, data=data,
                                         headers={"content-type": "application/json"}) as up:
            out = web.StreamResponse(status=up.status, headers={"Content-Type": up.content_type})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def health(request):
        return web.Response(text="")

    async def on_startup(app):
        state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                 cookie_jar=aiohttp.DummyCookieJar())

    async def on_cleanup(app):
        await state["session"].close()

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/completions", hop)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, handle_signals=True)


def wait_http(url: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def start_sidecar(role: str, port: int, vllm_url: str, extra: list[str], log_level: str,
                   pin: str | None = None, workers: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdsidecar.sidecar", "--role", role, "--host", "127.0.0.1", "--port", str(port),
           "--vllm-url", vllm_url, "--auth-token", TOKEN, "--log-level", log_level, "--peer-stats-interval", "0",
           "--workers", str(workers), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=(lambda: pin_to(pin, workers)) if pin else None)


def wait_workers(url: str, workers: int, timeout: float = 60.0) -> None:
    """Until every worker of a `--workers N` sidecar answers (fresh connections spread by hash)."""
    seen: set[str] = set()
    end = time.monotonic() + timeout
    while len(seen) < workers and time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                seen.add(r.headers.get("x-pd-worker") or "0")
        except OSError:
            time.sleep(0.1)
    if len(seen) < workers:
        raise RuntimeError(f"{url}: only workers {sorted(seen)} of {workers} answer")


def stop_processes(procs: list) -> None:
    """Stop bench processes: sidecar process groups (SIGTERM, then SIGKILL) and fakes."""
    for pr in procs:
        if isinstance(pr, subprocess.Popen):
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGTERM)
                try:
                    pr.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(pr.pid, signal.SIGKILL)
                    pr.wait()
        else:
            pr.terminate()
            pr.join(5)
    procs.clear()
