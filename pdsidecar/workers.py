"""`pdsidecar run --workers N` (N > 1): a supervisor and N worker processes on one port.

The supervisor (the process the user started) never serves the API. It

* checks the listen port is free (SO_REUSEPORT would otherwise silently share it with
  another process of the same user),
* creates a private `PROMETHEUS_MULTIPROC_DIR` and starts N workers
  (`python -m pdsidecar.sidecar <same argv>` with `PDSIDECAR_WORKER_INDEX=i` in the
  environment); each binds `--port` with SO_REUSEPORT and the kernel spreads connections,
* serves `--metrics-port` itself (aggregated over all workers: one listener),
* on SIGTERM/SIGINT forwards SIGTERM to every worker (each drains as a single sidecar
  does), waits `--drain-grace` + `KILL_MARGIN_S`, SIGKILLs what is left, exits 0 when every
  worker exited 0, else 1,
* when a worker dies on its own it does not restart it: it drains the others and exits 1
  (the pod restarts; a half-alive sidecar would hide the fault),
* removes the metrics directory on exit. Workers get SIGTERM if the supervisor dies
  (PR_SET_PDEATHSIG), so no orphans are left even after a SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence

from proxy.config import SidecarConfig

log = logging.getLogger("pdsidecar.workers")

WORKER_ENV = "PDSIDECAR_WORKER_INDEX"  # set by the supervisor only
SUPERVISOR_ENV = "PDSIDECAR_SUPERVISOR_PID"
KILL_MARGIN_S = 5.0  # after --drain-grace, before SIGKILL


def worker_index(environ: dict[str, str] | None = None) -> int | None:
    """This process's worker index when a supervisor started it, else None."""
    v = (os.environ if environ is None else environ).get(WORKER_ENV, "")
    return int(v) if v.isdigit() else None


def die_with_supervisor() -> bool:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux); False if it already has."""
    from pdsidecar.parent_death import set_parent_death_signal

    parent = os.environ.get(SUPERVISOR_ENV, "")
    set_parent_death_signal(signal.SIGTERM)
    return not parent.isdigit() or os.getppid() == int(parent)


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound exclusively now (None when it can)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return str(e)
    family, stype, proto, _, addr = infos[0]
    with socket.socket(family, stype, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return e.strerror or str(e)
    return None


class Supervisor:
    """Starts, watches and stops the workers of one `pdsidecar run --workers N`."""

    def __init__(self, cfg: SidecarConfig, argv: Sequence[str]):
        self.cfg = cfg
        self.argv = list(argv)
        self.procs: list[asyncio.subprocess.Process] = []
        self.metrics_dir = ""
        self._metrics_runner = None

    async def run(self) -> int:
        """Serve until a signal or a worker's death; 0 when every worker drained cleanly."""
        why = port_in_use(self.cfg.host, self.cfg.port)
        if why is not None:
            log.error("cannot listen", extra={"host": self.cfg.host, "port": self.cfg.port, "error": why})
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.metrics_dir = tempfile.mkdtemp(prefix="pdsidecar-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir  # before prometheus_client is imported
        try:
            await self._start_workers()
            if not await self._start_metrics():
                return await self._stop_workers(unexpected=True)
            log.info("workers started", extra={"workers": len(self.procs), "port": self.cfg.port,
                                                "pids": [p.pid for p in self.procs]})
            unexpected = await self._wait(stop)
            return await self._stop_workers(unexpected)
        finally:
            await self._stop_metrics()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _start_workers(self) -> None:
        base = dict(os.environ, **{SUPERVISOR_ENV: str(os.getpid())})
        for i in range(self.cfg.workers):
            env = dict(base, **{WORKER_ENV: str(i)})
            self.procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pdsidecar.sidecar", *self.argv, env=env))

    async def _wait(self, stop: asyncio.Event) -> bool:
        """Block until a signal (False) or until a worker exits on its own (True)."""
        stop_task = asyncio.create_task(stop.wait())
        exits = {asyncio.create_task(p.wait()): p for p in self.procs}
        done, _ = await asyncio.wait([stop_task, *exits], return_when=asyncio.FIRST_COMPLETED)
        for t in [stop_task, *exits]:
            if t not in done:
                t.cancel()
        if stop_task in done:
            log.info("stopping workers", extra={"workers": len(self.procs)})
            return False
        for t in done:
            p = exits[t]
            log.error("worker exited unexpectedly; stopping the others", extra={"pid": p.pid, "rc": p.returncode})
        return True

    async def _stop_workers(self, unexpected: bool) -> int:
        """SIGTERM every live worker, wait for the drain, SIGKILL leftovers, forget their gauges."""
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        wait_all = asyncio.gather(*(p.wait() for p in self.procs))
        try:
            await asyncio.wait_for(wait_all, self.cfg.drain_grace_s + KILL_MARGIN_S)
        except asyncio.TimeoutError:
            for p in self.procs:
                if p.returncode is None:
                    log.error("worker did not stop in time; killing it", extra={"pid": p.pid})
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in self.procs))
        from prometheus_client.multiprocess import mark_process_dead

        for p in self.procs:
            mark_process_dead(p.pid, self.metrics_dir)
        rcs = [p.returncode for p in self.procs]
        clean = not unexpected and all(rc == 0 for rc in rcs)
        log.info("stopped", extra={"clean": clean, "worker_rcs": rcs})
        return 0 if clean else 1

    async def _start_metrics(self) -> bool:
        """The metrics port, aggregated over all workers (False when it cannot listen)."""
        c = self.cfg
        if c.metrics_port is None:
            return True
        from aiohttp import web

        from proxy.metrics import CONTENT_TYPE_LATEST, render_multiprocess

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=render_multiprocess(self.metrics_dir),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        try:
            await web.TCPSite(self._metrics_runner, c.host, c.metrics_port, reuse_address=True).start()
        except OSError as e:
            log.error("cannot listen", extra={"host": c.host, "port": c.metrics_port, "error": e.strerror or str(e)})
            return False
        return True

    async def _stop_metrics(self) -> None:
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None


def supervise(cfg: SidecarConfig, argv: Sequence[str]) -> int:
    """Run the supervisor of `cfg.workers` workers until they stop; the exit status."""
    return asyncio.run(Supervisor(cfg, argv).run())
