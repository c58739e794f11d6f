"""Peer authentication between sidecars.

The decode sidecar names itself in `x-pd-peer: host:port` and signs each request it sends
to a prefill sidecar with HMAC-SHA256 over the shared token:

    x-pd-timestamp:      unix seconds
    x-pd-nonce:          128 random bits (hex), never reused
    x-pd-content-sha256: hex sha256 of the exact body bytes sent
    x-pd-signature:      v2=<hex hmac(token, "v2\\n{method}\\n{path}\\n{peer}\\n{ts}\\n{nonce}\\n{request_id}\\n{sha256}")>

The prefill sidecar validates the header values (printable ASCII, bounded), recomputes the
signature (constant-time compare), rejects timestamps more than MAX_SKEW_S away, checks the
claimed host:port against its allowlist and the socket peer address against the claimed
host, then - after reading the body - checks the body digest (constant time) and records
the nonce in a bounded `NonceCache`: the same signed headers are accepted once, with
exactly the body they were signed for.

Answers are signed too: the prefill sidecar signs each answer it passes on from its vLLM,
bound to the request's nonce (which only the signing decode sidecar and this prefill
sidecar know together with the request id), its status and the exact body bytes:

    x-pd-content-sha256:   hex sha256 of the answer body
    x-pd-answer-signature: v2=<hex hmac(token, "v2-answer\n{status}\n{nonce}\n{request_id}\n{sha256}")>

The decode sidecar accepts a prefill answer (its `kv_transfer_params`, its prompt token
ids) only with a valid answer signature for the nonce it sent (`verify_answer`).

Public API: `sign`/`verify` (requests), `sign_answer`/`verify_answer` (answers),
`verify_body`, `NonceCache` and the header names (`PEER_HEADER` ... `ANSWER_SIG_HEADER`).
Besides the sidecars, `pdbench chaos` (bench/chaos_hostile_cases.py, bench/chaos_faults.py)
signs hostile requests and forged answers with them, as a peer holding the token would.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
import time

PEER_HEADER = "x-pd-peer"
TS_HEADER = "x-pd-timestamp"
NONCE_HEADER = "x-pd-nonce"
BODY_HEADER = "x-pd-content-sha256"
SIG_HEADER = "x-pd-signature"
ANSWER_SIG_HEADER = "x-pd-answer-signature"
AUTH_HEADERS = (PEER_HEADER, TS_HEADER, NONCE_HEADER, BODY_HEADER, SIG_HEADER)
MAX_SKEW_S = 120.0

# header values that take part in the MAC: visible ASCII only, bounded (B4: a byte >= 0x80
# arrives as a surrogate-escaped str and must be a 401, not a UnicodeEncodeError)
_VISIBLE = re.compile(r"[\x21-\x7e]+")
_TS = re.compile(r"[0-9]{1,12}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PATH = re.compile(r"[\x21-\x7e]{1,2048}")


def printable(value: str | None, max_len: int = 256) -> bool:
    """Is `value` non-empty visible ASCII of at most max_len characters?"""
    return bool(value) and len(value) <= max_len and _VISIBLE.fullmatch(value) is not None


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _mac(token: str, method: str, path: str, peer: str, ts: str, nonce: str, request_id: str, digest: str) -> str:
    # every field is visible ASCII here (checked by verify / produced by sign); encode strictly anyway
    msg = "\n".join(("v2", method, path, peer, ts, nonce, request_id, digest)).encode("ascii", "strict")
    return "v2=" + hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def sign(token: str | None, peer: str, request_id: str, path: str, body: bytes = b"", *, method: str = "POST",
         now: float | None = None, nonce: str | None = None) -> dict[str, str]:
    """Headers that authenticate `body` sent by `peer` as `method path` (no signature without
    a token). Sign the exact bytes you send; every call gets a fresh nonce."""
    ts = str(int(now if now is not None else time.time()))
    nonce = nonce or secrets.token_hex(16)
    digest = body_digest(body)
    h = {PEER_HEADER: peer, TS_HEADER: ts, NONCE_HEADER: nonce, BODY_HEADER: digest}
    if token:
        h[SIG_HEADER] = _mac(token, method, path, peer, ts, nonce, request_id, digest)
    return h


def verify(token: str, headers, request_id: str, path: str, method: str = "POST",
           now: float | None = None) -> str | None:
    """Check the signed headers (not the body: see `verify_body`).

    None when good, else a reason: missing | malformed | bad_signature | stale."""
    vals = [headers.get(h) for h in AUTH_HEADERS]
    if not all(vals):
        return "missing"
    peer, ts, nonce, digest, sig = vals
    if not (all(printable(v) for v in vals) and printable(request_id, 128) and _PATH.fullmatch(path or "")
            and _TS.fullmatch(ts) and _NONCE.fullmatch(nonce) and _HEX64.fullmatch(digest)
            and method.isascii() and method.isalpha()):
        return "malformed"
    expected = _mac(token, method, path, peer, ts, nonce, request_id, digest)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        return "bad_signature"
    if abs((now if now is not None else time.time()) - int(ts)) > MAX_SKEW_S:
        return "stale"
    return None


def _answer_mac(token: str, status: int, nonce: str, request_id: str, digest: str) -> str:
    msg = "\n".join(("v2-answer", str(int(status)), nonce, request_id, digest)).encode("ascii", "strict")
    return "v2=" + hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def sign_answer(token: str | None, nonce: str, request_id: str, status: int, body: bytes) -> dict[str, str]:
    """Headers that authenticate an answer `body` with `status` to the request that carried
    `nonce` and `request_id` (no signature without a token or a valid nonce)."""
    digest = body_digest(body)
    h = {BODY_HEADER: digest}
    if token and _NONCE.fullmatch(nonce or "") and printable(request_id, 128):
        h[ANSWER_SIG_HEADER] = _answer_mac(token, status, nonce, request_id, digest)
    return h


def verify_answer(token: str, headers, nonce: str, request_id: str, status: int, body: bytes) -> str | None:
    """None when the answer is signed for (nonce, request_id, status, body), else a reason:
    missing | malformed | bad_signature."""
    sig, digest = headers.get(ANSWER_SIG_HEADER), headers.get(BODY_HEADER)
    if not sig or not digest:
        return "missing"
    if not (printable(sig) and _HEX64.fullmatch(digest)):
        return "malformed"
    expected = _answer_mac(token, status, nonce, request_id, body_digest(body))
    if not hmac.compare_digest(expected.encode(), sig.encode("ascii", "replace")):
        return "bad_signature"
    return None


def verify_body(headers, body: bytes) -> bool:
    """Does `body` match the (signed) x-pd-content-sha256? Constant-time compare."""
    want = headers.get(BODY_HEADER) or ""
    return hmac.compare_digest(body_digest(body).encode(), want.encode("ascii", "replace"))


class NonceCache:
    """Nonces of accepted signed requests, each kept until its timestamp would be stale
    anyway (ts + MAX_SKEW_S), so a replay inside the skew window is refused.

    Bounded: at `max_entries` live nonces `check_and_add` answers "full" instead of
    growing (the caller refuses the request with 503; nothing is evicted early, which
    would reopen the replay window)."""

    def __init__(self, max_entries: int = 200_000, skew_s: float = MAX_SKEW_S):
        self.max_entries = max_entries
        self.skew_s = skew_s
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    @staticmethod
    def key(peer: str, nonce: str) -> str:
        return f"{peer}\n{nonce}"

    def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        n = 0
        while self._heap and self._heap[0][0] < now:
            exp, k = heapq.heappop(self._heap)
            if self._expiry.get(k) == exp:
                del self._expiry[k]
                n += 1
        return n

    def seen(self, key: str, now: float | None = None) -> bool:
        self.expire(now)
        return key in self._expiry

    def check_and_add(self, key: str, ts: float, now: float | None = None) -> str:
        """"ok" (recorded), "replay" (seen before) or "full" (not recorded)."""
        now = time.time() if now is None else now
        self.expire(now)
        if key in self._expiry:
            return "replay"
        if len(self._expiry) >= self.max_entries:
            return "full"
        exp = max(ts + self.skew_s + 1.0, now)
        self._expiry[key] = exp
        heapq.heappush(self._heap, (exp, key))
        return "ok"
