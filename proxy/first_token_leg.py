"""Decode role: the first token from the prefill leg, then the decode engine continues.

`FirstTokenLeg.eligible` says (before the prefill leg) whether a streaming request may
take this path and `tokenize` starts the local vLLM's tokenization of its prompt, to run
beside the prefill leg; `serve` (after it) sends the prefill answer's token to the client
at once and streams the continuation from the local vLLM (`proxy.first_token`'s body and
chunk conversion), or returns None: the caller then runs the normal decode leg. Nothing
is ever sent twice: a continuation that fails before its first byte is recomputed locally
from prompt + first token (`--fallback fallback`), one that fails later (or with
`--fallback fail`) ends the stream with an error event. The prefill result is settled
exactly once (proxy.release).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from aiohttp import web

from .body import dumps_with_ids, reuse_eligible
from .decode_leg import leg_timeouts
from .errors import FallbackReason
from .first_token import (FirstToken, StreamFormat, continuation_body, error_event, first_token, limit_of,
                          skip_reason, wanted)
from .pd_request import PdRequest, PrefillResult
from .release import KvRelease, ReleaseStatus
from .server import PATH_HEADER, forward_headers
from .tokens import TokenEstimator

__all__ = ["FirstTokenLeg"]

log = logging.getLogger("pdsidecar.decode")

_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)


class _NoOutput(Exception):
    """The continuation failed before its first byte: it may be recomputed."""

    def __init__(self, reason: FallbackReason, message: str):
        super().__init__(message)
        self.reason = reason


class FirstTokenLeg:
    def __init__(self, sc, release: KvRelease, tokens: TokenEstimator):
        self.sc = sc
        self.release = release
        self.tokens = tokens
        self._timeouts = leg_timeouts(sc.cfg)

    def tokenize(self, api: str, body: dict) -> asyncio.Task:
        """The prompt's token ids and digest from the local vLLM, while the prefill runs."""
        return asyncio.ensure_future(self.tokens.prompt_ids(api, body))

    def eligible(self, api: str, body: dict) -> bool:
        """Before the prefill leg: may this request get its first token from there?"""
        cfg = self.sc.cfg
        if not wanted(cfg.first_token_from_prefill, api, body):
            return False
        why = skip_reason(api, body)
        if why is None and not reuse_eligible(api, body, "all"):
            why = "request"  # a prompt of token ids / embeds, non-text chat content
        if why is None and not cfg.auth_token:
            why = "no_token_ids"  # the first token's id is taken only from a signed answer
        if why is None and cfg.first_token_ids == "local" and not self.tokens.can_tokenize:
            why = "no_token_ids"  # the local vLLM has no /tokenize
        if why is not None:
            self.sc.metrics.first_token_skipped.labels(why).inc()
            return False
        return True

    async def serve(self, rq: PdRequest, body: dict, pre: PrefillResult,
                    tokens: asyncio.Task | None) -> web.StreamResponse | None:
        """After the prefill leg: the client's stream, or None (normal path, counted).
        `tokens`: `tokenize`'s task (None: `--first-token-ids prefill`, the answer's ids)."""
        kv = pre.kv_params
        if not isinstance(pre.answer, dict):
            why: str = "no_token_ids"
        elif type(kv.get("pd_protocol_version")) is not int or kv.get("transfer_mode", "pull") != "pull":
            why = "connector"  # only PdConnector loads a prompt shorter than the decode's
        else:
            got = first_token(rq.api, pre.answer, limit_of(rq.api, body), kv)
            if not isinstance(got, FirstToken):
                why = got
            elif tokens is None:  # the signed answer's own ids (the decode engine checks them too)
                if pre.ids is None:
                    why = "no_token_ids"
                else:
                    return await self._stream(rq, body, pre, got, pre.ids)
            else:
                t = time.perf_counter()
                local = await tokens  # 0 s when the tokenization answered before the prefill leg
                self.sc.metrics.first_token_ids_wait.observe(time.perf_counter() - t)
                if local is None:
                    why = "no_token_ids"
                elif local[1] != kv.get("pd_prompt_sha256") or len(local[0]) != kv.get("remote_num_tokens"):
                    why = "tokens"  # this engine tokenizes the prompt otherwise: its KV is not ours
                else:
                    return await self._stream(rq, body, pre, got, local[0])
        self.sc.metrics.first_token_skipped.labels(why).inc()
        return None

    async def _stream(self, rq: PdRequest, body: dict, pre: PrefillResult, first: FirstToken,
                      ids: list[int]) -> web.StreamResponse:
        m = self.sc.metrics
        fmt = StreamFormat(rq.api, rq.rid, first, bool((body.get("stream_options") or {}).get("include_usage")))
        out = web.StreamResponse(status=200, headers={PATH_HEADER: rq.path, "x-request-id": rq.rid,
                                                      "Content-Type": "text/event-stream",
                                                      "Cache-Control": "no-cache"})
        rq.status = 200
        sent = False  # the continuation may have reached vLLM
        try:
            await out.prepare(rq.http)
            await out.write(fmt.opening())
            ttft = time.perf_counter() - rq.t0
            m.ttft.labels(rq.path).observe(ttft)
            m.overhead.labels("decode").observe(max(ttft - pre.seconds, 0.0))
            m.first_token.labels(rq.api).inc()
            if first.finish_reason is not None:
                # the one token was the last: no decode leg; the KV is pulled to free it
                self.release.abandon(rq, body, pre)
                await out.write(fmt.prefill_only_end())
            else:
                sent = True
                await self._continue(rq, out, fmt, body, pre, first, ids)
            await out.write_eof()
        except _CLIENT_GONE:
            m.client_disconnects.labels("decode").inc()
        except asyncio.CancelledError:
            m.client_disconnects.labels("decode").inc()
            self.release.client_left(rq, body, pre, sent)
            raise
        finally:
            self.release.settle(pre, ReleaseStatus.RELEASED)  # no-op once settled
        return out

    async def _continue(self, rq: PdRequest, out: web.StreamResponse, fmt: StreamFormat, body: dict,
                        pre: PrefillResult, first: FirstToken, ids: list[int]) -> None:
        """The continuation with the prefill KV; once more without it if that failed
        before any output (never the first token twice)."""
        cfg, m = self.sc.cfg, self.sc.metrics
        try:
            return await self._relay(rq, out, fmt, continuation_body(rq.api, body, ids, first, pre.kv_params),
                                     pre)
        except _NoOutput as e:
            self.release.settle(pre, ReleaseStatus.RELEASED)
            log.warning("continuation after the first token failed before output; " +
                        ("recomputing locally" if cfg.fallback == "fallback" else "ending the stream"),
                        extra={"request_id": rq.rid, "reason": e.reason, "error": str(e)})
            if cfg.fallback != "fallback":
                rq.path = "error"
                await out.write(error_event("decode failed after the first token", "decode_failed"))
                return None
            m.fallbacks.labels(e.reason).inc()
            rq.path = "fallback"
        try:
            await self._relay(rq, out, fmt, continuation_body(rq.api, body, ids, first, None), None)
        except _NoOutput as e:
            log.warning("local continuation failed too", extra={"request_id": rq.rid, "error": str(e)})
            rq.path = "error"
            await out.write(error_event("decode failed after the first token", "decode_failed"))

    async def _relay(self, rq: PdRequest, out: web.StreamResponse, fmt: StreamFormat, dbody: dict,
                     pre: PrefillResult | None) -> None:
        """POST the continuation to the local vLLM; its completion stream, converted, to
        the client. `_NoOutput` when it failed before its first byte."""
        cfg, m = self.sc.cfg, self.sc.metrics
        data = dumps_with_ids(dbody, "prompt")
        headers = forward_headers(rq.http, rq.rid)
        url = cfg.vllm_url + "/v1/completions"
        t_send = time.perf_counter()
        resp: aiohttp.ClientResponse | None = None
        got_output = False
        try:
            for attempt in range(2):
                try:
                    resp = await self.sc.upstreams.get(cfg.vllm_url).post(
                        url, data=data, headers=headers, allow_redirects=False, timeout=self._timeouts[attempt])
                    break
                except _CONNECT_ERRORS as e:
                    m.upstream_errors.labels("connect" if attempt else "connect_retry").inc()
                    if attempt:
                        raise _NoOutput(FallbackReason.DECODE_CONNECT, f"cannot connect ({type(e).__name__})") from None
                    await asyncio.sleep(0.05)
            assert resp is not None
            if resp.status != 200 or resp.content_type != "text/event-stream":
                payload = await resp.read()
                if resp.status >= 500 or resp.status < 400:
                    raise _NoOutput(FallbackReason.KV_LOAD, f"local vLLM answered {resp.status}")
                # the request's own fault (4xx): the client gets the engine's message
                await out.write(error_event(_message(payload), f"http_{resp.status}"))
                rq.path = "error"
                return
            buf = b""
            async for chunk in resp.content.iter_any():
                if not got_output:
                    got_output = True
                    m.decode_leg.labels(rq.path).observe(time.perf_counter() - t_send)
                    self.release.settle(pre, ReleaseStatus.PICKED_UP)
                buf += chunk
                while (i := buf.find(b"\n\n")) >= 0:
                    await self._write_event(out, fmt, buf[:i])
                    buf = buf[i + 2:]
            if buf.strip():
                await self._write_event(out, fmt, buf)
        except (asyncio.CancelledError, *_CLIENT_GONE):
            if resp is not None:
                resp.close()  # vLLM sees the disconnect and aborts the request
            raise
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            if resp is not None:
                resp.close()
            if not got_output:
                raise _NoOutput(FallbackReason.KV_LOAD, f"local vLLM failed ({type(e).__name__})") from None
            m.upstream_errors.labels("stream").inc()
            rq.path = "error"
            await out.write(error_event("the decode engine's stream broke off", "stream_interrupted"))
        finally:
            if resp is not None:
                resp.release()

    @staticmethod
    async def _write_event(out: web.StreamResponse, fmt: StreamFormat, event: bytes) -> None:
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                piece = fmt.convert(line[5:].strip())
                if piece:
                    await out.write(piece)


def _message(payload: bytes) -> str:
    """The error message of an OpenAI-style error body (bounded), else a generic one."""
    try:
        obj = json.loads(payload)
        msg = obj["error"]["message"] if isinstance(obj.get("error"), dict) else obj.get("message")
        if isinstance(msg, str):
            return msg[:1000]
    except (ValueError, RecursionError, AttributeError, KeyError, TypeError):
        pass
    return "the decode engine refused the continuation"
