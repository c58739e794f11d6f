"""Decode role: the router-facing side of a P/D handoff, as orchestration over its parts.

Per request (`PdRequest`): validate, decide whether to disaggregate (proxy.tokens for the
local threshold), pick a prefill peer (llm-d `x-prefiller-host-port`, or the least
pending-KV target: proxy.peers), run the prefill leg (proxy.prefill_leg), then the decode
leg on the local vLLM with the returned `kv_transfer_params` (proxy.decode_leg), streaming
bytes through as they arrive (or, `--first-token-from-prefill`, the prefill leg's token
first and the decode engine continuing from it: proxy.first_token_leg); push mode runs
both legs at once (proxy.push). Short
prompts and unsupported requests run locally; a failed prefill leg is recomputed locally
(`--fallback fallback`) or answered 502/504 (`--fallback fail`). KV left on a peer is
handed back through proxy.release.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from .body import decode_body, parse_client_request, reuse_eligible, unsupported_for_disagg
from .decode_leg import DecodeLeg
from .endpoints import Endpoint
from .errors import ClientFault, PrefillFailed, RecomputeLocally, RequestError, error_response
from .first_token_leg import FirstTokenLeg
from .pd_request import PdRequest, PrefillResult
from .peers import Allowlist, PeerSet, PeerWatcher, parse_prefiller_header
from .prefill_leg import PrefillLeg
from .push import PushLeg
from .release import KvRelease
from .server import PATH_HEADER, request_id
from .tokens import TokenEstimator
from .tracing import span

log = logging.getLogger("pdsidecar.decode")

PREFILLER_HEADER = "x-prefiller-host-port"


class DecodeRole:
    def __init__(self, sc):
        self.sc = sc
        cfg = sc.cfg
        self.identity = cfg.identity()
        self.peers = PeerSet(list(cfg.targets))
        # the llm-d header may name a configured target or an allowlisted peer, nothing else
        self.allow = Allowlist(list(cfg.targets) + list(cfg.allowed_peers))
        self.watcher = PeerWatcher(sc, self.peers, self.allow)
        self.release = KvRelease(sc, self.peers, self.identity)
        self.tokens = TokenEstimator(sc)
        self.prefill_leg = PrefillLeg(sc, self.peers, self.identity)
        self.decode_leg = DecodeLeg(sc, self.release)
        self.first_token = FirstTokenLeg(sc, self.release, self.tokens)
        self.push = PushLeg(sc, self.peers, self.identity, self.decode_leg)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)

    async def start(self) -> None:
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()

    def refresh_gauges(self) -> None:
        self.watcher.refresh_gauges()

    def stats(self) -> dict[str, Any]:
        return self.peers.stats()

    # ------------------------------------------------------------ handlers
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def _handle(self, request: web.Request, api: str) -> web.StreamResponse:
        sc = self.sc
        sc.admit()
        rq = PdRequest(request, api, request_id(request), time.perf_counter())
        try:
            timeout = getattr(asyncio, "timeout", None)
            if timeout is not None:
                async with timeout(sc.cfg.total_timeout_s):
                    return await self._serve(rq)
            return await asyncio.wait_for(self._serve(rq), sc.cfg.total_timeout_s)  # Python 3.10
        except RequestError as e:
            rq.status = e.status
            return e.response()
        except RecursionError:  # a body json.loads accepted but too deep to re-encode
            rq.status = 400
            return error_response(400, "request body is nested too deeply", "invalid_json")
        except asyncio.TimeoutError:
            rq.status = 504
            sc.metrics.upstream_errors.labels("total_timeout").inc()
            return error_response(504, "request exceeded the total timeout", "timeout")
        except asyncio.CancelledError:
            rq.status = 499
            raise
        finally:
            sc.release()
            dt = time.perf_counter() - rq.t0
            sc.metrics.requests.labels("decode", api, rq.path).inc()
            sc.metrics.request_seconds.labels("decode", rq.path).observe(dt)
            log.info("request", extra={"request_id": rq.rid, "api": api, "pd_path": rq.path,
                                       "status": rq.status, "peer": rq.peer,
                                       "duration_ms": round(dt * 1000, 3)})

    def _forced_peer(self, request: web.Request) -> Endpoint | None:
        """The llm-d router's `x-prefiller-host-port`, if sent: strict, and allowed."""
        m = self.sc.metrics
        hdr = request.headers.get(PREFILLER_HEADER)
        if hdr is None or not hdr.strip():
            return None
        try:
            forced = parse_prefiller_header(hdr)
        except ValueError as e:
            m.rejected.labels("bad_prefiller").inc()
            raise RequestError(400, f"{PREFILLER_HEADER}: {e}", "invalid_prefiller", param=PREFILLER_HEADER) from None
        if not self.allow.allows(forced.host, forced.port):
            m.rejected.labels("peer_not_allowed").inc()
            raise RequestError(403, f"{PREFILLER_HEADER} names a prefill peer that is not allowed",
                               "peer_not_allowed", param=PREFILLER_HEADER)
        return forced

    async def _serve(self, rq: PdRequest) -> web.StreamResponse:
        sc, cfg, m = self.sc, self.sc.cfg, self.sc.metrics
        raw = await sc.read_body(rq.http)
        body, modified = parse_client_request(rq.api, raw)
        # served locally with the body untouched: forward the client's bytes as they are
        # (never when a transfer field or a duplicate key was there: re-serialized then)
        rq.raw = None if modified else raw
        forced = self._forced_peer(rq.http)

        # --- decide: disaggregate or serve here
        reason = None
        est = 0
        if unsupported_for_disagg(rq.api, body) is not None:
            reason = "unsupported"
        elif forced is None and not any(s.from_target for s in self.peers.peers.values()):
            reason = "no_peer"
        elif forced is None and cfg.local_threshold_tokens > 0:
            est = await self.tokens.count(rq.api, body)
            if est < cfg.local_threshold_tokens:
                reason = "threshold"
        if reason is not None:
            m.local_decisions.labels(reason).inc()
            rq.path = "local"
            return await self.decode_leg.run(rq, body)

        if not est:
            est = self.tokens.chars(rq.api, body)
        if cfg.transfer_mode == "push":
            return await self.push.run(rq, body, forced)
        return await self._disaggregate(rq, body, forced, est)

    async def _disaggregate(self, rq: PdRequest, body: dict, forced: Endpoint | None,
                            est: int) -> web.StreamResponse:
        """Pull mode: the prefill leg, then the decode leg loading its KV; one local
        recompute when either leg fails before anything reached the client (per policy)."""
        cfg, m = self.sc.cfg, self.sc.metrics
        # the first token from the prefill leg: the prompt's ids come from the local vLLM
        # (tokenized while the prefill runs; the prefill answer carries none) or, with
        # --first-token-ids prefill, from the answer
        first = self.first_token.eligible(rq.api, body)
        local = first and cfg.first_token_ids == "local"
        tokens = self.first_token.tokenize(rq.api, body) if local else None
        # token ids are taken only from a signed answer: no token, no reuse (and no first
        # token: `eligible` needs one)
        reuse = bool(cfg.auth_token) and reuse_eligible(rq.api, body, cfg.reuse_token_ids)
        want_ids = (first and not local) or (not first and reuse)
        try:
            with span("pd.prefill_leg", request_id=rq.rid):
                pre = await self.prefill_leg.run(rq, body, forced, est, want_ids)
            rq.path, rq.peer = "disagg", str(pre.peer)
            if first:
                resp = await self.first_token.serve(rq, body, pre, tokens)
                if resp is not None:
                    return resp
        except ClientFault as e:
            rq.path, rq.status = "error", e.status
            return web.Response(status=e.status, body=e.body, content_type=e.content_type,
                                headers={PATH_HEADER: "error", "x-request-id": rq.rid})
        except PrefillFailed as e:
            if tokens is not None:
                tokens.cancel()
            return await self._prefill_failed(rq, body, e)
        finally:
            if tokens is not None:
                tokens.cancel()  # done by now unless the prefill leg failed
        if not reuse:
            pre.ids = None  # asked for the first token's sake only
        if pre.ids is not None:
            m.token_reuse.labels(rq.api).inc()
        try:
            return await self._decode_loaded(rq, body, pre)
        except RecomputeLocally as e:
            m.fallbacks.labels(e.reason).inc()
            rq.path = "fallback"
            return await self.decode_leg.run(rq, body, connect_retries=e.connect_retries)

    async def _decode_loaded(self, rq: PdRequest, body: dict, pre: PrefillResult) -> web.StreamResponse:
        dbody = decode_body(rq.api, body, pre.kv_params, pre.ids)
        # the decode engine's request carries the prefill leg's id: vLLM's NixlPushConnector
        # pairs the prefill and the decode request by their ids (as vLLM's own proxies send
        # one X-Request-Id to both); the client still gets its own id back
        return await self.decode_leg.run(rq, dbody, pre, may_recompute=self.sc.cfg.fallback == "fallback",
                                         extra_headers={"x-request-id": pre.request_id})

    async def _prefill_failed(self, rq: PdRequest, body: dict, e: PrefillFailed) -> web.StreamResponse:
        cfg = self.sc.cfg
        self.sc.metrics.fallbacks.labels(e.reason).inc()
        # the detail names internal addresses: logs keep it, the client gets the reason
        log.warning("prefill failed; " + ("answering an error" if cfg.fallback == "fail" else "recomputing locally"),
                    extra={"request_id": rq.rid, "reason": e.reason, "error": str(e)})
        if cfg.fallback == "fail":
            rq.path = "error"
            raise RequestError(e.status, f"prefill failed ({e.reason})", f"prefill_{e.reason}",
                               headers={PATH_HEADER: "error"}) from None
        rq.path = "fallback"
        return await self.decode_leg.run(rq, body)
