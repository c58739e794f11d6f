"""Decode role: the router-facing side of a P/D handoff.

Per request: validate, pick a prefill peer (llm-d `x-prefiller-host-port` or the least
pending-KV target), run the prefill leg through the prefill sidecar (non-streaming, one
token, `kv_transfer_params: {do_remote_decode: true}`), then the decode leg on the local
vLLM with the returned `kv_transfer_params` (opaque), streaming bytes through as they
arrive. Short prompts and unsupported requests run locally; a failed prefill leg is
recomputed locally (`--fallback fallback`) or answered 502/504 (`--fallback fail`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from pdsidecar.config import Endpoint
from pdsidecar.metrics import KV_LOAD_FAILURE_REASONS

from . import auth
from .answer import REJECTED, AnswerRejected, check_prefill_kv, peer_engine_hosts, read_capped
from .body import (
    API_PATHS,
    decode_body,
    estimate_tokens,
    loads_or_none,
    parse_client_request,
    prefill_body,
    prompt_ids_from_prefill,
    release_body,
    reuse_eligible,
    unsupported_for_disagg,
)
from .errors import RequestError, error_response
from .peers import Allowlist, PeerSet, parse_prefiller_header, resolve
from .server import DP_RANK_HEADER, PATH_HEADER, PD_ERROR_HEADER, forward_headers, request_id
from .tracing import span

log = logging.getLogger("pdsidecar.decode")

PREFILLER_HEADER = "x-prefiller-host-port"
_RETRYABLE_PEER_ERRORS = ("draining", "overloaded")


class PrefillFailed(Exception):
    def __init__(self, reason: str, message: str, status: int = 502):
        super().__init__(message)
        self.reason = reason
        self.status = status


class ClientFault(Exception):
    """The prefill engine refused the request itself (4xx): the client's fault, pass it on."""

    def __init__(self, status: int, body: bytes, content_type: str):
        self.status, self.body, self.content_type = status, body, content_type


@dataclass
class PrefillResult:
    peer: Endpoint
    request_id: str
    kv_params: dict[str, Any]
    ids: list[int] | None
    seconds: float
    tokens: int


def transfer_stats(kv: Any) -> tuple[float | None, float | None]:
    """(bytes, seconds) our connector reports in the decode response's
    `kv_transfer_params.pd_transfer`; (None, None) for connectors that report nothing."""
    if not isinstance(kv, dict):
        return None, None
    t = kv.get("pd_transfer")
    if not isinstance(t, dict):
        return None, None
    b = t.get("bytes", t.get("kv_bytes"))
    s = t.get("seconds", t.get("transfer_s"))
    ms = t.get("ms")
    if s is None and isinstance(ms, (int, float)) and not isinstance(ms, bool):
        s = ms / 1000.0  # PdConnector reports {"bytes", "ms", "blocks", "backend", ...}
    if t.get("error"):
        return None, None
    b = float(b) if isinstance(b, (int, float)) and not isinstance(b, bool) and b >= 0 else None
    s = float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0 else None
    return b, s


def load_failure(kv: Any) -> str | None:
    """The reason the decode engine's KV load failed, from its response's
    `kv_transfer_params.pd_transfer.error` (PdConnector); None when it succeeded or the
    connector reports nothing (vLLM's stock NixlConnector answers null)."""
    if not isinstance(kv, dict):
        return None
    t = kv.get("pd_transfer")
    if not isinstance(t, dict):
        return None
    err = t.get("error")
    if not err:
        return None
    return err if isinstance(err, str) and err in KV_LOAD_FAILURE_REASONS else "other"


class ReleaseReporter:
    """Batches pickup/release reports to each prefill sidecar (`POST /pd/v1/release`)."""

    def __init__(self, role: "DecodeRole", delay_s: float = 0.02):
        self.role = role
        self.delay_s = delay_s
        self._pending: dict[Endpoint, list[dict[str, str]]] = {}

    def report(self, peer: Endpoint, rid: str, status: str) -> None:
        q = self._pending.get(peer)
        if q is None:
            q = self._pending[peer] = []
            asyncio.get_running_loop().call_later(self.delay_s, self._flush_soon, peer)
        q.append({"id": rid, "status": status})

    def _flush_soon(self, peer: Endpoint) -> None:
        items = self._pending.pop(peer, None)
        if items:
            self.role.sc.spawn(self._send(peer, items))

    async def _send(self, peer: Endpoint, items: list[dict[str, str]]) -> None:
        sc = self.role.sc
        batch_id = uuid.uuid4().hex
        path = "/pd/v1/release"
        data = json.dumps({"releases": items}).encode()
        headers = {"content-type": "application/json", "x-request-id": batch_id,
                   **auth.sign(sc.cfg.auth_token, str(self.role.identity), batch_id, path, data)}
        try:
            async with sc.upstreams.get(peer.url()).post(
                    peer.url() + path, data=data, headers=headers,
                    allow_redirects=False, timeout=aiohttp.ClientTimeout(total=5, sock_connect=sc.cfg.connect_timeout_s)) as r:
                await r.read()
                if r.status != 200:
                    sc.metrics.peer_errors.labels(self.role.peer_label(peer), "release").inc()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            sc.metrics.peer_errors.labels(self.role.peer_label(peer), "release").inc()


class DecodeRole:
    def __init__(self, sc):
        self.sc = sc
        cfg = sc.cfg
        self.identity = cfg.identity()
        self.peers = PeerSet(list(cfg.targets))
        # the llm-d header may name a configured target or an allowlisted peer, nothing else
        self.allow = Allowlist(list(cfg.targets) + list(cfg.allowed_peers))
        self.reporter = ReleaseReporter(self)
        self._bg: list[asyncio.Task] = []
        self._tokenize_ok = True
        self._labelled: set[str] = set()
        self._next_push_rank = 0
        pt = cfg.push_target
        self._push_targets: list[Endpoint] = [pt] if isinstance(pt, Endpoint) else list(pt or [])
        # decode-leg timeouts, built once: first attempt, and a retry with twice the connect
        # timeout (under heavy CPU load the first loopback connect can run out, O1)
        self._decode_timeouts = tuple(
            aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s * k, sock_read=cfg.decode_timeout_s)
            for k in (1, 2))

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)

    async def start(self) -> None:
        await self.peers.refresh()
        await self.allow.refresh()
        self._bg.append(self.sc.spawn(self._dns_loop()))
        if self.sc.cfg.peer_stats_interval_s > 0 and self.peers.targets:
            self._bg.append(self.sc.spawn(self._stats_loop()))

    async def stop(self) -> None:
        for t in self._bg:
            t.cancel()

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sc.cfg.dns_refresh_s)
            try:
                await self.peers.refresh()
                await self.allow.refresh()
            except Exception:  # keep the last good view
                log.warning("peer refresh failed", exc_info=True)

    def peer_label(self, ep: Endpoint) -> str:
        """The Prometheus `peer` label: configured/resolved targets by name, every
        client-named peer as "other" (labels stay bounded)."""
        st = self.peers.peers.get(ep)
        return str(ep) if st is not None and st.from_target else "other"

    async def _stats_loop(self) -> None:
        cfg = self.sc.cfg
        while True:
            await asyncio.sleep(cfg.peer_stats_interval_s)
            # only configured/resolved targets: a client-named peer is never polled
            await asyncio.gather(*(self._poll_stats(ep) for ep, st in list(self.peers.peers.items())
                                   if st.from_target), return_exceptions=True)

    async def _poll_stats(self, ep: Endpoint) -> None:
        st = self.peers.state(ep)
        try:
            async with self.sc.upstreams.get(ep.url()).get(
                    ep.url() + "/pd/v1/stats",
                    allow_redirects=False, timeout=aiohttp.ClientTimeout(total=1.0, sock_connect=self.sc.cfg.connect_timeout_s)) as r:
                data = await r.json(content_type=None) if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            self.sc.metrics.peer_errors.labels(self.peer_label(ep), "stats").inc()
            return
        pending = data.get("pending") if isinstance(data.get("pending"), dict) else {}
        tok = pending.get("tokens")
        st.remote_pending_tokens = int(tok) if isinstance(tok, int) else 0
        inf = data.get("in_flight")
        st.remote_in_flight = int(inf) if isinstance(inf, int) else 0
        st.remote_draining = bool(data.get("draining"))
        st.last_stats = time.monotonic()

    def refresh_gauges(self) -> None:
        m = self.sc.metrics
        now: set[str] = set()
        for ep, st in list(self.peers.peers.items()):
            if not st.from_target:  # client-named: counted in stats, never a label
                continue
            now.add(str(ep))
            m.pending_requests.labels(str(ep)).set(st.outstanding)
            m.pending_tokens.labels(str(ep)).set(st.outstanding_tokens)
        for gone in self._labelled - now:  # a target DNS no longer returns
            for g in (m.pending_requests, m.pending_tokens):
                try:
                    g.remove(gone)
                except KeyError:
                    pass
        self._labelled = now

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"peers": {str(ep): {"outstanding": st.outstanding, "outstanding_tokens": st.outstanding_tokens,
                                    "remote_pending_tokens": st.remote_pending_tokens,
                                    "remote_in_flight": st.remote_in_flight, "draining": st.remote_draining,
                                    "down": st.down_until > now, "configured": st.from_target}
                          for ep, st in self.peers.peers.items()},
                "pending": {"requests": sum(s.outstanding for s in self.peers.peers.values()),
                            "tokens": sum(s.outstanding_tokens for s in self.peers.peers.values())}}

    # ------------------------------------------------------------ handlers
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def _handle(self, request: web.Request, api: str) -> web.StreamResponse:
        sc = self.sc
        sc.admit()
        t0 = time.perf_counter()
        rid = request_id(request)
        state: dict[str, Any] = {"path": "error", "status": 0, "peer": None}
        try:
            timeout = getattr(asyncio, "timeout", None)
            if timeout is not None:
                async with timeout(sc.cfg.total_timeout_s):
                    resp = await self._serve(request, api, rid, t0, state)
            else:  # Python 3.10
                resp = await asyncio.wait_for(self._serve(request, api, rid, t0, state), sc.cfg.total_timeout_s)
            return resp
        except RequestError as e:
            state["status"] = e.status
            return e.response()
        except RecursionError:  # a body json.loads accepted but too deep to re-encode
            state["status"] = 400
            return error_response(400, "request body is nested too deeply", "invalid_json")
        except asyncio.TimeoutError:
            state["status"] = 504
            sc.metrics.upstream_errors.labels("total_timeout").inc()
            return error_response(504, "request exceeded the total timeout", "timeout")
        except asyncio.CancelledError:
            state["status"] = 499
            raise
        finally:
            sc.release()
            dt = time.perf_counter() - t0
            sc.metrics.requests.labels("decode", api, state["path"]).inc()
            sc.metrics.request_seconds.labels("decode", state["path"]).observe(dt)
            log.info("request", extra={"request_id": rid, "api": api, "pd_path": state["path"],
                                       "status": state["status"], "peer": state["peer"],
                                       "duration_ms": round(dt * 1000, 3)})

    async def _serve(self, request: web.Request, api: str, rid: str, t0: float, state: dict) -> web.StreamResponse:
        sc, cfg, m = self.sc, self.sc.cfg, self.sc.metrics
        raw = await sc.read_body(request)
        body, modified = parse_client_request(api, raw)
        # served locally with the body untouched: forward the client's bytes as they are
        # (never when a transfer field or a duplicate key was there: re-serialized then)
        state["raw"] = None if modified else raw

        forced: Endpoint | None = None
        hdr = request.headers.get(PREFILLER_HEADER)
        if hdr is not None and hdr.strip():
            try:
                forced = parse_prefiller_header(hdr)
            except ValueError as e:
                m.rejected.labels("bad_prefiller").inc()
                raise RequestError(400, f"{PREFILLER_HEADER}: {e}", "invalid_prefiller", param=PREFILLER_HEADER) from None
            if not self.allow.allows(forced.host, forced.port):
                m.rejected.labels("peer_not_allowed").inc()
                raise RequestError(403, f"{PREFILLER_HEADER} names a prefill peer that is not allowed",
                                   "peer_not_allowed", param=PREFILLER_HEADER)

        # --- decide: disaggregate or serve here
        reason = None
        est = 0
        why = unsupported_for_disagg(api, body)
        if why is not None:
            reason = "unsupported"
        elif forced is None and not any(s.from_target for s in self.peers.peers.values()):
            reason = "no_peer"
        elif forced is None and cfg.local_threshold_tokens > 0:
            est = await self._estimate(api, body, request)
            if est < cfg.local_threshold_tokens:
                reason = "threshold"
        if reason is not None:
            m.local_decisions.labels(reason).inc()
            state["path"] = "local"
            return await self._decode_leg(request, api, body, rid, t0, state, None)

        if not est:
            est = estimate_tokens(api, body, cfg.chars_per_token)
        # token ids are taken only from a signed answer: no token, no reuse
        want_ids = bool(cfg.auth_token) and reuse_eligible(api, body, cfg.reuse_token_ids)
        if cfg.transfer_mode == "push":
            return await self._push(request, api, body, rid, t0, state, forced, est)
        try:
            with span("pd.prefill_leg", request_id=rid):
                pre = await self._prefill_leg(request, api, body, forced, est, want_ids)
        except ClientFault as e:
            state["path"], state["status"] = "error", e.status
            return web.Response(status=e.status, body=e.body, content_type=e.content_type,
                                headers={PATH_HEADER: "error", "x-request-id": rid})
        except PrefillFailed as e:
            m.fallbacks.labels(e.reason).inc()
            # the detail names internal addresses: logs keep it, the client gets the reason
            log.warning("prefill failed; " + ("answering an error" if cfg.fallback == "fail" else "recomputing locally"),
                        extra={"request_id": rid, "reason": e.reason, "error": str(e)})
            if cfg.fallback == "fail":
                state["path"] = "error"
                raise RequestError(e.status, f"prefill failed ({e.reason})", f"prefill_{e.reason}",
                                   headers={PATH_HEADER: "error"}) from None
            state["path"] = "fallback"
            return await self._decode_leg(request, api, body, rid, t0, state, None)
        state["path"], state["peer"] = "disagg", str(pre.peer)
        dbody = decode_body(api, body, pre.kv_params, pre.ids)
        if pre.ids is not None:
            m.token_reuse.labels(api).inc()
        return await self._decode_leg(request, api, dbody, rid, t0, state, pre,
                                      retry_body=body if cfg.fallback == "fallback" else None)

    async def _estimate(self, api: str, body: dict, request: web.Request) -> int:
        cfg = self.sc.cfg
        if cfg.token_estimator == "tokenize" and self._tokenize_ok:
            payload: dict[str, Any] = {"model": body["model"]}
            if api == "chat":
                payload["messages"] = body["messages"]
            elif isinstance(body.get("prompt"), str):
                payload["prompt"] = body["prompt"]
            else:
                return estimate_tokens(api, body, cfg.chars_per_token)
            try:
                async with self.sc.upstreams.get(cfg.vllm_url).post(
                        cfg.vllm_url + "/tokenize", json=payload,
                        allow_redirects=False, timeout=aiohttp.ClientTimeout(total=2, sock_connect=cfg.connect_timeout_s)) as r:
                    if r.status == 200:
                        data = await r.json()
                        if isinstance(data.get("count"), int):
                            return data["count"]
                    elif r.status == 404:
                        self._tokenize_ok = False
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, RecursionError, AttributeError):
                pass
        return estimate_tokens(api, body, cfg.chars_per_token)

    # ------------------------------------------------------------ prefill leg
    def _peer_headers(self, request: web.Request, rid: str) -> dict[str, str]:
        """Headers for a prefill sidecar: the client's Authorization only with
        --forward-authorization (it is meant for this deployment's API, not for peers)."""
        h = forward_headers(request, rid)
        if not self.sc.cfg.forward_authorization:
            h.pop("authorization", None)
        return h

    async def _engine_hosts(self, ep: Endpoint) -> set[str]:
        """Addresses the chosen peer's engine may advertise (proxy.answer's rule)."""
        resolved = set()
        if not ep.is_ip:
            resolved = await resolve(ep.host, ep.port)
        return peer_engine_hosts(ep.host, resolved)

    async def _prefill_leg(self, request: web.Request, api: str, body: dict, forced: Endpoint | None, est: int,
                           want_ids: bool) -> PrefillResult:
        sc, cfg, m = self.sc, self.sc.cfg, self.sc.metrics
        path = API_PATHS[api]
        data = json.dumps(prefill_body(api, body, want_ids)).encode()
        tried: set[Endpoint] = set()
        attempts = cfg.prefill_retries + 1
        for attempt in range(attempts):
            ep = forced if forced is not None else self.peers.pick(exclude=tried)
            if ep is None:
                raise PrefillFailed("connect", "no reachable prefill peer")
            tried.add(ep)
            prid = "pd-" + uuid.uuid4().hex
            headers = self._peer_headers(request, prid)
            signed = auth.sign(cfg.auth_token, str(self.identity), prid, path, data)
            headers.update(signed)
            st = self.peers.state(ep)
            label = self.peer_label(ep)
            st.outstanding += 1
            st.outstanding_tokens += est
            handed_out = False
            last = attempt == attempts - 1 or forced is not None
            t = time.perf_counter()
            try:
                try:
                    async with sc.upstreams.get(ep.url()).post(
                            ep.url() + path, data=data, headers=headers,
                            allow_redirects=False, timeout=aiohttp.ClientTimeout(total=cfg.prefill_timeout_s,
                                                          sock_connect=cfg.connect_timeout_s)) as r:
                        status, ctype, perr, rhdrs = r.status, r.content_type, r.headers.get(PD_ERROR_HEADER), r.headers
                        raw = await read_capped(r, cfg.max_prefill_answer_bytes)
                except AnswerRejected as e:
                    self._reject_answer(ep, label, str(e))
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                    # nothing was sent: safe to try another peer
                    m.peer_errors.labels(label, "connect").inc()
                    self.peers.mark_down(ep)
                    if last:
                        raise PrefillFailed("connect", f"cannot connect to prefill peer {ep}") from None
                    m.retries.inc()
                    continue
                except asyncio.TimeoutError:
                    m.peer_errors.labels(label, "timeout").inc()
                    raise PrefillFailed("timeout", f"prefill leg to {ep} timed out", 504) from None
                except aiohttp.ClientError as e:
                    m.peer_errors.labels(label, "disconnect").inc()
                    raise PrefillFailed("disconnect", f"prefill peer {ep} dropped the connection ({type(e).__name__})") from None
                secs = time.perf_counter() - t
                if cfg.auth_token and (status == 200 or (perr is None and 400 <= status < 500)):
                    # what the decode engine or the client would get from this answer must
                    # come from the prefill sidecar we signed the leg for, for this leg
                    why = auth.verify_answer(cfg.auth_token, rhdrs, signed[auth.NONCE_HEADER], prid, status, raw)
                    if why is not None:
                        self._reject_answer(ep, label, f"answer signature {why}")
                if status == 200:
                    obj = loads_or_none(raw)
                    kv = obj.get("kv_transfer_params") if isinstance(obj, dict) else None
                    if not isinstance(kv, dict) or not kv:
                        m.peer_errors.labels(label, "protocol").inc()
                        raise PrefillFailed("protocol", "prefill response has no kv_transfer_params "
                                            "(is the prefill vLLM running with a KV connector?)")
                    try:
                        kv = check_prefill_kv(kv, await self._engine_hosts(ep))
                    except AnswerRejected as e:
                        self._reject_answer(ep, label, str(e))
                    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
                    tokens = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else est
                    # prompt token ids only from a verified (signed) answer
                    ids = prompt_ids_from_prefill(api, obj) if want_ids and cfg.auth_token else None
                    m.prefill_leg.observe(secs)
                    handed_out = True
                    st.outstanding_tokens += tokens - est  # true size now
                    return PrefillResult(ep, prid, kv, ids, secs, tokens)
                if 300 <= status < 400:
                    # never followed (allow_redirects=False): a redirect from a peer is a
                    # protocol error, not a place to send the prompt to
                    m.peer_errors.labels(label, "redirect").inc()
                    raise PrefillFailed("redirect", f"prefill peer {ep} answered a redirect ({status})")
                if perr is not None:
                    # the prefill sidecar refused before forwarding: nothing allocated
                    m.peer_errors.labels(label, "peer_rejected").inc()
                    if perr in _RETRYABLE_PEER_ERRORS and not last:
                        m.retries.inc()
                        continue
                    raise PrefillFailed("peer_rejected", f"prefill peer {ep} refused the leg ({perr[:64]!r})")
                if status >= 500:
                    m.peer_errors.labels(label, "http_5xx").inc()
                    raise PrefillFailed("http_5xx", f"prefill peer {ep} answered {status}")
                m.peer_errors.labels(label, "http_4xx").inc()
                raise ClientFault(status, raw, ctype or "application/json")
            except asyncio.CancelledError:
                sc.metrics.client_disconnects.labels("prefill").inc()
                raise
            finally:
                if not handed_out:
                    st.outstanding -= 1
                    st.outstanding_tokens -= est
                    self.peers.settle(ep)
        raise PrefillFailed("connect", "no reachable prefill peer")

    def _reject_answer(self, ep: Endpoint, label: str, why: str) -> None:
        """A prefill answer failed a check: counted, logged with the peer, fallback."""
        self.sc.metrics.peer_errors.labels(label, REJECTED).inc()
        log.warning("prefill answer rejected", extra={"peer": str(ep), "reason": REJECTED, "error": why})
        raise PrefillFailed(REJECTED, f"prefill peer {ep}: {why}")

    def _picked_up(self, pre: PrefillResult | None, status: str) -> None:
        if pre is None:
            return
        st = self.peers.state(pre.peer)
        st.outstanding -= 1
        st.outstanding_tokens -= pre.tokens
        self.peers.settle(pre.peer)
        self.reporter.report(pre.peer, pre.request_id, status)

    async def _release_remote(self, api: str, body: dict, pre: PrefillResult, request: web.Request) -> None:
        """The client left after the prefill leg but before the decode leg reached vLLM: run
        a one-token decode leg so the connector pulls (and the prefill engine frees) the KV."""
        cfg = self.sc.cfg
        rb = release_body(api, body, pre.kv_params)
        try:
            async with self.sc.upstreams.get(cfg.vllm_url).post(
                    cfg.vllm_url + API_PATHS[api], data=json.dumps(rb).encode(),
                    headers={"content-type": "application/json", "x-request-id": pre.request_id + "-release",
                             **{k: v for k, v in forward_headers(request, "").items() if k == "authorization"}},
                    allow_redirects=False, timeout=aiohttp.ClientTimeout(total=cfg.prefill_timeout_s, sock_connect=cfg.connect_timeout_s)) as r:
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.sc.metrics.upstream_errors.labels("release").inc()
        finally:
            self._picked_up(pre, "aborted")

    # ------------------------------------------------------------- decode leg
    async def _decode_leg(self, request: web.Request, api: str, body: dict, rid: str, t0: float, state: dict,
                          pre: PrefillResult | None, retry_body: dict | None = None,
                          connect_retries: int = 1, extra_headers: dict[str, str] | None = None
                          ) -> web.StreamResponse:
        sc, cfg, m = self.sc, self.sc.cfg, self.sc.metrics
        path = state["path"]
        url = cfg.vllm_url + API_PATHS[api]
        stream = bool(body.get("stream"))
        data = state.get("raw") if pre is None and path != "disagg" and state.get("raw") else json.dumps(body).encode()
        headers = forward_headers(request, rid)
        if extra_headers:
            headers.update(extra_headers)
        out_headers = {PATH_HEADER: path, "x-request-id": rid}
        sent = False
        reported = False
        resp: aiohttp.ClientResponse | None = None
        try:
            t_send = time.perf_counter()
            try:
                sent = True
                for attempt in range(connect_retries + 1):
                    try:
                        resp = await sc.upstreams.get(cfg.vllm_url).post(
                            url, data=data, headers=headers,
                            allow_redirects=False,
                            timeout=self._decode_timeouts[1 if attempt else 0])
                        break
                    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                        # nothing sent yet: one more try is safe (the KV is still waiting)
                        if attempt >= connect_retries:
                            raise
                        m.upstream_errors.labels("connect_retry").inc()
                        log.warning("cannot connect to the local vLLM; retrying",
                                    extra={"request_id": rid, "error": type(e).__name__, "pd_path": path,
                                           "after_s": round(time.perf_counter() - t_send, 3)})
                        await asyncio.sleep(0.05)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                sent = False
                m.upstream_errors.labels("connect").inc()
                if pre is not None and retry_body is not None:
                    # the disaggregated decode leg never reached vLLM: fall back per policy
                    # (--fallback fallback: recompute locally, one more connect attempt)
                    reported = True
                    self._picked_up(pre, "released")
                    m.fallbacks.labels("decode_connect").inc()
                    log.warning("cannot connect to the local vLLM for the decode leg; recomputing locally",
                                extra={"request_id": rid, "error": type(e).__name__,
                                       "after_s": round(time.perf_counter() - t_send, 3)})
                    state["path"] = "fallback"
                    return await self._decode_leg(request, api, retry_body, rid, t0, state, None, connect_retries=0)
                log.warning("cannot connect to the local vLLM", extra={"request_id": rid, "error": type(e).__name__,
                                                                      "pd_path": path})
                raise RequestError(502, "local vLLM is unreachable", "upstream_unavailable",
                                   headers=out_headers) from None
            except asyncio.TimeoutError as e:
                m.upstream_errors.labels("timeout").inc()
                log.warning("decode leg timed out", extra={"request_id": rid, "error": type(e).__name__,
                                                           "after_s": round(time.perf_counter() - t_send, 3)})
                raise RequestError(504, "local vLLM did not answer in time", "upstream_timeout",
                                   headers=out_headers) from None
            except aiohttp.ClientError as e:
                m.upstream_errors.labels("disconnect").inc()
                raise RequestError(502, f"local vLLM dropped the connection ({type(e).__name__})",
                                   "upstream_error", headers=out_headers) from None

            if 300 <= resp.status < 400:
                # redirects are never followed; the local vLLM does not send them
                m.upstream_errors.labels("redirect").inc()
                raise RequestError(502, f"local vLLM answered a redirect ({resp.status})", "upstream_error",
                                   headers=out_headers)
            is_sse = resp.status == 200 and stream and resp.content_type == "text/event-stream"
            if not is_sse:
                try:
                    payload = await resp.read()
                except asyncio.TimeoutError:
                    m.upstream_errors.labels("timeout").inc()
                    raise RequestError(504, "local vLLM stalled", "upstream_timeout", headers=out_headers) from None
                except aiohttp.ClientError:
                    m.upstream_errors.labels("disconnect").inc()
                    raise RequestError(502, "local vLLM dropped the connection", "upstream_error",
                                       headers=out_headers) from None
                if resp.status >= 500 and pre is not None and retry_body is not None:
                    # the decode engine failed before any output (e.g. the KV load failed and
                    # the connector's policy is "fail"): nothing reached the client, so
                    # recompute locally once, without kv_transfer_params
                    reported = True
                    self._picked_up(pre, "released")
                    m.fallbacks.labels("kv_load").inc()
                    log.warning("decode leg failed before output; recomputing locally",
                                extra={"request_id": rid, "status": resp.status})
                    resp.release()
                    resp = None
                    state["path"] = "fallback"
                    return await self._decode_leg(request, api, retry_body, rid, t0, state, None)
                t_first = time.perf_counter()
                # pull (pre) and push (no pre, path disagg) legs: did the KV load succeed?
                failed = self._observe_transfer(payload) if resp.status == 200 and path == "disagg" else None
                if failed is not None:
                    path = self._mark_recompute(state, out_headers, failed, rid)
                self._observe_first(path, t0, t_send, t_first, pre)
                reported = True
                self._picked_up(pre, "picked_up" if resp.status == 200 and failed is None else "released")
                if resp.status != 200:
                    out_headers[PATH_HEADER] = path
                state["status"] = resp.status
                return web.Response(status=resp.status, body=payload,
                                    content_type=resp.content_type or "application/json", headers=out_headers)

            out = web.StreamResponse(status=200, headers={**out_headers, "Content-Type": "text/event-stream",
                                                          "Cache-Control": "no-cache"})
            state["status"] = 200
            first = True
            try:
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                    if path == "disagg" and b'"pd_transfer"' in chunk and state["path"] == "disagg":
                        # a vLLM that streams kv_transfer_params: headers are out, but the
                        # request is still counted by what happened
                        event = next((ln[5:].strip() for ln in chunk.split(b"\n")
                                      if ln.startswith(b"data:") and b'"pd_transfer"' in ln), b"")
                        failed = self._observe_transfer(event)
                        if failed is not None:
                            self._mark_recompute(state, out_headers, failed, rid)
                    if first:
                        first = False
                        self._observe_first(path, t0, t_send, time.perf_counter(), pre)
                        reported = True
                        self._picked_up(pre, "picked_up")
                await out.write_eof()
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                m.client_disconnects.labels("decode").inc()
                resp.close()  # vLLM sees the disconnect and aborts the request
            except (asyncio.TimeoutError, aiohttp.ClientError):
                m.upstream_errors.labels("stream").inc()
                resp.close()
                # headers are out: end the stream; the client sees a truncated SSE
                out.force_close()
            return out
        except asyncio.CancelledError:
            # client went away (handler cancelled): close upstream so vLLM aborts
            m.client_disconnects.labels("decode").inc()
            if resp is not None:
                resp.close()
            if pre is not None and not reported:
                reported = True
                if sent:
                    self._picked_up(pre, "aborted")
                else:
                    sc.spawn(self._release_remote(api, body, pre, request))
            raise
        finally:
            if resp is not None:
                resp.release()
            if pre is not None and not reported:
                self._picked_up(pre, "released")

    def _observe_first(self, path: str, t0: float, t_send: float, t_first: float, pre: PrefillResult | None) -> None:
        m = self.sc.metrics
        ttft = t_first - t0
        leg = t_first - t_send
        m.ttft.labels(path).observe(ttft)
        m.decode_leg.labels(path).observe(leg)
        overhead = ttft - leg - (pre.seconds if pre is not None else 0.0)
        m.overhead.labels("decode").observe(max(overhead, 0.0))

    def _mark_recompute(self, state: dict, out_headers: dict[str, str], reason: str, rid: str) -> str:
        """The decode engine recomputed a disaggregated request: label and count it so."""
        state["path"] = out_headers[PATH_HEADER] = "recompute"
        self.sc.metrics.kv_load_failures.labels(reason).inc()
        log.warning("the decode engine could not load the prefill KV and recomputed the prompt",
                    extra={"request_id": rid, "reason": reason, "peer": state.get("peer")})
        return "recompute"

    def _observe_transfer(self, payload: bytes) -> str | None:
        """Record the connector-reported transfer; the load-failure reason, if any."""
        if b'"pd_transfer"' not in payload:
            return None
        try:
            kv = json.loads(payload).get("kv_transfer_params")
        except (ValueError, AttributeError, RecursionError):
            return None
        failed = load_failure(kv)
        if failed is not None:
            return failed
        b, s = transfer_stats(kv)
        m = self.sc.metrics
        if b is not None:
            m.kv_bytes.observe(b)
            m.kv_bytes_total.inc(b)
        if s is not None:
            m.kv_seconds.observe(s)
        if b is not None and s:
            m.kv_bps.observe(b / s)
        return None

    # --------------------------------------------------------------- push mode
    async def _push(self, request: web.Request, api: str, body: dict, rid: str, t0: float, state: dict,
                    forced: Endpoint | None, est: int) -> web.StreamResponse:
        """Push mode (`transfer_mode: push`, PdConnector only): the decode leg starts at
        once with a fresh push id; the prefill leg carries the same id and
        `push_target` (the decode engine's control plane), and the prefill engine
        WRITEs each layer's KV into the blocks the decode engine registered. If the
        prefill leg fails, the decode engine recomputes after its `push_wait_s`."""
        ep = forced if forced is not None else self.peers.pick()
        if ep is None:
            state["path"] = "local"
            self.sc.metrics.local_decisions.labels("no_peer").inc()
            return await self._decode_leg(request, api, body, rid, t0, state, None)
        push_rid = "pd-" + uuid.uuid4().hex
        kv = {"do_remote_prefill": True, "transfer_mode": "push", "remote_request_id": push_rid,
              "remote_peer": str(ep)}
        # a data-parallel decode engine: pin the decode leg to one DP rank (vLLM's
        # X-data-parallel-rank) and name that rank's control plane as the push target,
        # so the registration and the prefill's lookup meet on the same server
        targets = self._push_targets
        rank = self._next_push_rank % len(targets)
        self._next_push_rank += 1
        push_target = targets[rank]
        dp_header = {DP_RANK_HEADER: str(rank)} if len(targets) > 1 else None

        async def prefill() -> None:
            try:
                pb = prefill_body(api, body, False)
                pb["kv_transfer_params"] = {"do_remote_decode": True, "transfer_mode": "push",
                                            "remote_request_id": push_rid,
                                            "push_target": str(push_target)}
                path = API_PATHS[api]
                headers = self._peer_headers(request, push_rid)
                data = json.dumps(pb).encode()
                headers.update(auth.sign(self.sc.cfg.auth_token, str(self.identity), push_rid, path, data))
                async with self.sc.upstreams.get(ep.url()).post(
                        ep.url() + path, data=data, headers=headers,
                        allow_redirects=False, timeout=aiohttp.ClientTimeout(total=self.sc.cfg.prefill_timeout_s)) as r:
                    await r.read()
                    if r.status != 200:
                        self.sc.metrics.peer_errors.labels(self.peer_label(ep), "http_5xx" if r.status >= 500 else "http_4xx").inc()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                self.sc.metrics.peer_errors.labels(self.peer_label(ep), "connect").inc()

        task = self.sc.spawn(prefill())
        state["path"], state["peer"] = "disagg", str(ep)
        try:
            return await self._decode_leg(request, api, decode_body(api, body, kv, None), rid, t0, state, None,
                                          extra_headers=dp_header)
        finally:
            if not task.done():
                task.cancel()
