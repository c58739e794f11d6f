"""Peer authentication between sidecars.

The decode sidecar names itself in `x-pd-peer: host:port` and binds that identity, a
timestamp, the request id and the path to the shared token with HMAC-SHA256:

    x-pd-signature: v1=<hex hmac(token, "v1\\n{peer}\\n{ts}\\n{request_id}\\n{path}")>

The prefill sidecar recomputes it (constant-time compare), rejects stale timestamps,
checks the claimed host:port against its allowlist and the socket peer address against
the claimed host.
"""

from __future__ import annotations

import hashlib
import hmac
import time

PEER_HEADER = "x-pd-peer"
TS_HEADER = "x-pd-timestamp"
SIG_HEADER = "x-pd-signature"
MAX_SKEW_S = 120.0


def _mac(token: str, peer: str, ts: str, request_id: str, path: str) -> str:
    msg = f"v1\n{peer}\n{ts}\n{request_id}\n{path}".encode()
    return "v1=" + hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def sign(token: str | None, peer: str, request_id: str, path: str, now: float | None = None) -> dict[str, str]:
    """Headers that authenticate a request from `peer` (no signature without a token)."""
    ts = str(int(now if now is not None else time.time()))
    h = {PEER_HEADER: peer, TS_HEADER: ts}
    if token:
        h[SIG_HEADER] = _mac(token, peer, ts, request_id, path)
    return h


def verify(token: str, headers, request_id: str, path: str, now: float | None = None) -> str | None:
    """None when the signature is good, else a reason (missing|bad_signature|stale)."""
    peer = headers.get(PEER_HEADER)
    ts = headers.get(TS_HEADER)
    sig = headers.get(SIG_HEADER)
    if not peer or not ts or not sig:
        return "missing"
    expected = _mac(token, peer, ts, request_id, path)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        return "bad_signature"
    try:
        t = int(ts)
    except ValueError:
        return "bad_signature"
    if abs((now if now is not None else time.time()) - t) > MAX_SKEW_S:
        return "stale"
    return None
