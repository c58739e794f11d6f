"""OpenAI-style JSON errors: `{"error": {"message", "type", "code"}}`."""

from __future__ import annotations

import json

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
