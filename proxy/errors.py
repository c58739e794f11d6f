"""Errors: OpenAI-style JSON answers (`{"error": {"message", "type", "code"}}`) and the
typed exceptions of the decode role's legs, each with a reason from a closed enum (the
reason is the metric label; nothing is decided by matching exception text)."""

from __future__ import annotations

import json
from enum import Enum

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    err = {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
           "param": param, "code": code or str(status)}
    return json.dumps({"error": err}).encode()


def error_response(status: int, message: str, code: str | None = None, *, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, code, param),
                        content_type="application/json", headers=headers)


class RequestError(Exception):
    """Raised inside handlers; turned into an OpenAI-style error response."""

    def __init__(self, status: int, message: str, code: str | None = None, *, param: str | None = None,
                 headers: dict[str, str] | None = None, close: bool = False):
        super().__init__(message)
        self.close = close
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers

    def response(self) -> web.Response:
        r = error_response(self.status, self.message, self.code, param=self.param, headers=self.headers)
        if self.close:  # e.g. an unread body is still on the connection
            r.force_close()
        return r


class Label(str, Enum):
    """A closed set of label values; `str()` and f-strings give the value."""

    def __str__(self) -> str:
        return self.value


class FallbackReason(Label):
    """Why a disaggregated request was recomputed locally (`pd_fallbacks_total{reason}`) or,
    with `--fallback fail`, answered an error (`prefill_<reason>`)."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    DISCONNECT = "disconnect"
    HTTP_5XX = "http_5xx"
    PEER_REJECTED = "peer_rejected"
    PROTOCOL = "protocol"
    REDIRECT = "redirect"
    ANSWER_REJECTED = "peer_answer_rejected"
    DECODE_CONNECT = "decode_connect"  # the decode leg never reached the local vLLM
    KV_LOAD = "kv_load"  # the decode engine failed (5xx) before any output


class PeerErrorReason(Label):
    """Why talking to a peer sidecar failed (`pd_peer_errors_total{reason}`)."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    DISCONNECT = "disconnect"
    HTTP_5XX = "http_5xx"
    HTTP_4XX = "http_4xx"
    REDIRECT = "redirect"
    PEER_REJECTED = "peer_rejected"
    PROTOCOL = "protocol"
    ANSWER_REJECTED = "peer_answer_rejected"
    STATS = "stats"  # its /pd/v1/stats could not be read
    RELEASE = "release"  # a /pd/v1/release batch failed


class PrefillFailed(Exception):
    """The prefill leg failed; `str()` is the detail for logs (it names internal addresses,
    never shown to clients), `reason` the label, `status` the answer under `--fallback fail`."""

    def __init__(self, reason: FallbackReason, message: str, status: int = 502):
        super().__init__(message)
        self.reason = reason
        self.status = status


class ClientFault(Exception):
    """The prefill engine refused the request itself (4xx): the client's fault, pass it on."""

    def __init__(self, status: int, body: bytes, content_type: str):
        super().__init__(f"prefill engine answered {status}")
        self.status, self.body, self.content_type = status, body, content_type


class RecomputeLocally(Exception):
    """The disaggregated decode leg failed before anything reached the client and the policy
    allows a local recompute; the leg already released the prefill KV."""

    def __init__(self, reason: FallbackReason, connect_retries: int = 1):
        super().__init__(str(reason))
        self.reason = reason
        self.connect_retries = connect_retries  # for the local leg
