"""Decode role: the prefill leg, a client of the prefill sidecars.

`PrefillLeg.run` sends the prefill body (one token, `kv_transfer_params:
{do_remote_decode: true}`), signed for a fresh leg id, to the chosen peer (the llm-d
header's or the least-pending one) and returns a checked `PrefillResult`. A connect error
(nothing sent) or a peer that refused before forwarding (`x-pd-error: draining` /
`overloaded`) is retried on another peer, up to `--prefill-retries`; every other failure is
a `PrefillFailed` with its reason, and a 4xx from the prefill engine is the client's
(`ClientFault`). The peer's outstanding count includes the leg while it runs and the KV
once handed out (until proxy.release settles it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from . import auth
from .answer import AnswerRejected, check_prefill_kv, peer_engine_hosts, read_capped
from .body import API_PATHS, loads_or_none, prefill_body, prompt_ids_from_prefill
from .endpoints import Endpoint
from .errors import ClientFault, FallbackReason, PeerErrorReason, PrefillFailed
from .pd_request import PdRequest, PrefillResult, leg_request_id
from .peers import PeerSet, resolve
from .server import PD_ERROR_HEADER, forward_headers

__all__ = ["PrefillLeg", "peer_headers"]

log = logging.getLogger("pdsidecar.decode")

_RETRYABLE_PEER_ERRORS = ("draining", "overloaded")  # x-pd-error values: nothing was allocated


def peer_headers(sc, request: web.Request, rid: str) -> dict[str, str]:
    """Headers for a prefill sidecar: the client's Authorization only with
    --forward-authorization (it is meant for this deployment's API, not for peers)."""
    h = forward_headers(request, rid)
    if not sc.cfg.forward_authorization:
        h.pop("authorization", None)
    return h


class _TryAnother(Exception):
    """Nothing was allocated on this peer: the next attempt may go to another one."""


@dataclass
class _Answer:
    status: int
    content_type: str
    peer_error: str | None  # x-pd-error: the prefill sidecar refused before forwarding
    headers: CIMultiDictProxy[str]
    raw: bytes
    seconds: float


class PrefillLeg:
    def __init__(self, sc, peers: PeerSet, identity: Endpoint):
        self.sc = sc
        self.peers = peers
        self.identity = identity

    async def run(self, rq: PdRequest, body: dict, forced: Endpoint | None, est: int,
                  want_ids: bool) -> PrefillResult:
        cfg = self.sc.cfg
        data = json.dumps(prefill_body(rq.api, body, want_ids)).encode()
        tried: set[Endpoint] = set()
        attempts = cfg.prefill_retries + 1
        for attempt in range(attempts):
            ep = forced if forced is not None else self.peers.pick(exclude=tried)
            if ep is None:
                raise PrefillFailed(FallbackReason.CONNECT, "no reachable prefill peer")
            tried.add(ep)
            last = attempt == attempts - 1 or forced is not None
            try:
                return await self._attempt(rq, ep, data, est, want_ids, last)
            except _TryAnother:
                self.sc.metrics.retries.inc()
        raise PrefillFailed(FallbackReason.CONNECT, "no reachable prefill peer")

    async def _attempt(self, rq: PdRequest, ep: Endpoint, data: bytes, est: int, want_ids: bool,
                       last: bool) -> PrefillResult:
        """One leg to `ep`, booked on the peer while it runs (and after, if KV was handed out)."""
        prid = leg_request_id(rq.rid)
        path = API_PATHS[rq.api]
        headers = peer_headers(self.sc, rq.http, prid)
        signed = auth.sign(self.sc.cfg.auth_token, str(self.identity), prid, path, data)
        headers.update(signed)
        st = self.peers.state(ep)
        st.outstanding += 1
        st.outstanding_tokens += est
        handed_out = False
        try:
            ans = await self._exchange(ep, path, data, headers, last)
            pre = await self._judge(rq, ep, prid, signed[auth.NONCE_HEADER], ans, est, want_ids, last)
            handed_out = True
            st.outstanding_tokens += pre.tokens - est  # true size now
            return pre
        except asyncio.CancelledError:
            self.sc.metrics.client_disconnects.labels("prefill").inc()
            raise
        finally:
            if not handed_out:
                st.outstanding -= 1
                st.outstanding_tokens -= est
                self.peers.settle(ep)

    async def _exchange(self, ep: Endpoint, path: str, data: bytes, headers: dict[str, str],
                        last: bool) -> _Answer:
        """POST the leg and read the (capped) answer; transport failures become reasons."""
        cfg, m = self.sc.cfg, self.sc.metrics
        label = self.peers.label(ep)
        t = time.perf_counter()
        try:
            async with self.sc.upstreams.get(ep.url()).post(
                    ep.url() + path, data=data, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=cfg.prefill_timeout_s,
                                                  sock_connect=cfg.connect_timeout_s)) as r:
                status, ctype, perr, rhdrs = r.status, r.content_type, r.headers.get(PD_ERROR_HEADER), r.headers
                raw = await read_capped(r, cfg.max_prefill_answer_bytes)
        except AnswerRejected as e:
            self._reject_answer(ep, str(e))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            # nothing was sent: safe to try another peer
            m.peer_errors.labels(label, PeerErrorReason.CONNECT).inc()
            self.peers.mark_down(ep)
            if last:
                raise PrefillFailed(FallbackReason.CONNECT, f"cannot connect to prefill peer {ep}") from None
            raise _TryAnother() from None
        except asyncio.TimeoutError:
            m.peer_errors.labels(label, PeerErrorReason.TIMEOUT).inc()
            raise PrefillFailed(FallbackReason.TIMEOUT, f"prefill leg to {ep} timed out", 504) from None
        except aiohttp.ClientError as e:
            m.peer_errors.labels(label, PeerErrorReason.DISCONNECT).inc()
            raise PrefillFailed(FallbackReason.DISCONNECT,
                                f"prefill peer {ep} dropped the connection ({type(e).__name__})") from None
        return _Answer(status, ctype, perr, rhdrs, raw, time.perf_counter() - t)

    async def _judge(self, rq: PdRequest, ep: Endpoint, prid: str, nonce: str, ans: _Answer, est: int,
                     want_ids: bool, last: bool) -> PrefillResult:
        """The answer's verdict: a checked result, another attempt, or a typed failure."""
        cfg, m = self.sc.cfg, self.sc.metrics
        label = self.peers.label(ep)
        status, raw, perr = ans.status, ans.raw, ans.peer_error
        if cfg.auth_token and (status == 200 or (perr is None and 400 <= status < 500)):
            # what the decode engine or the client would get from this answer must
            # come from the prefill sidecar we signed the leg for, for this leg
            why = auth.verify_answer(cfg.auth_token, ans.headers, nonce, prid, status, raw)
            if why is not None:
                self._reject_answer(ep, f"answer signature {why}")
        if status == 200:
            return await self._result(rq, ep, prid, ans, est, want_ids)
        if 300 <= status < 400:
            # never followed (allow_redirects=False): a redirect from a peer is a
            # protocol error, not a place to send the prompt to
            m.peer_errors.labels(label, PeerErrorReason.REDIRECT).inc()
            raise PrefillFailed(FallbackReason.REDIRECT, f"prefill peer {ep} answered a redirect ({status})")
        if perr is not None:
            # the prefill sidecar refused before forwarding: nothing allocated
            m.peer_errors.labels(label, PeerErrorReason.PEER_REJECTED).inc()
            if perr in _RETRYABLE_PEER_ERRORS and not last:
                raise _TryAnother()
            raise PrefillFailed(FallbackReason.PEER_REJECTED, f"prefill peer {ep} refused the leg ({perr[:64]!r})")
        if status >= 500:
            m.peer_errors.labels(label, PeerErrorReason.HTTP_5XX).inc()
            raise PrefillFailed(FallbackReason.HTTP_5XX, f"prefill peer {ep} answered {status}")
        m.peer_errors.labels(label, PeerErrorReason.HTTP_4XX).inc()
        raise ClientFault(status, raw, ans.content_type or "application/json")

    async def _result(self, rq: PdRequest, ep: Endpoint, prid: str, ans: _Answer, est: int,
                      want_ids: bool) -> PrefillResult:
        """A 200 answer: its kv_transfer_params checked (schema, engine-address rule)."""
        cfg, m = self.sc.cfg, self.sc.metrics
        obj = loads_or_none(ans.raw)
        kv = obj.get("kv_transfer_params") if isinstance(obj, dict) else None
        if not isinstance(kv, dict) or not kv:
            m.peer_errors.labels(self.peers.label(ep), PeerErrorReason.PROTOCOL).inc()
            raise PrefillFailed(FallbackReason.PROTOCOL, "prefill response has no kv_transfer_params "
                                "(is the prefill vLLM running with a KV connector?)")
        try:
            kv = check_prefill_kv(kv, await self._engine_hosts(ep))
        except AnswerRejected as e:
            self._reject_answer(ep, str(e))
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        tokens = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else est
        # prompt token ids (and the first token: proxy.first_token_leg) only from a
        # verified (signed) answer
        verified = bool(cfg.auth_token)
        ids = prompt_ids_from_prefill(rq.api, obj) if verified and want_ids else None
        m.prefill_leg.observe(ans.seconds)
        return PrefillResult(ep, prid, kv, ids, ans.seconds, tokens, answer=obj if verified else None)

    async def _engine_hosts(self, ep: Endpoint) -> set[str]:
        """Addresses the chosen peer's engine may advertise (proxy.answer's rule)."""
        resolved = set()
        if not ep.is_ip:
            resolved = await resolve(ep.host, ep.port)
        return peer_engine_hosts(ep.host, resolved)

    def _reject_answer(self, ep: Endpoint, why: str) -> None:
        """A prefill answer failed a check: counted, logged with the peer, fallback."""
        self.sc.metrics.peer_errors.labels(self.peers.label(ep), PeerErrorReason.ANSWER_REJECTED).inc()
        log.warning("prefill answer rejected", extra={"peer": str(ep), "reason": FallbackReason.ANSWER_REJECTED, "error": why})
        raise PrefillFailed(FallbackReason.ANSWER_REJECTED, f"prefill peer {ep}: {why}")
