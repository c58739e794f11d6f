"""The sidecar's aiohttp server: shared routes, limits, pooled upstreams, drain.

`Sidecar(cfg)` builds the app for its role (decode: `proxy.decode.DecodeRole`, prefill:
`proxy.prefill.PrefillRole`); `await sidecar.start()` listens, `await sidecar.drain()`
stops taking new work, waits for in-flight requests (up to the grace period) and closes.

`Sidecar(cfg, worker=i)` is one of `--workers N` processes (pdsidecar.workers): it shares
the port (SO_REUSEPORT), leaves the metrics port to the supervisor, serves aggregated
multiprocess metrics, tags responses with `x-pd-worker: i` and refreshes its gauges every
`GAUGE_REFRESH_S` (a scrape reaches one worker only).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

import aiohttp
import aiohttp.web_response as _web_response
from aiohttp import web

from .config import SidecarConfig
from .metrics import CONTENT_TYPE_LATEST, Metrics

from .errors import RequestError, error_response

log = logging.getLogger("pdsidecar.proxy")

VERSION = "0.1.0"
PATH_HEADER = "x-pd-path"
DP_RANK_HEADER = "X-data-parallel-rank"  # vLLM: serve this request on that DP rank
PD_ERROR_HEADER = "x-pd-error"
WORKER_HEADER = "x-pd-worker"
GAUGE_REFRESH_S = 1.0  # --workers: how stale another worker's state-derived gauges may be
_RID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# headers passed on to upstreams (everything else is dropped; hop-by-hop never goes through)
FORWARD_HEADERS = ("authorization", "traceparent", "tracestate", "baggage")
# `Server:` on every response, aiohttp's parser-level errors (400/413/431 before a handler
# runs) included: never aiohttp's default, which names the Python and aiohttp versions
SERVER_BANNER = "pdsidecar"
_web_response.SERVER_SOFTWARE = SERVER_BANNER


def request_id(request: web.Request) -> str:
    rid = request.headers.get("x-request-id", "")
    return rid if _RID_RE.match(rid) else uuid.uuid4().hex


_HEADER_VALUE_RE = re.compile(r"^[\x20-\x7e\t]*$")


def forward_headers(request: web.Request, rid: str) -> dict[str, str]:
    """Headers for an upstream call; a forwarded value that is not printable ASCII (aiohttp
    hands bytes >= 0x80 over surrogate-escaped) is the client's error: 400, never a 500."""
    h = {"content-type": "application/json", "x-request-id": rid}
    for name in FORWARD_HEADERS:
        v = request.headers.get(name)
        if v is not None:
            if not _HEADER_VALUE_RE.match(v):
                raise RequestError(400, f"header {name} must be printable ASCII", "invalid_header", param=name)
            h[name] = v
    return h


class Upstreams:
    """One pooled ClientSession per upstream base URL."""

    def __init__(self, cfg: SidecarConfig):
        self.cfg = cfg
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def get(self, base: str) -> aiohttp.ClientSession:
        s = self._sessions.get(base)
        if s is None or s.closed:
            c = self.cfg
            conn = aiohttp.TCPConnector(limit=c.pool_size, keepalive_timeout=c.keepalive_s,
                                        ttl_dns_cache=int(c.dns_refresh_s) or 10)
            s = aiohttp.ClientSession(
                base_url=None, connector=conn,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=c.connect_timeout_s),
                max_line_size=c.max_header_bytes, max_field_size=c.max_header_bytes,
                auto_decompress=False, skip_auto_headers=("User-Agent",),
                # a proxy must not keep one client's cookies and replay them for the next
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._sessions[base] = s
        return s

    async def close(self) -> None:
        for s in list(self._sessions.values()):
            await s.close()
        self._sessions.clear()


class Sidecar:
    def __init__(self, cfg: SidecarConfig, metrics: Metrics | None = None, worker: int | None = None):
        self.cfg = cfg
        self.worker = worker
        self.metrics = metrics or Metrics(cfg.role, multiprocess=worker is not None)
        self.metrics.info.labels(cfg.role, cfg.protocol, VERSION).set(1)
        self.upstreams = Upstreams(cfg)
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._ready_cache: tuple[float, bool] = (0.0, False)
        self.port: int | None = None
        self.metrics_port: int | None = None
        if cfg.role == "decode":
            from .decode import DecodeRole

            self.role = DecodeRole(self)
        else:
            from .prefill import PrefillRole

            self.role = PrefillRole(self)
        self.app = self._build_app()

    # ------------------------------------------------------------------ app
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[self._errors_mw],
                              handler_args={"max_line_size": self.cfg.max_header_bytes,
                                            "max_field_size": self.cfg.max_header_bytes})
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/pd/v1/stats", self.stats)
        self.role.add_routes(app)
        if self.worker is not None:
            app.on_response_prepare.append(self._tag_worker)
        return app

    async def _tag_worker(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = str(self.worker)

    @web.middleware
    async def _errors_mw(self, request: web.Request, handler):
        try:
            return await handler(request)
        except RequestError as e:
            return e.response()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.rejected.labels("body_too_large").inc()
            return error_response(413, f"request body larger than {self.cfg.max_body_bytes} bytes", "body_too_large")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, e.reason or "error", str(e.status))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # never a traceback to the client
            log.error("unhandled error", exc_info=True, extra={"error": type(e).__name__, "path": request.path})
            return error_response(500, "internal sidecar error", "internal_error")

    # ------------------------------------------------------------ in-flight
    def admit(self) -> None:
        """Count a generate request in, or refuse it (draining / too many)."""
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise RequestError(503, "sidecar is draining; retry on another replica", "draining",
                               headers={"Retry-After": "1", PD_ERROR_HEADER: "draining", "Connection": "close"})
        if self.in_flight >= self.cfg.max_in_flight:
            self.metrics.rejected.labels("overloaded").inc()
            raise RequestError(503, "too many requests in flight", "overloaded",
                               headers={"Retry-After": "1", PD_ERROR_HEADER: "overloaded"})
        self.in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.labels(self.cfg.role).set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.labels(self.cfg.role).set(self.in_flight)
        if self.in_flight == 0:
            self._idle.set()

    async def read_body(self, request: web.Request) -> bytes:
        """The client's body, bounded by --max-body-bytes (413) and --client-body-timeout
        (408 + close), so a slow client cannot hold an in-flight slot for the total timeout."""
        t = self.cfg.client_body_timeout_s
        timeout = getattr(asyncio, "timeout", None)  # no extra task (Python >= 3.11)
        try:
            if timeout is None:
                return await asyncio.wait_for(request.read(), t)
            async with timeout(t):
                return await request.read()
        except asyncio.TimeoutError:
            self.metrics.rejected.labels("client_body_timeout").inc()
            raise RequestError(408, f"request body not received within {self.cfg.client_body_timeout_s:g} s "
                                    "(--client-body-timeout)", "client_body_timeout",
                               headers={"Connection": "close"}, close=True) from None

    def spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # --------------------------------------------------------------- routes
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "role": self.cfg.role})

    async def _vllm_ready(self) -> bool:
        t, ok = self._ready_cache
        now = time.monotonic()
        if now - t < 1.0:
            return ok
        try:
            async with self.upstreams.get(self.cfg.vllm_url).get(
                    self.cfg.vllm_url + "/health", allow_redirects=False, timeout=aiohttp.ClientTimeout(total=2)) as r:
                ok = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        self._ready_cache = (now, ok)
        return ok

    async def ready(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        if not await self._vllm_ready():
            return web.json_response({"ready": False, "reason": "vllm not ready"}, status=503)
        return web.json_response({"ready": True, "role": self.cfg.role})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        self.role.refresh_gauges()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        if self.cfg.role == "prefill":
            # the prefill role serves peers only: a signed GET, like every prefill leg
            await self.role.check_signed(request)
        try:
            async with self.upstreams.get(self.cfg.vllm_url).get(
                    self.cfg.vllm_url + "/v1/models", headers=forward_headers(request, request_id(request)),
                    allow_redirects=False, timeout=aiohttp.ClientTimeout(total=self.cfg.prefill_timeout_s,
                                                  sock_connect=self.cfg.connect_timeout_s)) as r:
                body = await r.read()
                if 300 <= r.status < 400:  # never followed, never passed on
                    self.metrics.upstream_errors.labels("redirect").inc()
                    return error_response(502, f"local vLLM answered a redirect ({r.status})", "upstream_error")
                return web.Response(status=r.status, body=body,
                                    content_type=r.content_type or "application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            self.metrics.upstream_errors.labels("connect").inc()
            log.warning("local vLLM unavailable for /v1/models", extra={"error": type(e).__name__})
            return error_response(502, "local vLLM unavailable", "upstream_unavailable")

    async def stats(self, request: web.Request) -> web.Response:
        base: dict[str, Any] = {"role": self.cfg.role, "identity": str(self.cfg.identity()),
                                "protocol": self.cfg.protocol, "draining": self.draining,
                                "in_flight": self.in_flight}
        if self.worker is not None:
            base["worker"] = self.worker  # in_flight and the role's numbers are this worker's
        base.update(self.role.stats())
        return web.json_response(base)

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> "Sidecar":
        c = self.cfg
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     keepalive_timeout=c.server_keepalive_s,
                                     shutdown_timeout=max(c.drain_grace_s, 0.1))
        await self._runner.setup()
        site = web.TCPSite(self._runner, c.host, c.port, backlog=1024, reuse_address=True,
                           reuse_port=True if self.worker is not None else None)
        await site.start()
        self.port = self._bound_port(site) or c.port
        if c.metrics_port is not None and self.worker is None:  # workers: the supervisor serves it
            mapp = web.Application()
            mapp.router.add_get("/metrics", self.metrics_handler)
            self._metrics_runner = web.AppRunner(mapp, access_log=None)
            await self._metrics_runner.setup()
            msite = web.TCPSite(self._metrics_runner, c.host, c.metrics_port, reuse_address=True)
            await msite.start()
            self.metrics_port = self._bound_port(msite) or c.metrics_port
        await self.role.start()
        if self.worker is not None:
            self.spawn(self._refresh_gauges_loop())
        log.info("sidecar listening", extra={"role": c.role, "port": self.port, "metrics_port": self.metrics_port,
                                             "vllm_url": c.vllm_url, "identity": str(c.identity())})
        return self

    async def _refresh_gauges_loop(self) -> None:
        """Workers: keep this process's state-derived gauges fresh for scrapes served elsewhere."""
        while True:
            await asyncio.sleep(GAUGE_REFRESH_S)
            self.role.refresh_gauges()

    @staticmethod
    def _bound_port(site: web.TCPSite) -> int | None:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return server.sockets[0].getsockname()[1]
        return None

    @property
    def url(self) -> str:
        host = self.cfg.host if self.cfg.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def drain(self) -> bool:
        """Stop admitting, wait up to the grace period for in-flight requests, close.

        True when every in-flight request finished in time."""
        self.draining = True
        self.metrics.draining.set(1)
        log.info("draining", extra={"in_flight": self.in_flight, "grace_s": self.cfg.drain_grace_s})
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.cfg.drain_grace_s)
            clean = True
        except asyncio.TimeoutError:
            clean = False
            log.warning("drain grace period over; closing with requests in flight",
                        extra={"in_flight": self.in_flight})
        await self.stop()
        return clean

    async def stop(self) -> None:
        await self.role.stop()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            self._runner._shutdown_timeout = 0.5  # drain already waited
            await self._runner.cleanup()
            self._runner = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        await self.upstreams.close()
