"""`pdsidecar run --workers N` as real processes against a fake vLLM (no engines): both
workers serve, /metrics aggregates, SIGTERM drains without losing a request, no orphans."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from bench.proxy_servers import serve_fake, wait_http
from pdsidecar.dev.procs import free_port, group_members

REPO = Path(__file__).resolve().parents[1]
CHUNKS, CHUNK_DELAY_S = 8, 0.15  # ~1.2 s per streamed request: long enough to be in flight at SIGTERM
BODY = {"model": "fake", "prompt": "hello", "stream": True, "max_tokens": 8}


@pytest.fixture(scope="module")
def fake_vllm():
    """A fake vLLM in its own process (streams CHUNKS SSE chunks, CHUNK_DELAY_S apart)."""
    port = free_port()
    p = mp.get_context("spawn").Process(target=serve_fake, args=(port, CHUNKS, CHUNK_DELAY_S), daemon=True)
    p.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    yield url
    p.terminate()
    p.join(10)


class Run:
    """One `pdsidecar run --role decode --workers N` process tree, in its own session."""

    def __init__(self, tmp_path: Path, vllm_url: str, workers: int = 2, *extra: str):
        self.port, self.mport = free_port(), free_port()
        self.workers = workers
        self.tmp = tmp_path
        self.log_path = tmp_path / "sidecar.log"
        env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        cmd = [sys.executable, "-m", "pdsidecar.sidecar", "--role", "decode", "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", str(self.mport), "--vllm-url", vllm_url,
               "--workers", str(workers), "--drain-grace", "20", *extra]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> "Run":
        """Until every worker answers (each connection reaches one worker, by the kernel's hash)."""
        wait_http(f"http://127.0.0.1:{self.mport}/metrics", timeout=60)
        seen: set[str] = set()
        end = time.monotonic() + 60
        while len(seen) < self.workers and time.monotonic() < end:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    seen.add(resp.headers.get("x-pd-worker", ""))
            except OSError:
                time.sleep(0.1)
        assert len(seen) == self.workers, f"workers answering: {seen}"
        return self

    def lines(self) -> list[dict]:
        return [json.loads(x) for x in self.log_path.read_text().splitlines() if x.startswith("{")]

    def log_tail(self, lines: int = 40) -> str:
        """The last log lines of the supervisor and workers, and how many requests they
        logged as done (to tell a stuck worker from a stuck upstream when one hangs)."""
        done = sum(1 for x in self.lines() if x.get("msg") == "request")
        text = self.log_path.read_text(errors="replace").splitlines()
        return f"requests logged: {done}\n" + "\n".join(text[-lines:])

    def worker_pids(self) -> list[int]:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            started = [x for x in self.lines() if x["msg"] == "workers started"]
            if started:
                return started[0]["pids"]
            time.sleep(0.1)
        raise AssertionError("no 'workers started' log line")

    def no_orphans(self, timeout: float = 30) -> bool:
        end = time.monotonic() + timeout
        while group_members(self.proc.pid) and time.monotonic() < end:
            time.sleep(0.1)
        return not group_members(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def run(tmp_path, fake_vllm):
    runs: list[Run] = []

    def start(*extra: str, workers: int = 2) -> Run:
        r = Run(tmp_path, fake_vllm, workers, *extra)
        runs.append(r)
        return r.wait_ready()

    yield start
    for r in runs:
        r.close()


REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60)  # one streamed request takes ~1.2 s


async def stream(session: aiohttp.ClientSession, url: str, started: asyncio.Event | None = None):
    """(status, worker header, body) of one streamed completion on a fresh connection."""
    async with session.post(url + "/v1/completions", json=BODY, timeout=REQUEST_TIMEOUT) as r:
        if started is not None:
            await r.content.readany()
            started.set()
        body = await r.read()
        return r.status, r.headers.get("x-pd-worker"), body


async def draining(session: aiohttp.ClientSession, url: str, workers: int) -> None:
    """Until /ready is 503 `draining` on every worker (fresh connections)."""
    seen: set[str] = set()
    while len(seen) < workers:
        async with session.get(url + "/ready") as r:
            if r.status == 503 and (await r.json())["reason"] == "draining":
                seen.add(r.headers["x-pd-worker"])
        await asyncio.sleep(0.02)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        return await r.text()


def test_print_config_and_bad_workers():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "pdsidecar.sidecar", "--role", "decode", "--workers", "4",
                          "--print-config"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and re.search(r"^workers +4  # flag --workers$", out.stdout, re.M)
    out = subprocess.run([sys.executable, "-m", "pdsidecar.sidecar", "--role", "decode", "--print-config"],
                         env=dict(env, PD_WORKERS="3"), capture_output=True, text=True, timeout=60)
    assert re.search(r"^workers +3  # env PD_WORKERS$", out.stdout, re.M)
    for args, needle in ((["--role", "decode", "--workers", "0"], "--workers"),
                         (["--role", "decode", "--workers", "65"], "--workers"),
                         (["--role", "decode", "--workers", "two"], "--workers"),
                         (["--role", "prefill", "--allow-unauthenticated", "--workers", "2"], "prefill role")):
        out = subprocess.run([sys.executable, "-m", "pdsidecar.sidecar", *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("pdsidecar run: error: ") and out.stderr.count("\n") == 1 and needle in out.stderr


# one retry: CI once saw one of the 64 streams get no answer headers for 300 s at the end
# of a loaded suite (not reproduced here in 16 runs, 6 busy loops on 2 cores); a failure
# now prints the sidecar's log, and failing twice still fails the suite
@pytest.mark.flaky(reruns=1, reruns_delay=5)
async def test_two_workers_serve_aggregate_metrics_and_drain(run, tmp_path):
    r = run()
    pids = r.worker_pids()
    assert len(pids) == 2
    n = 64
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as s:
        res = await asyncio.gather(*(stream(s, r.url) for _ in range(n)), return_exceptions=True)
    errors = [e for e in res if isinstance(e, BaseException)]
    assert not errors, f"{len(errors)} of {n} failed ({errors[0]!r}); the sidecar's log:\n{r.log_tail()}"
    assert all(st == 200 and body.endswith(b"data: [DONE]\n\n") for st, _, body in res)
    assert {w for _, w, _ in res} == {"0", "1"}  # the kernel spread connections over both workers

    for url in (f"http://127.0.0.1:{r.mport}/metrics", r.url + "/metrics"):  # supervisor's port, a worker's
        text = await get_text(url)
        assert metric(text, "pd_requests_total", role="decode", path="local") == n
        assert metric(text, "pd_request_duration_seconds_count", role="decode") == n
        assert metric(text, "pd_in_flight_requests") == 0
        assert metric(text, "pd_info", role="decode") == 1
        assert "pid=" not in text  # one coherent set, no per-process series

    # SIGTERM with requests in flight on both workers: all finish, new ones get 503 + Retry-After
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as s:
        events = [asyncio.Event() for _ in range(16)]
        tasks = [asyncio.create_task(stream(s, r.url, e)) for e in events]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 30)
        text = await get_text(f"http://127.0.0.1:{r.mport}/metrics")
        assert metric(text, "pd_in_flight_requests") == 16  # livesum over the workers
        r.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(draining(s, r.url, 2), 30)  # the supervisor forwarded it to both
        async with s.post(r.url + "/v1/completions", json=BODY) as late:
            assert late.status == 503 and late.headers["Retry-After"] == "1"
            assert late.headers["x-pd-error"] == "draining"
        res = await asyncio.gather(*tasks)
    assert all(st == 200 and body.endswith(b"data: [DONE]\n\n") for st, _, body in res)
    assert {w for _, w, _ in res} == {"0", "1"}
    assert await asyncio.to_thread(r.proc.wait, 60) == 0
    assert r.no_orphans()
    assert not list(tmp_path.glob("pdsidecar-metrics-*"))  # the multiprocess dir is removed
    lines = r.lines()
    assert sorted(x["worker"] for x in lines if x["msg"] == "stopped" and "worker" in x) == [0, 1]
    assert any(x["msg"] == "stopped" and x.get("clean") is True and "worker" not in x for x in lines)


def test_worker_death_stops_all(run, tmp_path):
    r = run()
    pids = r.worker_pids()
    os.kill(pids[0], signal.SIGKILL)
    assert r.proc.wait(timeout=60) == 1  # no restart: fail fast, the pod restarts
    assert r.no_orphans()
    assert not list(tmp_path.glob("pdsidecar-metrics-*"))
    assert any(x["msg"] == "worker exited unexpectedly; stopping the others" for x in r.lines())


def test_supervisor_killed_leaves_no_orphans(run):
    r = run()
    r.worker_pids()
    os.kill(r.proc.pid, signal.SIGKILL)  # no forwarding possible: PR_SET_PDEATHSIG stops the workers
    r.proc.wait(timeout=10)
    assert r.no_orphans(timeout=30)


def test_port_taken_is_one_error(tmp_path, fake_vllm):
    """SO_REUSEPORT could share a port another process holds: the supervisor checks first."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
        out = subprocess.run([sys.executable, "-m", "pdsidecar.sidecar", "--role", "decode", "--host", "127.0.0.1",
                              "--port", str(port), "--workers", "2", "--vllm-url", fake_vllm], env=env,
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "cannot listen" in out.stderr and not list(tmp_path.glob("pdsidecar-metrics-*"))
