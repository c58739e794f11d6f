"""Decode role: the decode leg, a client of the local vLLM.

`DecodeLeg.run` sends one body to the local engine and answers the client: a plain JSON
answer, or the SSE stream passed through chunk by chunk as it arrives. It never retries
itself beyond one more connect attempt (nothing sent yet); when a disaggregated leg fails
before anything reached the client (the engine is unreachable, or answered 5xx before any
output) and the caller allows it, it releases the prefill KV and raises
`RecomputeLocally` - the caller (proxy.decode) runs one local leg, no recursion here.
The prefill result is settled (proxy.release) exactly once, whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NoReturn

import aiohttp
from aiohttp import web

from .body import API_PATHS, dumps_with_ids
from .errors import FallbackReason, RecomputeLocally, RequestError
from .kv_report import MARKER, observe_transfer
from .pd_request import PdRequest, PrefillResult
from .release import KvRelease, ReleaseStatus
from .server import PATH_HEADER, forward_headers

__all__ = ["DecodeLeg"]

log = logging.getLogger("pdsidecar.decode")

_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def leg_timeouts(cfg) -> tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]:
    """Timeouts of a request to the local vLLM, built once: the first attempt, and a retry
    with twice the connect timeout (under heavy CPU load the first loopback connect can
    run out, O1)."""
    return tuple(aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s * k,
                                       sock_read=cfg.decode_timeout_s) for k in (1, 2))


class DecodeLeg:
    def __init__(self, sc, release: KvRelease):
        self.sc = sc
        self.release = release
        self._timeouts = leg_timeouts(sc.cfg)

    async def run(self, rq: PdRequest, body: dict, pre: PrefillResult | None = None, *,
                  may_recompute: bool = False, connect_retries: int = 1,
                  extra_headers: dict[str, str] | None = None) -> web.StreamResponse:
        """Serve `body` from the local vLLM; `pre` is the KV it loads (None: local or push).
        `may_recompute`: a failure before any output raises `RecomputeLocally`."""
        path = rq.path
        data = rq.raw if pre is None and path != "disagg" and rq.raw else dumps_with_ids(body, "prompt")
        headers = forward_headers(rq.http, rq.rid)
        if extra_headers:
            headers.update(extra_headers)
        out_headers = {PATH_HEADER: path, "x-request-id": rq.rid}
        resp: aiohttp.ClientResponse | None = None
        sent = True  # from the first connect attempt on, vLLM may have the request
        try:
            t_send = time.perf_counter()
            try:
                resp = await self._post(rq, data, headers, connect_retries, t_send)
            except _CONNECT_ERRORS as e:
                sent = False
                self._unreachable(rq, pre, may_recompute, e, t_send, out_headers)
            if 300 <= resp.status < 400:
                # redirects are never followed; the local vLLM does not send them
                self.sc.metrics.upstream_errors.labels("redirect").inc()
                raise RequestError(502, f"local vLLM answered a redirect ({resp.status})", "upstream_error",
                                   headers=out_headers)
            if resp.status == 200 and body.get("stream") and resp.content_type == "text/event-stream":
                return await self._stream(rq, resp, pre, path, t_send, out_headers)
            return await self._answer(rq, resp, pre, path, may_recompute, t_send, out_headers)
        except asyncio.CancelledError:
            # client went away (handler cancelled): close upstream so vLLM aborts
            self.sc.metrics.client_disconnects.labels("decode").inc()
            if resp is not None:
                resp.close()
            self.release.client_left(rq, body, pre, sent)
            raise
        finally:
            if resp is not None:
                resp.release()
            self.release.settle(pre, ReleaseStatus.RELEASED)  # no-op once settled

    async def _post(self, rq: PdRequest, data: bytes, headers: dict[str, str], connect_retries: int,
                    t_send: float) -> aiohttp.ClientResponse:
        """The request sent, up to `connect_retries` more connects; transport errors mapped
        to 502/504 except connect errors, which the caller handles."""
        sc, cfg, m = self.sc, self.sc.cfg, self.sc.metrics
        url = cfg.vllm_url + API_PATHS[rq.api]
        out_headers = {PATH_HEADER: rq.path, "x-request-id": rq.rid}
        try:
            for attempt in range(connect_retries + 1):
                try:
                    return await sc.upstreams.get(cfg.vllm_url).post(
                        url, data=data, headers=headers, allow_redirects=False,
                        timeout=self._timeouts[1 if attempt else 0])
                except _CONNECT_ERRORS as e:
                    # nothing sent yet: one more try is safe (the KV is still waiting)
                    if attempt >= connect_retries:
                        raise
                    m.upstream_errors.labels("connect_retry").inc()
                    log.warning("cannot connect to the local vLLM; retrying",
                                extra={"request_id": rq.rid, "error": type(e).__name__, "pd_path": rq.path,
                                       "after_s": round(time.perf_counter() - t_send, 3)})
                    await asyncio.sleep(0.05)
        except _CONNECT_ERRORS:
            raise
        except asyncio.TimeoutError as e:
            m.upstream_errors.labels("timeout").inc()
            log.warning("decode leg timed out", extra={"request_id": rq.rid, "error": type(e).__name__,
                                                       "after_s": round(time.perf_counter() - t_send, 3)})
            raise RequestError(504, "local vLLM did not answer in time", "upstream_timeout",
                               headers=out_headers) from None
        except aiohttp.ClientError as e:
            m.upstream_errors.labels("disconnect").inc()
            raise RequestError(502, f"local vLLM dropped the connection ({type(e).__name__})",
                               "upstream_error", headers=out_headers) from None
        raise AssertionError("unreachable")  # the loop returns or raises

    def _unreachable(self, rq: PdRequest, pre: PrefillResult | None, may_recompute: bool, e: Exception,
                     t_send: float, out_headers: dict[str, str]) -> NoReturn:
        """The local vLLM could not be reached: recompute (disaggregated leg, if allowed) or 502."""
        self.sc.metrics.upstream_errors.labels("connect").inc()
        if pre is not None and may_recompute:
            # the disaggregated decode leg never reached vLLM: fall back per policy
            # (--fallback fallback: recompute locally, one more connect attempt)
            self.release.settle(pre, ReleaseStatus.RELEASED)
            log.warning("cannot connect to the local vLLM for the decode leg; recomputing locally",
                        extra={"request_id": rq.rid, "error": type(e).__name__,
                               "after_s": round(time.perf_counter() - t_send, 3)})
            raise RecomputeLocally(FallbackReason.DECODE_CONNECT, connect_retries=0)
        log.warning("cannot connect to the local vLLM", extra={"request_id": rq.rid, "error": type(e).__name__,
                                                              "pd_path": rq.path})
        raise RequestError(502, "local vLLM is unreachable", "upstream_unavailable", headers=out_headers)

    async def _answer(self, rq: PdRequest, resp: aiohttp.ClientResponse, pre: PrefillResult | None, path: str,
                      may_recompute: bool, t_send: float, out_headers: dict[str, str]) -> web.Response:
        """A whole (non-streamed) answer: read, observed, passed on."""
        m = self.sc.metrics
        try:
            payload = await resp.read()
        except asyncio.TimeoutError:
            m.upstream_errors.labels("timeout").inc()
            raise RequestError(504, "local vLLM stalled", "upstream_timeout", headers=out_headers) from None
        except aiohttp.ClientError:
            m.upstream_errors.labels("disconnect").inc()
            raise RequestError(502, "local vLLM dropped the connection", "upstream_error",
                               headers=out_headers) from None
        if resp.status >= 500 and pre is not None and may_recompute:
            # the decode engine failed before any output (e.g. the KV load failed and the
            # connector's policy is "fail"): nothing reached the client, so recompute
            # locally once, without kv_transfer_params
            self.release.settle(pre, ReleaseStatus.RELEASED)
            log.warning("decode leg failed before output; recomputing locally",
                        extra={"request_id": rq.rid, "status": resp.status})
            raise RecomputeLocally(FallbackReason.KV_LOAD)
        t_first = time.perf_counter()
        # pull (pre) and push (no pre, path disagg) legs: did the KV load succeed?
        failed = observe_transfer(m, payload) if resp.status == 200 and path == "disagg" else None
        if failed is not None:
            path = self._mark_recompute(rq, out_headers, failed)
        self._observe_first(path, rq.t0, t_send, t_first, pre)
        ok = resp.status == 200 and failed is None
        self.release.settle(pre, ReleaseStatus.PICKED_UP if ok else ReleaseStatus.RELEASED)
        if resp.status != 200:
            out_headers[PATH_HEADER] = path
        rq.status = resp.status
        return web.Response(status=resp.status, body=payload,
                            content_type=resp.content_type or "application/json", headers=out_headers)

    async def _stream(self, rq: PdRequest, resp: aiohttp.ClientResponse, pre: PrefillResult | None, path: str,
                      t_send: float, out_headers: dict[str, str]) -> web.StreamResponse:
        """An SSE answer, passed through chunk by chunk."""
        m = self.sc.metrics
        out = web.StreamResponse(status=200, headers={**out_headers, "Content-Type": "text/event-stream",
                                                      "Cache-Control": "no-cache"})
        rq.status = 200
        first = True
        try:
            await out.prepare(rq.http)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
                if path == "disagg" and MARKER in chunk and rq.path == "disagg":
                    # a vLLM that streams kv_transfer_params: headers are out, but the
                    # request is still counted by what happened
                    event = next((ln[5:].strip() for ln in chunk.split(b"\n")
                                  if ln.startswith(b"data:") and MARKER in ln), b"")
                    failed = observe_transfer(m, event)
                    if failed is not None:
                        self._mark_recompute(rq, out_headers, failed)
                if first:
                    first = False
                    self._observe_first(path, rq.t0, t_send, time.perf_counter(), pre)
                    self.release.settle(pre, ReleaseStatus.PICKED_UP)
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

    def _observe_first(self, path: str, t0: float, t_send: float, t_first: float, pre: PrefillResult | None) -> None:
        m = self.sc.metrics
        ttft = t_first - t0
        leg = t_first - t_send
        m.ttft.labels(path).observe(ttft)
        m.decode_leg.labels(path).observe(leg)
        overhead = ttft - leg - (pre.seconds if pre is not None else 0.0)
        m.overhead.labels("decode").observe(max(overhead, 0.0))

    def _mark_recompute(self, rq: PdRequest, out_headers: dict[str, str], reason: str) -> str:
        """The decode engine recomputed a disaggregated request: label and count it so."""
        rq.path = out_headers[PATH_HEADER] = "recompute"
        self.sc.metrics.kv_load_failures.labels(reason).inc()
        log.warning("the decode engine could not load the prefill KV and recomputed the prompt",
                    extra={"request_id": rq.rid, "reason": reason, "peer": rq.peer})
        return "recompute"
