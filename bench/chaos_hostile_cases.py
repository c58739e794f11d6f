"""`pdbench chaos`: the hostile cases, each one request and its verdict: SSRF through
x-prefiller-host-port, peer auth and replay, oversized and malformed input, client
transfer fields, forged prefill answers from a rogue peer."""

from __future__ import annotations

import json
import secrets
import time
from typing import Callable

from bench.chaos_faults import ROGUE_MODES, Detector, RoguePeer
from bench.chaos_hostile import RawResponse, ipv6_loopback_ok, raw_request, ssrf_header_values
from bench.chaos_stack import prom_samples

# hostile cases that fail because of known bugs in the sidecar (docs/reliability.md)


KNOWN_BUGS = {
    "prefill: replayed signed leg": "B1",
    "decode: deeply nested JSON": "B2",
}


def hostile_cases(decode_port: int, prefill_port: int, allowed_prefill_port: int, token: str, model: str,
                  decode_identity: str, max_body_bytes: int = 16 * 2**20) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    """(name, check) pairs; each check sends one hostile request and says whether the
    sidecar answered as it must (4xx/drop, no 500, no traceback, nothing forwarded)."""
    from proxy import auth

    body_c = json.dumps({"model": model, "prompt": "hello hostile world", "max_tokens": 2}).encode()
    cases: list[tuple[str, Callable[[], tuple[bool, str]]]] = []

    def expect_4xx(r: RawResponse, allowed=range(400, 500), drop_ok: bool = False) -> tuple[bool, str]:
        if r.status is None:
            return drop_ok, f"no answer ({r.kind})"
        if b"Traceback" in r.body:
            return False, "traceback in body"
        return r.status in allowed, f"status {r.status}"

    # -- SSRF through x-prefiller-host-port: 4xx and no connection to any probe
    def ssrf_all() -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
        out = []
        det = Detector("127.0.0.1")
        det6 = Detector("::1") if ipv6_loopback_ok() else None
        for tmpl, v in ssrf_header_values(allowed_prefill_port, det.port, det6.port if det6 else None):
            def check(v=v):
                before = len(det.hits) + (len(det6.hits) if det6 else 0)
                try:
                    r = raw_request(decode_port, "POST", "/v1/completions",
                                    [("Content-Type", "application/json"), ("x-prefiller-host-port", v)], body_c)
                except UnicodeEncodeError:
                    return True, "unsendable"
                time.sleep(0.05)
                hits = len(det.hits) + (len(det6.hits) if det6 else 0) - before
                if hits:
                    return False, f"sidecar connected to the probe ({hits}x)"
                if r.status == 200 and v in (f"[::ffff:127.0.0.1]:{allowed_prefill_port}",):
                    return True, "canonical form of the allowed peer"
                return expect_4xx(r)
            out.append((f"ssrf {tmpl}", check))
        out.append(("ssrf probes closed", lambda: (det.close(), det6 and det6.close(), (True, "closed"))[-1]))
        return out

    cases += ssrf_all()

    # -- prefill sidecar: unauthenticated, forged, stale, wrong path, not allowed, replayed
    def prefill_leg(headers: list[tuple[str, str]], path="/v1/completions", rid="chaos-auth-1", body=body_c):
        return raw_request(prefill_port, "POST", path,
                           [("Content-Type", "application/json"), ("x-request-id", rid), *headers], body)

    def signed(rid: str, path="/v1/completions", peer=decode_identity, now=None, tok=token, body=body_c):
        return list(auth.sign(tok, peer, rid, path, body, now=now).items())  # signs the body it is sent with

    cases += [
        ("prefill: no auth headers", lambda: expect_4xx(prefill_leg([]), (401,))),
        ("prefill: no x-request-id", lambda: expect_4xx(raw_request(
            prefill_port, "POST", "/v1/completions", [("Content-Type", "application/json")], body_c), (400, 401))),
        ("prefill: forged signature", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-2", tok="not-the-token-0123456789"), rid="chaos-auth-2"), (401,))),
        ("prefill: stale signature", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-3", now=time.time() - 3600), rid="chaos-auth-3"), (401,))),
        ("prefill: signature for another path", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-4", path="/v1/chat/completions"), rid="chaos-auth-4"), (401,))),
        ("prefill: signature for another request id", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-5"), rid="chaos-auth-5b"), (401,))),
        ("prefill: signed peer not allowlisted", lambda: expect_4xx(prefill_leg(
            signed("chaos-auth-6", peer="127.0.0.1:1"), rid="chaos-auth-6"), (403,))),
        ("prefill: release unauthenticated", lambda: expect_4xx(raw_request(
            prefill_port, "POST", "/pd/v1/release", [("Content-Type", "application/json"),
                                                     ("x-request-id", "chaos-rel-1")],
            b'{"releases":[{"id":"x","status":"picked_up"}]}'), (401,))),
    ]

    def replay() -> tuple[bool, str]:
        rid = f"chaos-replay-{secrets.token_hex(4)}"
        h = signed(rid)
        first = prefill_leg(h, rid=rid)
        second = prefill_leg(h, rid=rid)
        if first.status != 200:
            return False, f"the genuine leg got {first.status}"
        return expect_4xx(second, range(400, 500))

    cases.append(("prefill: replayed signed leg", replay))

    # -- oversized bodies and headers, malformed requests (decode sidecar)
    big = b'{"model":"m","prompt":"' + b"a" * (max_body_bytes + 1024) + b'"}'
    cases += [
        ("decode: body over --max-body-bytes", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")], big, 30), (413,),
            drop_ok=True)),
        ("decode: Content-Length over limit, no body", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", raw_head=(
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {max_body_bytes * 4}\r\nConnection: close\r\n\r\n").encode(), timeout_s=10),
            (413,), drop_ok=True)),
        ("decode: 64 KiB header", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [("x-big", "a" * 65536)], body_c), drop_ok=True)),
        ("decode: 2000 headers", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [(f"x-h{i}", "v") for i in range(2000)], body_c),
            drop_ok=True)),
        ("decode: 64 KiB request line", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions?" + "a" * 65536, [], body_c), drop_ok=True)),
        ("decode: deeply nested JSON", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")],
            b'{"model":"m","prompt":' + b"[" * 100000 + b"]" * 100000 + b"}"))),
        ("decode: invalid UTF-8", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")],
            b'{"model":"m","prompt":"\xff\xfe"}'))),
        ("decode: JSON array body", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/chat/completions", [("Content-Type", "application/json")], b"[1,2]"))),
        ("decode: bad Content-Length", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", raw_head=b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: -5\r\nConnection: close\r\n\r\n"), drop_ok=True)),
        ("decode: request smuggling (CL+TE)", lambda: expect_4xx(raw_request(
            decode_port, "POST", "/v1/completions", raw_head=b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"),
            drop_ok=True)),
        ("decode: client kv_transfer_params naming a host", lambda: _kv_params_not_trusted(
            decode_port, model)),
    ]

    # -- issue 17: transfer fields a client hides elsewhere, leaks
    def xargs_params(local: bool) -> tuple[bool, str]:
        with Detector("127.0.0.1") as det:
            body = {"model": model, "prompt": "x y z", "max_tokens": 2,
                    "vllm_xargs": {"kv_transfer_params": f"127.0.0.1:{det.port}"}}
            if local:
                body["n"] = 2  # served locally: the path that forwarded the client's bytes raw
            r = raw_request(decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")],
                            json.dumps(body).encode(), 30)
            time.sleep(0.3)
            if det.hits:
                return False, "something connected to the host named in vllm_xargs"
            return (r.status == 200, f"status {r.status}")

    def duplicate_key() -> tuple[bool, str]:
        with Detector("127.0.0.1") as det:
            evil = json.dumps({"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": det.port,
                               "remote_engine_id": "evil", "remote_block_ids": [[1, 2, 3]],
                               "remote_request_id": "evil-2"})
            raw = (f'{{"model":{json.dumps(model)},"prompt":"x y z","max_tokens":2,"n":2,'
                   f'"kv_transfer_params":{evil},"kv_transfer_params":null}}').encode()
            r = raw_request(decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")], raw, 30)
            time.sleep(0.3)
            if det.hits:
                return False, "something connected to the host in the first of two kv_transfer_params"
            return (r.status == 200, f"status {r.status}")

    def other_transfer_fields() -> tuple[bool, str]:
        body = {"model": model, "prompt": "x y z", "max_tokens": 2, "ec_transfer_params": {"evil": 1},
                "vllm_xargs": {"ec_transfer_params": "evil", "kv_cache_report_mode": "full"}}
        r = raw_request(decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")],
                        json.dumps(body).encode(), 30)
        return (r.status == 200, f"status {r.status}")

    def no_banner(port: int) -> tuple[bool, str]:
        r = raw_request(port, "GET", "/health")
        srv = r.headers.get("server", "")
        return ("aiohttp" not in srv and "python" not in srv.lower()), f"Server: {srv!r}"

    def models_signed() -> tuple[bool, str]:
        unsigned = raw_request(prefill_port, "GET", "/v1/models", [("x-request-id", "chaos-models-1")])
        if unsigned.status != 401:
            return False, f"unsigned /v1/models on the prefill sidecar: {unsigned.status}"
        rid = "chaos-models-" + secrets.token_hex(4)
        h = list(auth.sign(token, decode_identity, rid, "/v1/models", b"", method="GET").items())
        ok = raw_request(prefill_port, "GET", "/v1/models", [("x-request-id", rid), *h])
        return ok.status == 200, f"unsigned 401, signed {ok.status}"

    cases += [
        ("decode: vllm_xargs kv_transfer_params (local path)", lambda: xargs_params(True)),
        ("decode: vllm_xargs kv_transfer_params (disagg path)", lambda: xargs_params(False)),
        ("decode: duplicate kv_transfer_params key", duplicate_key),
        ("decode: ec_transfer_params and kv_cache_report_mode", other_transfer_fields),
        ("decode: no Server version banner", lambda: no_banner(decode_port)),
        ("prefill: no Server version banner", lambda: no_banner(prefill_port)),
        ("prefill: /v1/models needs the signature", models_signed),
    ]
    return cases


def rogue_peer_cases(decode_port: int, prefill_port: int, token: str, model: str,
                     retarget: Callable[[int], None], restore: Callable[[], None]
                     ) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    """Issue 17: something answers on the prefill peer's address (`retarget` points the
    decode sidecar's path there, `restore` undoes it). Every forged answer must end in a
    local fallback counted as peer_answer_rejected, and nothing may connect to the engine
    address the answer names."""
    def rejected() -> float:
        return sum(v for n, lb, v in prom_samples(f"http://127.0.0.1:{decode_port}")
                   if n == "pd_fallbacks_total" and lb.get("reason") == "peer_answer_rejected")

    def case(mode: str) -> Callable[[], tuple[bool, str]]:
        def check() -> tuple[bool, str]:
            body = json.dumps({"model": model, "prompt": "rogue peer answer", "max_tokens": 2}).encode()
            with Detector("127.0.0.1") as det, RoguePeer(mode, det.port, relay_port=prefill_port,
                                                         token=token) as rogue:
                retarget(rogue.port)
                try:
                    if mode == "replayed":  # the first leg is relayed: a genuine, signed answer
                        for _ in range(2):
                            first = raw_request(decode_port, "POST", "/v1/completions",
                                                [("Content-Type", "application/json")], body, 60)
                            if rogue.captured:
                                break
                        if first.status != 200 or first.headers.get("x-pd-path") != "disagg":
                            return False, f"relayed leg: {first.status} {first.headers.get('x-pd-path')}"
                    detail = ""
                    for _ in range(2):  # a pooled connection the retarget closed may cost one try
                        before = rejected()
                        r = raw_request(decode_port, "POST", "/v1/completions",
                                        [("Content-Type", "application/json")], body, 60)
                        time.sleep(0.3)
                        if det.hits:
                            return False, f"something connected to the engine the {mode} answer named"
                        path = r.headers.get("x-pd-path")
                        detail = f"status {r.status}, path {path}, peer_answer_rejected +{rejected() - before:g}"
                        if r.status != 200 or path != "fallback":
                            return False, detail
                        if rejected() > before:
                            return True, detail
                    return False, detail
                finally:
                    restore()
        return check

    return [(f"peer answer: {m}", case(m)) for m in ROGUE_MODES]


def _kv_params_not_trusted(decode_port: int, model: str) -> tuple[bool, str]:
    """A client's own kv_transfer_params (remote host/port of a probe) must never make the
    decode engine connect there: the sidecar drops them."""
    with Detector("127.0.0.1") as det:
        body = json.dumps({"model": model, "prompt": "x y z", "max_tokens": 2, "kv_transfer_params": {
            "do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": det.port,
            "remote_engine_id": "evil", "remote_block_ids": [[1, 2, 3]], "remote_request_id": "evil-1"}}).encode()
        r = raw_request(decode_port, "POST", "/v1/completions", [("Content-Type", "application/json")], body, 30)
        time.sleep(0.3)
        if det.hits:
            return False, "something connected to the host named in client kv_transfer_params"
        if r.status is None or r.status >= 500:
            return False, f"status {r.status}"
        return True, f"status {r.status}"
