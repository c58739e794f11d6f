"""Per-call authentication of the gRPC control plane with the shared sidecar token.

Every request carries ``x-pd-auth: v1:<unix ms>:<nonce>:<hmac>`` where the HMAC
(SHA-256, keyed with the token) covers the method, the timestamp, the nonce and the
SHA-256 of the exact request bytes. The server (:class:`AuthInterceptor`) refuses a
call that is unsigned, malformed, outside ``max_skew_s`` of its clock, signed with
another key, or whose nonce it has seen (replay), with ``UNAUTHENTICATED``, before
the request is parsed or any handler runs; refusals are counted by reason.

Unary answers are signed back (``x-pd-auth-resp`` trailing metadata: HMAC over the
method, the request's nonce and the exact answer bytes), so a client with the token
also knows the answer came from a token holder and belongs to its call. Errors and
the ``StatsStream`` messages are not signed (errors only make the caller fall back;
stats are informational).

Optionally (``TlsFiles``, ``control_tls_dir``) the channel is mutual TLS: the server
requires a client certificate signed by the deployment's CA and the client checks the
server's (fixed name ``pd-engine``, since peers are dialled by IP). That adds
confidentiality; the token check stays on top.

Replay state is bounded: at most ``max_nonces`` nonces are remembered; when one is
evicted early, its timestamp becomes a floor and every call signed at or before it
is refused, so no evicted nonce can be replayed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import grpc

log = logging.getLogger("vllm.pdsidecar.connector")

AUTH_KEY = "x-pd-auth"
RESP_KEY = "x-pd-auth-resp"
VERSION = "v1"
MIN_TOKEN_LEN = 16
DEFAULT_MAX_SKEW_S = 30.0
DEFAULT_MAX_NONCES = 100_000

# refusal reasons (label values of pd_connector_control_refused_total)
R_MISSING = "missing"
R_MALFORMED = "malformed"
R_STALE = "stale"
R_REPLAYED = "replayed"
R_BAD_SIGNATURE = "bad_signature"
REFUSAL_REASONS = (R_MISSING, R_MALFORMED, R_STALE, R_REPLAYED, R_BAD_SIGNATURE)

ENV_TOKEN = "PDSIDECAR_AUTH_TOKEN"
ENV_TOKEN_FILE = "PDSIDECAR_AUTH_TOKEN_FILE"
ENV_TLS_DIR = "PD_CONTROL_TLS_DIR"
TLS_SERVER_NAME = "pd-engine"  # pdsidecar.k8s.certs.CONTROL_CERT_NAME


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of the control plane's CA, engine certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes
    server_name: str = TLS_SERVER_NAME

    @classmethod
    def from_dir(cls, directory: str) -> "TlsFiles":
        """``ca.crt``, ``tls.crt``, ``tls.key`` of ``directory`` (a mounted Secret)."""
        out = {}
        for fname in ("ca.crt", "tls.crt", "tls.key"):
            try:
                with open(os.path.join(directory, fname), "rb") as f:
                    out[fname] = f.read()
            except OSError as e:
                raise ValueError(f"control TLS dir {directory}: {fname}: {e.strerror}") from None
            if b"-----BEGIN" not in out[fname]:
                raise ValueError(f"control TLS dir {directory}: {fname} is not PEM")
        return cls(out["ca.crt"], out["tls.crt"], out["tls.key"])

    def server_credentials(self) -> Any:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> Any:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def load_tls(tls_dir: str = "", env: Mapping[str, str] | None = None) -> TlsFiles | None:
    """``tls_dir``, else ``$PD_CONTROL_TLS_DIR``; None if neither is set."""
    env = os.environ if env is None else env
    d = tls_dir or env.get(ENV_TLS_DIR, "")
    return TlsFiles.from_dir(d) if d else None


class AuthError(Exception):
    """A call or answer failed authentication; ``reason`` is a refusal label."""

    def __init__(self, reason: str, msg: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {msg}")


def load_token(token_file: str = "", env: Mapping[str, str] | None = None) -> str | None:
    """The shared token: ``token_file``, else ``$PDSIDECAR_AUTH_TOKEN_FILE``, else
    ``$PDSIDECAR_AUTH_TOKEN``; None if none is set. Raises ``ValueError`` on an
    unreadable file or a token shorter than 16 characters."""
    env = os.environ if env is None else env
    path = token_file or env.get(ENV_TOKEN_FILE, "")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise ValueError(f"control token file {path}: {e.strerror}") from None
    else:
        token = (env.get(ENV_TOKEN) or "").strip()
        if not token:
            return None
    if len(token) < MIN_TOKEN_LEN:
        raise ValueError(f"the control token must be at least {MIN_TOKEN_LEN} characters")
    return token


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


class NonceCache:
    """Nonces seen within the window, bounded (see module doc: the floor)."""

    def __init__(self, window_s: float, max_entries: int) -> None:
        self.window_s = window_s
        self.max_entries = max(1, max_entries)
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._floor = 0.0
        self._lock = threading.Lock()

    def add(self, nonce: str, ts: float, now: float) -> bool:
        """Record ``nonce``; False if it was seen already or is at/below the floor."""
        with self._lock:
            while self._seen:  # drop what the timestamp check refuses anyway
                k, t = next(iter(self._seen.items()))
                if t >= now - self.window_s:
                    break
                self._seen.popitem(last=False)
            if ts <= self._floor or nonce in self._seen:
                return False
            self._seen[nonce] = ts
            while len(self._seen) > self.max_entries:
                _, t = self._seen.popitem(last=False)
                self._floor = max(self._floor, t)
            return True

    def __len__(self) -> int:
        return len(self._seen)


class ControlAuth:
    """Signs calls (client side) and checks them (server side) with one token."""

    def __init__(self, token: str | bytes, *, max_skew_s: float = DEFAULT_MAX_SKEW_S,
                 max_nonces: int = DEFAULT_MAX_NONCES,
                 clock: Callable[[], float] = time.time) -> None:
        key = token.encode() if isinstance(token, str) else bytes(token)
        if len(key) < MIN_TOKEN_LEN:
            raise ValueError(f"the control token must be at least {MIN_TOKEN_LEN} characters")
        # domain separation from the sidecars' use of the same token
        self._key = hmac.new(key, b"pdsidecar control plane v1", hashlib.sha256).digest()
        self.max_skew_s = max_skew_s
        self.clock = clock
        self.nonces = NonceCache(2 * max_skew_s, max_nonces)

    def _mac(self, *parts: bytes) -> str:
        return _b64(hmac.new(self._key, b"\n".join(parts), hashlib.sha256).digest())

    # -- requests
    def sign(self, method: str, body: bytes) -> tuple[str, str]:
        """``(metadata value, nonce)`` for one call of ``method`` with ``body``."""
        ts = str(int(self.clock() * 1000))
        nonce = _b64(secrets.token_bytes(18))
        mac = self._mac(b"req", method.encode(), ts.encode(), nonce.encode(),
                        hashlib.sha256(body).digest())
        return f"{VERSION}:{ts}:{nonce}:{mac}", nonce

    def check(self, method: str, body: bytes, value: str | None) -> str:
        """The call's nonce if ``value`` authenticates ``method`` + ``body``, else
        :class:`AuthError`. Records the nonce (a second check of it fails)."""
        if not value:
            raise AuthError(R_MISSING, "no x-pd-auth metadata")
        parts = value.split(":")
        if len(parts) != 4 or parts[0] != VERSION or not parts[1].isdigit() \
                or not 16 <= len(parts[2]) <= 64 or len(parts[3]) > 64:
            raise AuthError(R_MALFORMED, "x-pd-auth is not v1:<ms>:<nonce>:<mac>")
        _, ts_s, nonce, mac = parts
        want = self._mac(b"req", method.encode(), ts_s.encode(), nonce.encode(),
                         hashlib.sha256(body).digest())
        if not hmac.compare_digest(want, mac):
            raise AuthError(R_BAD_SIGNATURE, "signature does not match (wrong token?)")
        now, ts = self.clock(), int(ts_s) / 1000.0
        if abs(now - ts) > self.max_skew_s:
            raise AuthError(R_STALE, f"signed {now - ts:+.1f} s from this server's clock "
                                     f"(max {self.max_skew_s:g} s)")
        if not self.nonces.add(nonce, ts, now):
            raise AuthError(R_REPLAYED, "this call was already received (replay refused)")
        return nonce

    # -- answers
    def sign_response(self, method: str, nonce: str, body: bytes) -> str:
        return self._mac(b"resp", method.encode(), nonce.encode(), hashlib.sha256(body).digest())

    def check_response(self, method: str, nonce: str, body: bytes, value: str | None) -> None:
        if not value:
            raise AuthError(R_MISSING, "the answer is not signed (does the peer have the "
                                       "control token?)")
        if not hmac.compare_digest(self.sign_response(method, nonce, body), value):
            raise AuthError(R_BAD_SIGNATURE, "the answer's signature does not match")


class RefusalCounter:
    """Refused calls by reason (thread-safe); ``take()`` returns and resets the news."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total: dict[str, int] = {}
        self._new: dict[str, int] = {}

    def add(self, reason: str) -> int:
        with self._lock:
            self.total[reason] = self.total.get(reason, 0) + 1
            self._new[reason] = self._new.get(reason, 0) + 1
            return sum(self.total.values())

    def take(self) -> dict[str, int]:
        with self._lock:
            out, self._new = self._new, {}
            return out


def metadata_value(md: Any, key: str) -> str | None:
    for k, v in md or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Server side: every method's handler is wrapped to check the caller first.

    The wrapped handler takes the raw request bytes (nothing is parsed before the
    check), refuses with ``UNAUTHENTICATED``, then parses, runs the original
    behaviour and signs a unary answer into the trailing metadata.
    """

    def __init__(self, auth: ControlAuth, refused: RefusalCounter) -> None:
        self.auth = auth
        self.refused = refused

    def _check(self, method: str, raw: bytes, context: Any) -> str:
        try:
            return self.auth.check(method, raw,
                                   metadata_value(context.invocation_metadata(), AUTH_KEY))
        except AuthError as e:
            n = self.refused.add(e.reason)
            if n <= 5 or n % 1000 == 0:
                log.warning("PdConnector: refused control call %s from %s (%s); %d refused "
                            "so far", method, context.peer(), e, n)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"control call refused: {e.reason}")
            raise  # not reached: abort raises

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        parse = handler.request_deserializer
        auth = self.auth
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary
            ser = handler.response_serializer

            def unary(raw: bytes, context: Any) -> bytes:
                nonce = self._check(method, raw, context)
                resp = ser(behaviour(parse(raw), context))
                context.set_trailing_metadata(
                    ((RESP_KEY, auth.sign_response(method, nonce, resp)),))
                return resp
            return grpc.unary_unary_rpc_method_handler(unary)
        if handler.unary_stream is not None:
            stream_behaviour = handler.unary_stream

            def stream(raw: bytes, context: Any) -> Any:
                self._check(method, raw, context)
                yield from stream_behaviour(parse(raw), context)
            return grpc.unary_stream_rpc_method_handler(
                stream, response_serializer=handler.response_serializer)
        # no streaming-request methods in this service: refuse anything else
        def refuse(request: Any, context: Any) -> None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not served")
        return grpc.unary_unary_rpc_method_handler(refuse)
