"""Prefill role: accepts prefill legs from authenticated decode sidecars only.

Each leg is checked (HMAC-signed `x-pd-peer` identity, allowlist on host AND port, socket
source address), forwarded untouched to the local vLLM, and the KV it leaves behind is
tracked per decode peer until that peer reports pickup/release (`POST /pd/v1/release`)
or the engine's KV lease ends (proxy.pending). `/pd/v1/stats` shows the pending KV to
routers and peers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from . import auth
from .body import API_PATHS, loads_or_none, sanitize_unsigned_leg
from .endpoints import Endpoint, parse_endpoint
from .errors import RequestError
from .peers import Allowlist, canonical_ip
from .pending import Pending, PendingKV
from .release import ReleaseStatus
from .server import PD_ERROR_HEADER, forward_headers

log = logging.getLogger("pdsidecar.prefill")

RELEASE_STATUSES = tuple(s.value for s in ReleaseStatus)
HOUSEKEEPING_S = 1.0  # nonce and pending-KV expiry, allowlist refresh check


class PrefillRole:
    def __init__(self, sc):
        self.sc = sc
        cfg = sc.cfg
        self.allow = Allowlist(cfg.allowed_peers)
        self.pending = PendingKV()
        self.nonces = auth.NonceCache(cfg.replay_cache_size)
        self._known_peers: set[str] = set()
        self._bg: list[asyncio.Task] = []

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/pd/v1/release", self.release)

    async def start(self) -> None:
        await self.allow.refresh()
        self._bg.append(self.sc.spawn(self._housekeeping()))

    async def stop(self) -> None:
        for t in self._bg:
            t.cancel()

    async def _housekeeping(self) -> None:
        cfg = self.sc.cfg
        last_dns = time.monotonic()
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            self.nonces.expire()
            n = self.pending.expire()
            if n:
                self.sc.metrics.kv_expired.inc(n)
                log.warning("pending KV expired without pickup (the engine's lease ended)", extra={"count": n})
            if time.monotonic() - last_dns > cfg.dns_refresh_s:
                last_dns = time.monotonic()
                try:
                    await self.allow.refresh()
                except Exception:
                    log.warning("allowlist refresh failed", exc_info=True)

    def refresh_gauges(self) -> None:
        m = self.sc.metrics
        _, peers = self.pending.summary()
        gauges = (m.pending_requests, m.pending_tokens, m.pending_blocks, m.pending_bytes, m.pending_age)
        for peer, d in peers.items():
            m.pending_requests.labels(peer).set(d["requests"])
            m.pending_tokens.labels(peer).set(d["tokens"])
            m.pending_blocks.labels(peer).set(d["blocks"])
            m.pending_bytes.labels(peer).set(d["bytes"])
            m.pending_age.labels(peer).set(d["oldest_age_s"])
        # a peer with nothing pending loses its label values: labels stay bounded by the
        # peers that hold KV now, not every peer ever seen
        for peer in self._known_peers - set(peers):
            for g in gauges:
                try:
                    g.remove(peer)
                except KeyError:
                    pass
        self._known_peers = set(peers)

    def stats(self) -> dict[str, Any]:
        total, peers = self.pending.summary()
        return {"pending": total, "peers": peers}

    # --------------------------------------------------------------- auth
    def _deny(self, request: web.Request, rid: str, status: int, reason: str, message: str) -> RequestError:
        self.sc.metrics.auth_failures.labels(reason).inc()
        log.warning("peer rejected", extra={"request_id": rid if auth.printable(rid, 128) else "<invalid>",
                                            "reason": reason, "remote": request.remote})
        return RequestError(status, message, reason, headers={PD_ERROR_HEADER: reason})

    _AUTH_MESSAGES = {
        "missing": "prefill legs need a valid peer signature",
        "malformed": "peer authentication headers and x-request-id must be printable ASCII "
                     "(x-pd-timestamp digits, x-pd-nonce 16-128 [A-Za-z0-9_-], x-pd-content-sha256 hex)",
        "bad_signature": "prefill legs need a valid peer signature",
        "stale": "peer signature timestamp outside the allowed clock skew",
    }

    def _authenticate(self, request: web.Request, rid: str) -> Endpoint:
        """Check the signed headers (before the body is read); `_check_body` finishes the job."""
        cfg = self.sc.cfg

        def deny(status: int, reason: str, message: str) -> RequestError:
            return self._deny(request, rid, status, reason, message)

        claimed = request.headers.get(auth.PEER_HEADER)
        if cfg.auth_token:
            why = auth.verify(cfg.auth_token, request.headers, rid, request.path, request.method)
            if why is not None:
                raise deny(401, why, self._AUTH_MESSAGES.get(why, "prefill legs need a valid peer signature"))
            if self.nonces.seen(auth.NonceCache.key(claimed, request.headers[auth.NONCE_HEADER])):
                raise deny(401, "replayed", "this signed request was already used (replay refused)")
        elif claimed is not None and not auth.printable(claimed):
            raise deny(400, "malformed", "x-pd-peer must be host:port")
        if not cfg.auth_token and not self.allow:
            # --allow-unauthenticated without an allowlist: a claimed host:port can be
            # neither checked nor trusted, so the peer is its socket address (port 0) and
            # never a client-chosen label
            return Endpoint(canonical_ip(request.remote) or "unknown", 0)
        if not claimed:
            raise deny(401, "missing", "prefill legs must name their decode sidecar in x-pd-peer")
        try:
            peer = parse_endpoint(claimed)
        except ValueError:
            raise deny(400, "bad_signature", "x-pd-peer must be host:port") from None
        if self.allow and not self.allow.allows(peer.host, peer.port):
            raise deny(403, "peer_not_allowed", "this decode sidecar is not allowed")
        if cfg.peer_source_check and not self.allow.host_matches_source(peer.host, request.remote):
            raise deny(403, "source_mismatch", "connection source does not match x-pd-peer")
        return peer

    async def check_signed(self, request: web.Request) -> Endpoint:
        """A signed, non-generate request (GET /v1/models): the same checks as a leg."""
        rid = request.headers.get("x-request-id", "")
        peer = self._authenticate(request, rid)
        self._check_body(request, rid, await self.sc.read_body(request))
        return peer

    def _check_body(self, request: web.Request, rid: str, raw: bytes) -> None:
        """After reading the body: it must be the one that was signed, and the nonce must be
        new (recorded now, so a replay - even a concurrent one - is refused)."""
        if not self.sc.cfg.auth_token:
            return
        if not auth.verify_body(request.headers, raw):
            raise self._deny(request, rid, 401, "body_mismatch", "request body does not match the signed digest")
        h = request.headers
        verdict = self.nonces.check_and_add(auth.NonceCache.key(h[auth.PEER_HEADER], h[auth.NONCE_HEADER]),
                                            float(h[auth.TS_HEADER]))
        if verdict == "replay":
            raise self._deny(request, rid, 401, "replayed", "this signed request was already used (replay refused)")
        if verdict == "full":
            self.sc.metrics.rejected.labels("replay_cache_full").inc()
            log.warning("replay cache full; refusing signed requests", extra={"entries": len(self.nonces)})
            raise RequestError(503, "too many signed requests in the replay window; retry later", "replay_cache_full",
                               headers={"Retry-After": "1", PD_ERROR_HEADER: "overloaded"})

    # ------------------------------------------------------------ handlers
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def _handle(self, request: web.Request, api: str) -> web.StreamResponse:
        sc, cfg, m = self.sc, self.sc.cfg, self.sc.metrics
        rid = request.headers.get("x-request-id", "")
        if not rid or len(rid) > 128:
            m.rejected.labels("no_request_id").inc()
            raise RequestError(400, "prefill legs need an x-request-id", "missing_request_id",
                               headers={PD_ERROR_HEADER: "bad_request"})
        peer = self._authenticate(request, rid)  # 401 first: a bad x-request-id fails the signature
        if not auth.printable(rid, 128):
            m.rejected.labels("no_request_id").inc()
            raise RequestError(400, "x-request-id must be printable ASCII", "invalid_request_id",
                               headers={PD_ERROR_HEADER: "bad_request"})
        sc.admit()
        t0 = time.perf_counter()
        status, path = 0, "error"
        try:
            raw = await sc.read_body(request)
            self._check_body(request, rid, raw)
            if not cfg.auth_token:  # nobody vouches for this body: no client transfer fields
                raw = sanitize_unsigned_leg(raw)
            headers = forward_headers(request, rid)
            try:
                t_send = time.perf_counter()
                async with sc.upstreams.get(cfg.vllm_url).post(
                        cfg.vllm_url + API_PATHS[api], data=raw, headers=headers,
                        allow_redirects=False, timeout=aiohttp.ClientTimeout(total=cfg.prefill_timeout_s,
                                                      sock_connect=cfg.connect_timeout_s)) as r:
                    payload = await r.read()
                    status, ctype = r.status, r.content_type
                t_done = time.perf_counter()
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                m.upstream_errors.labels("connect").inc()
                raise RequestError(502, "prefill vLLM is unreachable", "upstream_unavailable") from None
            except asyncio.TimeoutError:
                m.upstream_errors.labels("timeout").inc()
                raise RequestError(504, "prefill vLLM timed out", "upstream_timeout") from None
            except aiohttp.ClientError as e:
                m.upstream_errors.labels("disconnect").inc()
                raise RequestError(502, f"prefill vLLM dropped the connection ({type(e).__name__})",
                                   "upstream_error") from None
            if 300 <= status < 400:
                # redirects are never followed (allow_redirects=False) nor passed on
                m.upstream_errors.labels("redirect").inc()
                raise RequestError(502, f"prefill vLLM answered a redirect ({status})", "upstream_error")
            if status == 200:
                path = "disagg"
                self._track(rid, str(peer), payload)
            m.overhead.labels("prefill").observe(max((t_done - t0) - (t_done - t_send), 0.0))
            # signed for the leg's nonce: the decode sidecar trusts nothing unsigned
            signed = auth.sign_answer(cfg.auth_token, request.headers.get(auth.NONCE_HEADER, ""), rid, status, payload)
            return web.Response(status=status, body=payload, content_type=ctype or "application/json",
                                headers={"x-request-id": rid, **signed})
        except asyncio.CancelledError:
            m.client_disconnects.labels("prefill").inc()  # decode sidecar closed: vLLM aborts too
            raise
        finally:
            sc.release()
            dt = time.perf_counter() - t0
            m.requests.labels("prefill", api, path).inc()
            m.request_seconds.labels("prefill", path).observe(dt)
            log.info("prefill leg", extra={"request_id": rid, "api": api, "status": status, "peer": str(peer),
                                           "duration_ms": round(dt * 1000, 3)})

    def _track(self, rid: str, peer: str, payload: bytes) -> None:
        obj = loads_or_none(payload)
        if not isinstance(obj, dict):
            return
        kv = obj.get("kv_transfer_params")
        if not isinstance(kv, dict):
            return
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        tokens = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
        self.pending.add(rid, Pending.from_params(peer, tokens, kv))

    async def release(self, request: web.Request) -> web.Response:
        rid = request.headers.get("x-request-id", "")
        peer = self._authenticate(request, rid)
        raw = await self.sc.read_body(request)
        self._check_body(request, rid, raw)
        try:
            data = json.loads(raw)
            items = data["releases"]
            assert isinstance(items, list)
        except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
            raise RequestError(400, "body must be {\"releases\": [{\"id\", \"status\"}]}", "invalid_body") from None
        n = 0
        for it in items[:10000]:
            if not isinstance(it, dict) or not isinstance(it.get("id"), str):
                continue
            status = it.get("status") if it.get("status") in RELEASE_STATUSES else "released"
            if self.pending.pop(it["id"], str(peer)) is not None:
                n += 1
                self.sc.metrics.kv_released.labels(status).inc()
        return web.json_response({"released": n})
