"""`pdbench chaos`: hostile-input tools shared by the `hostile` scenario and
tests/test_fuzz*.py: raw HTTP requests, SSRF header values, slowloris clients and the
log-hygiene counter."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int | None  # None: no HTTP answer (connection dropped / timed out)
    headers: dict[str, str]
    body: bytes
    kind: str  # answered | dropped | timeout
    seconds: float


def raw_request(port: int, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                body: bytes = b"", timeout_s: float = 10.0, host: str = "127.0.0.1",
                raw_head: bytes | None = None) -> RawResponse:
    """One HTTP/1.1 request over a fresh loopback socket (arbitrary headers allowed)."""
    if host not in ("127.0.0.1", "::1"):
        raise ValueError("loopback only")
    t0 = time.monotonic()
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect((host, port))
        if raw_head is None:
            hs = [("Host", f"127.0.0.1:{port}"), ("Connection", "close"), *(headers or [])]
            if body or method == "POST":
                hs.append(("Content-Length", str(len(body))))
            raw_head = (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs) + "\r\n").encode(
                "latin-1")
        s.sendall(raw_head + body)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except socket.timeout:
        return RawResponse(None, {}, b"", "timeout", time.monotonic() - t0)
    except OSError:
        chunks = chunks if "chunks" in locals() else []
        if not chunks:
            return RawResponse(None, {}, b"", "dropped", time.monotonic() - t0)
    finally:
        s.close()
    data = b"".join(chunks)
    if not data.startswith(b"HTTP/"):
        return RawResponse(None, {}, data, "dropped", time.monotonic() - t0)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return RawResponse(status, hdrs, rest, "answered", time.monotonic() - t0)


SSRF_TEMPLATES = (
    "127.0.0.2:{p}",  # other host, allowed port
    "127.0.0.1:{q}",  # allowed host, other port
    "[::ffff:127.0.0.1]:{q}",  # IPv4-mapped IPv6, other port
    "2130706433:{q}", "0177.0.0.1:{q}", "0x7f.0.0.1:{q}", "0x7f000001:{q}", "127.1:{q}",
    "017700000001:{q}", "127.0.0.1.:{q}",
    "a@127.0.0.1:{q}", "127.0.0.1:{p}@127.0.0.1:{q}", "user:pw@127.0.0.1:{p}",
    "http://127.0.0.1:{q}", "http://127.0.0.1:{p}", "127.0.0.1:{q}/x",
    "127.0.0.1:{p}/../x", "127.0.0.1:{p}?x=1", "127.0.0.1:{p}#x",
    "localhost:{q}", "localhost:{p}", "127.0.0.1:0{p}",
    "127.0.0.1:{p_wrap}", "127.0.0.1:-{p}", "127.0.0.1:{p}:{q}",
    "127.0.0.1 :{p}", "127.0.0.1:{q},127.0.0.1:{p}", "127.0.0.1%00:{q}",
    "[127.0.0.1]:{q}", "127.0.0.1:*", "0.0.0.0:{q}", "[::]:{q}", "[fe80::1%lo]:{q}",
    "[::1]:{q6}", "[0:0:0:0:0:0:0:1]:{q6}", "[::1]:{p}",
)


def ssrf_header_values(allowed_port: int, probe_port: int, probe6_port: int | None) -> list[tuple[str, str]]:
    """(template, value) of x-prefiller-host-port values that must NOT make the decode
    sidecar connect anywhere but its configured prefill peer ({p}); probes ({q}, {q6})
    listen on 127.0.0.1 / ::1."""
    out = []
    for t in SSRF_TEMPLATES:
        if "{q6}" in t and probe6_port is None:
            continue
        out.append((t, t.format(p=allowed_port, q=probe_port, q6=probe6_port, p_wrap=allowed_port + 65536)))
    return out


def ipv6_loopback_ok() -> bool:
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


def slowloris(port: int, n: int, bound_s: float, body: bool) -> tuple[int, int, float]:
    """n connections that stall (mid-headers, or mid-body when `body`); returns
    (closed by the server within bound_s, still open at bound_s, seconds until the last close)."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if body:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model\":")
        else:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        s.setblocking(False)
        socks.append(s)
    t0 = time.monotonic()
    open_ = set(range(n))
    answers: list[bytes] = []
    last = 0.0
    while open_ and time.monotonic() - t0 < bound_s:
        for i in list(open_):
            try:
                b = socks[i].recv(65536)
                if not b or b.startswith(b"HTTP/1.1 4") or b.startswith(b"HTTP/1.1 5"):
                    # closed, or answered with an error (408/413/504...): the request is over
                    answers.append(b[:12])
                    open_.discard(i)
                    last = time.monotonic() - t0
                    continue
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(i)
                last = time.monotonic() - t0
        time.sleep(0.2)
    for s in socks:
        s.close()
    slowloris.last_answers = answers  # type: ignore[attr-defined]
    return n - len(open_), len(open_), last


LOG_SECRETS_CHECKED = ("auth token", "prompt text", "Traceback")


def log_hygiene(logs: str, token: str, prompts: list[str]) -> dict[str, int]:
    """Count sidecar log lines leaking the token or prompt text, or carrying tracebacks."""
    lines = logs.splitlines()
    return {"lines": len(lines),
            "token": sum(token in ln for ln in lines),
            "prompt": sum(any(p in ln for p in prompts) for ln in lines),
            "traceback": sum("Traceback" in ln for ln in lines),
            "unhandled": sum('"unhandled error"' in ln for ln in lines)}
