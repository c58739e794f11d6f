"""Sidecar edge cases against fake upstreams (fast, no engines): leg bodies, streaming
without buffering, retries, timeouts, fallback policy, auth, pending-KV bookkeeping,
drain, limits, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest
from aiohttp import web

from pdsidecar.dev.procs import free_port
from proxy import auth
from proxy.config import SidecarConfig
from proxy.endpoints import Endpoint
from proxy.server import Sidecar

TOKEN = "unit-test-token-0123456789"


class FakeVllm:
    """Mimics vLLM's OpenAI server enough for the sidecar: prefill legs answer with
    kv_transfer_params, decode legs stream SSE."""

    def __init__(self, *, chunks: int = 3, delay: float = 0.0, prefill_status: int = 200,
                 prefill_delay: float = 0.0, no_kv: bool = False, decode_kv: dict | None = None,
                 kv_load_fails: bool = False, prefill_kv_extra: dict | None = None, tokenize_fails: bool = False,
                 tokenize_status: int = 200, tokenize_delay: float = 0.0):
        self.requests: list[tuple[str, dict, dict]] = []
        self.chunks, self.delay = chunks, delay
        self.prefill_status, self.prefill_delay, self.no_kv = prefill_status, prefill_delay, no_kv
        self.decode_kv = decode_kv
        self.kv_load_fails = kv_load_fails
        self.prefill_kv_extra = prefill_kv_extra or {}  # more fields in the prefill answer's params
        self.tokenize_fails = tokenize_fails
        self.tokenize_status = tokenize_status  # 404: no /tokenize
        self.tokenize_delay = tokenize_delay  # seconds before /tokenize answers
        self.tokenized: list[dict] = []  # /tokenize bodies
        self.gate: asyncio.Event | None = None
        self.cancelled: list[str] = []
        self.runner = None
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "FakeVllm":
        app = web.Application()
        app.router.add_post("/v1/completions", self.gen)
        app.router.add_post("/v1/chat/completions", self.gen)
        app.router.add_get("/health", self.ok)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def ok(self, request):
        return web.Response(text="")

    async def models(self, request):
        return web.json_response({"data": [{"id": "m"}]})

    async def tokenize(self, request):
        """One token per word: 5, 6, 7, ..."""
        body = await request.json()
        self.tokenized.append(body)
        await asyncio.sleep(self.tokenize_delay)
        if self.tokenize_status != 200:
            return web.json_response({"detail": "Not Found"}, status=self.tokenize_status)
        if self.tokenize_fails:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        text = body.get("prompt") or json.dumps(body.get("messages"))
        n = len(text.split())
        return web.json_response({"count": n, "tokens": list(range(5, 5 + n))})

    async def gen(self, request: web.Request):
        body = await request.json()
        self.requests.append((request.path, body, request.headers.copy()))
        kv = body.get("kv_transfer_params") or {}
        chat = request.path.endswith("chat/completions")
        try:
            if kv.get("do_remote_decode"):
                await asyncio.sleep(self.prefill_delay)
                if self.prefill_status != 200:
                    return web.json_response({"error": {"message": "boom", "type": "x", "code": self.prefill_status}},
                                             status=self.prefill_status)
                out = {"id": "p", "choices": [{"index": 0, "text": "x"}], "usage": {"prompt_tokens": 7},
                       "kv_transfer_params": None if self.no_kv else
                       {"do_remote_prefill": True, "remote_block_ids": [[1, 2, 3]], "remote_request_id": "abc",
                        "remote_host": "127.0.0.1", "remote_port": 5600, **self.prefill_kv_extra}}
                if body.get("return_token_ids"):
                    if chat:
                        out["prompt_token_ids"] = [5, 6, 7]
                    else:
                        out["choices"][0]["prompt_token_ids"] = [5, 6, 7]
                return web.json_response(out)
            if kv.get("do_remote_prefill") and self.kv_load_fails:
                return web.json_response({"error": {"message": "KV load failed", "type": "x", "code": 500}},
                                         status=500)
            if not body.get("stream"):
                return web.json_response({"id": "d", "choices": [{"index": 0, "text": "hello"}],
                                          "usage": {"prompt_tokens": 7, "completion_tokens": 1},
                                          "kv_transfer_params": self.decode_kv})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(self.chunks):
                if i == 1 and self.gate is not None:
                    await self.gate.wait()
                await resp.write(f'data: {{"choices":[{{"index":0,"text":"t{i}"}}]}}\n\n'.encode())
                await asyncio.sleep(self.delay)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        except asyncio.CancelledError:
            self.cancelled.append("prefill" if kv.get("do_remote_decode") else "decode")
            raise


def cfg(role: str, **kw) -> SidecarConfig:
    base = dict(role=role, host="127.0.0.1", port=free_port(), auth_token=TOKEN, peer_stats_interval_s=0,
                connect_timeout_s=5, log_format="text")
    base.update(kw)
    return SidecarConfig(**base)


class Stack:
    def __init__(self, p_vllm: FakeVllm, d_vllm: FakeVllm, pre: Sidecar, dec: Sidecar):
        self.p_vllm, self.d_vllm, self.pre, self.dec = p_vllm, d_vllm, pre, dec

    async def stop(self):
        for x in (self.dec, self.pre):
            await x.stop()
        for v in (self.p_vllm, self.d_vllm):
            await v.stop()


async def stack(p_kw=None, d_kw=None, pre_kw=None, dec_kw=None, fake=None) -> Stack:
    """Two fake vLLMs (``fake``: a FakeVllm subclass) behind a prefill and a decode sidecar."""
    fake = fake or FakeVllm
    p_vllm = await fake(**(p_kw or {})).start()
    d_vllm = await fake(**(d_kw or {})).start()
    d_port = free_port()
    pre = await Sidecar(cfg("prefill", vllm_url=p_vllm.url, allowed_peers=[Endpoint("127.0.0.1", d_port)],
                            **(pre_kw or {}))).start()
    dkw = dict(port=d_port, vllm_url=d_vllm.url, targets=[Endpoint("127.0.0.1", pre.port)])
    dkw.update(dec_kw or {})
    dec = await Sidecar(cfg("decode", **dkw)).start()
    return Stack(p_vllm, d_vllm, pre, dec)


@pytest.fixture
async def st():
    s = await stack()
    yield s
    await s.stop()


def val(sc: Sidecar, name: str, **labels) -> float:
    return sc.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def post(url: str, body, headers=None, **kw):
    async with aiohttp.ClientSession() as s:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with s.post(url, data=data, headers={"content-type": "application/json", **(headers or {})}, **kw) as r:
            return r.status, r.headers.copy(), await r.read()


# --------------------------------------------------------------------------- #


async def test_leg_bodies_and_headers(st):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 50, "min_tokens": 5,
            "kv_transfer_params": {"remote_host": "evil"}}
    status, headers, data = await post(st.dec.url + "/v1/chat/completions", body,
                                       {"x-request-id": "client-rid", "x-prefiller-host-port": f"127.0.0.1:{st.pre.port}",
                                        "authorization": "Bearer k", "x-secret-other": "no"})
    assert status == 200 and headers["x-pd-path"] == "disagg" and headers["x-request-id"] == "client-rid"
    assert b"t0" in data and b"[DONE]" in data
    (_, pb, ph), = st.p_vllm.requests
    assert pb["stream"] is False and "stream_options" not in pb
    assert pb["max_tokens"] == pb["max_completion_tokens"] == pb["min_tokens"] == 1
    assert pb["kv_transfer_params"] == {"do_remote_decode": True} and pb["return_token_ids"] is True
    # the client's Authorization goes to the local vLLM only (--forward-authorization off)
    # a leg id of its own that still names the client's request
    assert re.fullmatch(r"client-rid-pd-[0-9a-f]{32}", ph["x-request-id"])
    assert "authorization" not in {k.lower() for k in ph}
    assert "x-prefiller-host-port" not in {k.lower() for k in ph} and "x-secret-other" not in ph
    (_, db, dh), = st.d_vllm.requests
    assert db["stream"] is True and db["stream_options"] == {"include_usage": True}
    assert db["max_tokens"] == 50 and db["min_tokens"] == 5
    assert db["kv_transfer_params"]["remote_block_ids"] == [[1, 2, 3]]  # verbatim
    assert db["kv_transfer_params"]["remote_host"] == "127.0.0.1"  # never the client's
    assert db["kv_transfer_params"]["prompt_token_ids"] == [5, 6, 7]  # vLLM's chat reuse key
    # the decode engine sees the prefill leg's id (vLLM's NixlPushConnector pairs P and D by it)
    assert dh["x-request-id"] == ph["x-request-id"] and dh["authorization"] == "Bearer k"
    assert "x-pd-peer" not in dh and "x-pd-signature" not in dh

    st.p_vllm.requests.clear(), st.d_vllm.requests.clear()
    status, _, _ = await post(st.dec.url + "/v1/completions", {"model": "m", "prompt": "a b c", "max_tokens": 3})
    assert status == 200
    (_, pb, _), = st.p_vllm.requests
    assert "max_completion_tokens" not in pb
    (_, db, _), = st.d_vllm.requests
    assert db["prompt"] == [5, 6, 7] and db["max_tokens"] == 3
    # echo: text prompt kept
    st.d_vllm.requests.clear()
    await post(st.dec.url + "/v1/completions", {"model": "m", "prompt": "a b c", "echo": True})
    assert st.d_vllm.requests[0][1]["prompt"] == "a b c"
    # the longest client id the sidecar keeps: the leg id is cut to what a prefill accepts
    st.p_vllm.requests.clear()
    status, headers, _ = await post(st.dec.url + "/v1/completions", {"model": "m", "prompt": "a b c"},
                                    {"x-request-id": "r" * 128})
    assert status == 200 and headers["x-pd-path"] == "disagg" and headers["x-request-id"] == "r" * 128
    leg = st.p_vllm.requests[0][2]["x-request-id"]
    assert re.fullmatch("r" * 88 + "-pd-[0-9a-f]{32}", leg)
    await asyncio.sleep(0.1)
    assert not st.pre.role.pending.items  # pickups reported


async def test_sse_not_buffered():
    s = await stack()
    s.d_vllm.gate = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as c:
            async with c.post(s.dec.url + "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
                assert b"t0" in first  # arrived while the upstream still holds chunk 2
                s.d_vllm.gate.set()
                rest = await r.read()
                assert b"t1" in rest and b"[DONE]" in rest
    finally:
        await s.stop()


async def settle(pred, tries: int = 50) -> None:
    """Poll ``pred`` every 0.1 s, at most ``tries`` times (the caller asserts after)."""
    for _ in range(tries):
        if pred():
            return
        await asyncio.sleep(0.1)


async def test_client_disconnect_during_prefill_aborts_upstream():
    s = await stack(p_kw={"prefill_delay": 30})
    try:
        async with aiohttp.ClientSession() as c:
            with pytest.raises(asyncio.TimeoutError):
                await c.post(s.dec.url + "/v1/completions", json={"model": "m", "prompt": "x"},
                             timeout=aiohttp.ClientTimeout(total=0.5))
        await settle(lambda: s.p_vllm.cancelled)
        assert s.p_vllm.cancelled == ["prefill"]  # the prefill engine saw the disconnect
        assert s.dec.in_flight == 0 and s.pre.in_flight == 0
        assert not s.d_vllm.requests
        assert val(s.dec, "pd_client_disconnects_total", stage="prefill") == 1
    finally:
        await s.stop()


async def test_client_disconnect_mid_stream_aborts_decode():
    s = await stack(d_kw={"chunks": 100, "delay": 0.05})
    try:
        async with aiohttp.ClientSession() as c:
            async with c.post(s.dec.url + "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
                await r.content.readuntil(b"\n\n")
                r.close()
        await settle(lambda: s.d_vllm.cancelled)
        assert s.d_vllm.cancelled == ["decode"]
        await asyncio.sleep(0.1)
        assert not s.pre.role.pending.items and s.dec.in_flight == 0
    finally:
        await s.stop()


async def test_retry_on_connect_error_only():
    s = await stack()
    dead = Endpoint("127.0.0.1", free_port())
    try:
        s.dec.role.peers.targets.insert(0, dead)
        await s.dec.role.peers.refresh()
        # equal peers are picked at random: send until the dead one was tried (each
        # request is still answered, by a retry on the live peer)
        for _ in range(40):
            status, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
            assert status == 200 and h["x-pd-path"] == "disagg"
            if val(s.dec, "pd_peer_errors_total", peer=str(dead), reason="connect") >= 1:
                break
        assert val(s.dec, "pd_peer_errors_total", peer=str(dead), reason="connect") >= 1
        # a peer that failed to connect is avoided for a while
        for _ in range(4):
            status, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
            assert status == 200 and h["x-pd-path"] == "disagg"
        assert val(s.dec, "pd_peer_errors_total", peer=str(dead), reason="connect") <= 2
    finally:
        await s.stop()


async def test_prefill_timeout_fallback_and_fail_policy():
    s = await stack(p_kw={"prefill_delay": 5}, dec_kw={"prefill_timeout_s": 0.3, "connect_timeout_s": 0.3})
    try:
        status, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 200 and h["x-pd-path"] == "fallback"
        assert val(s.dec, "pd_fallbacks_total", reason="timeout") == 1
        assert "kv_transfer_params" not in s.d_vllm.requests[-1][1]
        assert len(s.p_vllm.requests) == 1  # never retried after the leg was sent
        s.dec.cfg.fallback = "fail"
        status, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 504 and json.loads(data)["error"]["code"] == "prefill_timeout"
    finally:
        await s.stop()


@pytest.mark.parametrize("p_kw,path,status,reason", [
    ({"prefill_status": 500}, "fallback", 200, "http_5xx"),
    ({"no_kv": True}, "fallback", 200, "protocol"),
    ({"prefill_status": 400}, "error", 400, None),  # the client's fault: passed on, no fallback
])
async def test_prefill_failures(p_kw, path, status, reason):
    s = await stack(p_kw=p_kw)
    try:
        st_, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert st_ == status and h["x-pd-path"] == path
        if reason:
            assert val(s.dec, "pd_fallbacks_total", reason=reason) == 1
        else:
            assert json.loads(data)["error"]["message"] == "boom"
            assert not s.d_vllm.requests
    finally:
        await s.stop()


async def test_prefill_auth(st):
    url = st.pre.url + "/v1/completions"
    body = {"model": "m", "prompt": "x", "kv_transfer_params": {"do_remote_decode": True}}
    me = f"127.0.0.1:{st.dec.port}"

    raw = json.dumps(body).encode()

    def signed(peer=me, token=TOKEN, rid="r1", path="/v1/completions", now=None, data=raw):
        return {"x-request-id": rid, **auth.sign(token, peer, rid, path, data, now=now)}

    cases = [
        (signed(), 200, None),
        ({"x-request-id": "r1"}, 401, "missing"),
        (signed(token="another-token-0123456789"), 401, "bad_signature"),
        (signed(now=time.time() - 3600), 401, "stale"),
        (signed(data=b'{"model":"m","prompt":"other"}'), 401, "body_mismatch"),  # signature bound to the body
        ({**signed(), auth.NONCE_HEADER: "n" * 32}, 401, "bad_signature"),  # ... and to the nonce
        ({**signed(), auth.TS_HEADER: "12ab"}, 401, "malformed"),
        ({**signed(), "x-request-id": "r2"}, 401, "bad_signature"),  # signature bound to the request id
        (signed(peer=f"127.0.0.1:{st.dec.port + 1}"), 403, "peer_not_allowed"),  # same host, other port
        (signed(peer=f"[::1]:{st.dec.port}"), 403, "peer_not_allowed"),
    ]
    for headers, status, reason in cases:
        s, h, data = await post(url, raw, headers)
        assert s == status, (headers, data)
        if reason:
            assert json.loads(data)["error"]["code"] == reason and h["x-pd-error"] == reason
            assert val(st.pre, "pd_auth_failures_total", reason=reason) >= 1
    # allowlisted host:port but the connection comes from another address
    st.pre.role.allow.entries.append(Endpoint("10.1.2.3", 8000))
    s, _, data = await post(url, raw, signed(peer="10.1.2.3:8000"))
    assert s == 403 and json.loads(data)["error"]["code"] == "source_mismatch"


async def test_prefill_replay_refused(st):
    """B1: the same signed headers work once, with exactly the body they were signed for."""
    url = st.pre.url + "/v1/completions"
    me = f"127.0.0.1:{st.dec.port}"
    raw = json.dumps({"model": "m", "prompt": "x", "kv_transfer_params": {"do_remote_decode": True}}).encode()
    h = {"x-request-id": "rp1", **auth.sign(TOKEN, me, "rp1", "/v1/completions", raw)}
    s, _, _ = await post(url, raw, h)
    assert s == 200
    n = len(st.p_vllm.requests)
    s, hh, data = await post(url, raw, h)  # same headers, same body
    assert s == 401 and json.loads(data)["error"]["code"] == "replayed" and hh["x-pd-error"] == "replayed"
    s, _, data = await post(url, b'{"model":"m","prompt":"evil"}', h)  # same headers, another body
    assert s == 401 and json.loads(data)["error"]["code"] in ("replayed", "body_mismatch")
    assert len(st.p_vllm.requests) == n, "a replayed leg reached vLLM"
    assert val(st.pre, "pd_auth_failures_total", reason="replayed") >= 1
    # the release endpoint is protected the same way
    rel = json.dumps({"releases": []}).encode()
    hr = {"x-request-id": "b9", **auth.sign(TOKEN, me, "b9", "/pd/v1/release", rel)}
    assert (await post(st.pre.url + "/pd/v1/release", rel, hr))[0] == 200
    assert (await post(st.pre.url + "/pd/v1/release", rel, hr))[0] == 401
    # a full replay cache refuses (503, retryable on another peer) rather than grow
    st.pre.role.nonces.max_entries = len(st.pre.role.nonces)
    h = {"x-request-id": "rp2", **auth.sign(TOKEN, me, "rp2", "/v1/completions", raw)}
    s, hh, data = await post(url, raw, h)
    assert s == 503 and json.loads(data)["error"]["code"] == "replay_cache_full" and hh["x-pd-error"] == "overloaded"


def test_nonce_cache_bounded_and_expiring():
    c = auth.NonceCache(max_entries=3, skew_s=120)
    now = 1_000_000.0
    assert c.check_and_add("a", now, now) == "ok"
    assert c.check_and_add("a", now, now) == "replay"
    assert c.check_and_add("b", now - 100, now) == "ok"
    assert c.check_and_add("c", now, now) == "ok"
    assert c.check_and_add("d", now, now) == "full" and len(c) == 3
    # "b" (signed 100 s ago) is kept until its timestamp is stale (ts + skew), then evicted
    assert c.seen("b", now + 20) and not c.seen("b", now + 22)
    assert c.check_and_add("d", now, now + 22) == "ok"
    assert c.seen("a", now + 120) and len(c) == 3
    assert c.expire(now + 200) == 3 and len(c) == 0


@pytest.mark.parametrize("hdrs", [
    {auth.PEER_HEADER: "0", auth.TS_HEADER: "0", auth.NONCE_HEADER: "0", auth.BODY_HEADER: "0",
     auth.SIG_HEADER: "0", "x-request-id": "\udc80"},
    {auth.PEER_HEADER: "127.0.0.1:1\udcff", auth.TS_HEADER: "0", auth.NONCE_HEADER: "0", auth.BODY_HEADER: "0",
     auth.SIG_HEADER: "0", "x-request-id": "r"},
])
def test_verify_non_ascii_is_malformed(hdrs):
    """B4: surrogate-escaped (non-UTF-8) header bytes never reach str.encode()."""
    assert auth.verify(TOKEN, hdrs, hdrs["x-request-id"], "/v1/completions") == "malformed"


async def test_pending_kv_release_stats_and_expiry(st):
    # a leg handed out by another (allowlisted) peer stays pending; only that peer can release it
    me = f"127.0.0.1:{st.dec.port}"
    rid = "leg-1"
    s, _, _ = await post(st.pre.url + "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 1,
                                                          "kv_transfer_params": {"do_remote_decode": True}},
                         {"x-request-id": rid, **auth.sign(TOKEN, me, rid, "/v1/completions", json.dumps(
                             {"model": "m", "prompt": "x", "max_tokens": 1,
                              "kv_transfer_params": {"do_remote_decode": True}}).encode())})
    assert s == 200
    async with aiohttp.ClientSession() as c:
        async with c.get(st.pre.url + "/pd/v1/stats") as r:
            stats = await r.json()
    assert stats["role"] == "prefill" and stats["pending"]["requests"] == 1
    assert stats["peers"][me] == {"requests": 1, "tokens": 7, "blocks": 3, "bytes": 0,
                                  "oldest_age_s": stats["peers"][me]["oldest_age_s"]}
    async with aiohttp.ClientSession() as c:
        async with c.get(st.pre.url + "/metrics") as r:
            text = await r.text()
    assert f'pd_pending_kv_blocks{{peer="{me}"}} 3.0' in text
    # release needs the signature
    s, _, _ = await post(st.pre.url + "/pd/v1/release", {"releases": [{"id": rid, "status": "picked_up"}]},
                         {"x-request-id": "b1"})
    assert s == 401 and st.pre.role.pending.items
    s, _, data = await post(st.pre.url + "/pd/v1/release", {"releases": [{"id": rid, "status": "picked_up"}]},
                            {"x-request-id": "b1", **auth.sign(TOKEN, me, "b1", "/pd/v1/release", json.dumps(
                                {"releases": [{"id": rid, "status": "picked_up"}]}).encode())})
    assert s == 200 and json.loads(data) == {"released": 1} and not st.pre.role.pending.items
    # expiry
    from proxy.pending import Pending
    st.pre.role.pending.add("old", Pending(me, 1, 1, 0, time.monotonic() - 1000))
    assert st.pre.role.pending.expire() == 1


async def test_decode_stats_and_peer_selection():
    s = await stack()
    try:
        other = Endpoint("127.0.0.2", 1)
        s.dec.role.peers.targets.append(other)
        await s.dec.role.peers.refresh()
        s.dec.role.peers.peers[other].outstanding_tokens = 10 ** 6  # heavily loaded: never picked
        for _ in range(5):
            status, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
            assert h["x-pd-path"] == "disagg"
        async with aiohttp.ClientSession() as c:
            async with c.get(s.dec.url + "/pd/v1/stats") as r:
                stats = await r.json()
        assert stats["role"] == "decode" and set(stats["peers"]) == {f"127.0.0.1:{s.pre.port}", "127.0.0.2:1"}
        # the peer's own stats inform the choice
        await s.dec.role.watcher.poll_stats(Endpoint("127.0.0.1", s.pre.port))
        assert s.dec.role.peers.peers[Endpoint("127.0.0.1", s.pre.port)].last_stats > 0
    finally:
        await s.stop()


async def test_drain_finishes_in_flight_and_refuses_new():
    s = await stack(d_kw={"chunks": 10, "delay": 0.1}, dec_kw={"drain_grace_s": 10})
    try:
        async with aiohttp.ClientSession() as c:
            async def long():
                async with c.post(s.dec.url + "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
                    return r.status, await r.read()
            t = asyncio.create_task(long())
            while s.dec.in_flight == 0:
                await asyncio.sleep(0.01)
            d = asyncio.create_task(s.dec.drain())
            await asyncio.sleep(0.05)
            async with c.get(s.dec.url + "/ready") as r:
                assert r.status == 503
            async with c.post(s.dec.url + "/v1/completions", json={"model": "m", "prompt": "x"}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert (await r.json())["error"]["code"] == "draining"
            status, data = await t
            assert status == 200 and data.count(b"data: ") == 11
            assert await d is True
    finally:
        await s.stop()


async def test_limits_and_errors():
    s = await stack(dec_kw={"max_body_bytes": 1024, "max_header_bytes": 2048, "max_in_flight": 1},
                    d_kw={"chunks": 5, "delay": 0.1})
    try:
        status, _, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x" * 5000})
        assert status == 413 and json.loads(data)["error"]["code"] == "body_too_large"
        status, _, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"}, {"x-big": "y" * 4000})
        assert 400 <= status < 500
        status, _, data = await post(s.dec.url + "/v1/nope", {"model": "m"})
        assert status == 404 and json.loads(data)["error"]
        async with aiohttp.ClientSession() as c:
            async with c.get(s.dec.url + "/v1/completions") as r:
                assert r.status == 405 and (await r.json())["error"]
            async with c.post(s.dec.url + "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r1:
                status, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
                assert status == 503 and json.loads(data)["error"]["code"] == "overloaded"
                await r1.read()
            async with c.get(s.dec.url + "/v1/models") as r:
                assert (await r.json())["data"][0]["id"] == "m"
            async with c.get(s.dec.url + "/health") as r:
                assert r.status == 200
    finally:
        await s.stop()


async def test_local_vllm_down_is_502_not_hang():
    s = await stack(dec_kw={"vllm_url": f"http://127.0.0.1:{free_port()}"})
    try:
        status, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 502 and json.loads(data)["error"]["code"] == "upstream_unavailable"
        async with aiohttp.ClientSession() as c:
            async with c.get(s.dec.url + "/ready") as r:
                assert r.status == 503
        await asyncio.sleep(0.1)
        assert not s.pre.role.pending.items
    finally:
        await s.stop()


async def test_transfer_metrics_and_metrics_port():
    mport = free_port()
    s = await stack(d_kw={"decode_kv": {"pd_transfer": {"bytes": 2_000_000, "ms": 1.0, "blocks": 4,
                                                        "backend": "nixl", "error": ""}}},
                    dec_kw={"metrics_port": mport})
    try:
        await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert val(s.dec, "pd_kv_transfer_bytes_sum") == 2_000_000
        assert val(s.dec, "pd_kv_transfer_seconds_sum") == 0.001
        assert val(s.dec, "pd_kv_transfer_bytes_per_second_count") == 1
        async with aiohttp.ClientSession() as c:
            async with c.get(f"http://127.0.0.1:{mport}/metrics") as r:
                text = await r.text()
        assert 'pd_requests_total{api="completions",path="disagg",role="decode"} 1.0' in text
        assert "pd_ttft_seconds_bucket" in text and "pd_sidecar_overhead_seconds" in text
    finally:
        await s.stop()


async def test_conditional_estimators():
    s = await stack(dec_kw={"local_threshold_tokens": 10})
    try:
        _, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "short"})
        assert h["x-pd-path"] == "local"
        _, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "word " * 100})
        assert h["x-pd-path"] == "disagg"
        _, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "word " * 100, "n": 2})
        assert h["x-pd-path"] == "local"
        assert val(s.dec, "pd_local_decisions_total", reason="unsupported") == 1
        # the router's header overrides the sidecar's own threshold
        _, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "short"},
                             {"x-prefiller-host-port": f"127.0.0.1:{s.pre.port}"})
        assert h["x-pd-path"] == "disagg"
        s.dec.cfg.token_estimator = "tokenize"
        _, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "a " * 20})
        assert h["x-pd-path"] == "disagg"
        _, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "a b c"})
        assert h["x-pd-path"] == "local"
    finally:
        await s.stop()


async def test_push_mode_hook():
    s = await stack(dec_kw={"transfer_mode": "push", "push_target": Endpoint("127.0.0.1", 5999)},
                    p_kw={"prefill_delay": 0.3})
    try:
        status, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 200 and h["x-pd-path"] == "disagg"
        (_, db, _), = s.d_vllm.requests
        kv = db["kv_transfer_params"]
        assert kv["transfer_mode"] == "push" and kv["do_remote_prefill"] is True
        await asyncio.sleep(0.5)
        (_, pb, _), = s.p_vllm.requests
        assert pb["kv_transfer_params"]["remote_request_id"] == kv["remote_request_id"]
        assert pb["kv_transfer_params"]["push_target"] == "127.0.0.1:5999"
    finally:
        await s.stop()


async def test_push_mode_data_parallel_decode_pins_a_rank():
    """Several --push-target values = one per decode DP rank: each request's decode leg
    carries X-data-parallel-rank r and its prefill leg names rank r's control plane."""
    targets = [Endpoint("127.0.0.1", 6000), Endpoint("127.0.0.1", 6001)]
    # decode legs stream for ~0.3 s, so every prefill leg is sent before its request ends
    s = await stack(dec_kw={"transfer_mode": "push", "push_target": targets}, d_kw={"delay": 0.1})
    try:
        for _ in range(4):
            status, _, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x", "stream": True},
                                      {"X-data-parallel-rank": "7"})  # a client's value is dropped
            assert status == 200
        await asyncio.sleep(0.3)
        by_id = {pb["kv_transfer_params"]["remote_request_id"]: pb["kv_transfer_params"]["push_target"]
                 for _, pb, _ in s.p_vllm.requests}
        ranks = []
        for _, db, dh in s.d_vllm.requests:
            r = int(dh["X-data-parallel-rank"])
            ranks.append(r)
            assert by_id[db["kv_transfer_params"]["remote_request_id"]] == str(targets[r])
        assert sorted(ranks) == [0, 0, 1, 1]
    finally:
        await s.stop()


async def test_push_mode_single_target_sends_no_rank_header():
    s = await stack(dec_kw={"transfer_mode": "push", "push_target": [Endpoint("127.0.0.1", 6000)]})
    try:
        status, _, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 200
        (_, _, dh), = s.d_vllm.requests
        assert "X-data-parallel-rank" not in dh
    finally:
        await s.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_decode_leg_kv_load_failure_recomputes_locally(stream):
    s = await stack(d_kw={"kv_load_fails": True})
    try:
        status, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x", "stream": stream})
        assert status == 200 and h["x-pd-path"] == "fallback"
        assert val(s.dec, "pd_fallbacks_total", reason="kv_load") == 1
        assert "kv_transfer_params" not in s.d_vllm.requests[-1][1] and len(s.d_vllm.requests) == 2
        await asyncio.sleep(0.1)
        assert not s.pre.role.pending.items and s.dec.in_flight == 0
        s.dec.cfg.fallback = "fail"
        status, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x", "stream": stream})
        assert status == 500 and json.loads(data)["error"]["message"] == "KV load failed"
    finally:
        await s.stop()


@pytest.mark.parametrize("raw", [
    b'{"model":"m","prompt":' + b"[" * 100000 + b"]" * 100000 + b"}",  # RecursionError (B2)
    b'{"model":"m","prompt":"\xff\xfe"}',  # UnicodeDecodeError
    b'{"model":',  # ValueError
])
def test_parse_request_bad_json_is_400(raw):
    from proxy.body import parse_request
    from proxy.errors import RequestError
    with pytest.raises(RequestError) as ei:
        parse_request("completions", raw)
    assert ei.value.status == 400 and ei.value.code == "invalid_json"


@pytest.mark.parametrize("role", ["decode", "prefill"])
async def test_client_body_timeout_408(role):
    """A client that sends headers and then stalls its body gets 408 after
    --client-body-timeout and does not keep its in-flight slot until the total timeout."""
    s = await stack(pre_kw={"client_body_timeout_s": 0.3}, dec_kw={"client_body_timeout_s": 0.3})
    sc = s.dec if role == "decode" else s.pre
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        rid = "slow-1"
        extra = ""
        if role == "prefill":
            full = b'{"model":"m","prompt":"x"}' + b" " * 74
            extra = "".join(f"{k}: {v}\r\n" for k, v in {"x-request-id": rid, **auth.sign(
                TOKEN, f"127.0.0.1:{s.dec.port}", rid, "/v1/completions", full)}.items())
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n{extra}\r\n".encode() + b'{"model":"m",')
        await writer.drain()
        head = await asyncio.wait_for(reader.read(65536), 30)  # bound only: hang detection
        assert head.startswith(b"HTTP/1.1 408"), head[:200]
        assert b"client_body_timeout" in head
        assert sc.in_flight == 0
        writer.close()
        assert val(sc, "pd_rejected_requests_total", reason="client_body_timeout") == 1
    finally:
        await s.stop()


class _FlakySession:
    """Wraps the decode sidecar's pooled session to its local vLLM: the first `fails`
    POSTs fail to connect (nothing sent), like a connect timeout under CPU starvation (O1)."""

    def __init__(self, inner, fails: int):
        self.inner, self.fails, self.calls = inner, fails, 0

    @property
    def closed(self):
        return self.inner.closed

    def post(self, *a, **kw):
        self.calls += 1
        if self.fails > 0:
            self.fails -= 1

            async def boom():
                raise aiohttp.ConnectionTimeoutError("Connection timeout to host")
            return boom()
        return self.inner.post(*a, **kw)

    def get(self, *a, **kw):
        return self.inner.get(*a, **kw)

    async def close(self):
        await self.inner.close()


@pytest.mark.parametrize("fails,policy,status,path,kv_sent", [
    (1, "fallback", 200, "disagg", True),    # retried once, the KV is still used
    (2, "fallback", 200, "fallback", False),  # retried, then recomputed locally
    (3, "fallback", 502, "fallback", None),   # the local vLLM stays unreachable
    (2, "fail", 502, "disagg", None),          # --fallback fail: no recompute
])
async def test_decode_leg_connect_retry_and_fallback(fails, policy, status, path, kv_sent):
    s = await stack(dec_kw={"fallback": policy})
    try:
        flaky = _FlakySession(s.dec.upstreams.get(s.d_vllm.url), fails)
        s.dec.upstreams._sessions[s.d_vllm.url] = flaky
        st_, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert st_ == status and h["x-pd-path"] == path, (st_, h, data)
        assert val(s.dec, "pd_upstream_errors_total", reason="connect_retry") == 1
        if status == 502:
            assert json.loads(data)["error"]["code"] == "upstream_unavailable"
            assert not s.d_vllm.requests
        else:
            (_, db, _), = s.d_vllm.requests
            assert ("kv_transfer_params" in db) is kv_sent
        if path == "fallback":
            assert val(s.dec, "pd_fallbacks_total", reason="decode_connect") == 1
        # the prefill sidecar hears about the KV either way (picked up or released)
        for _ in range(100):
            if not s.pre.role.pending.items:
                break
            await asyncio.sleep(0.02)
        assert not s.pre.role.pending.items and s.dec.in_flight == 0
        assert s.dec.role.stats()["pending"]["requests"] == 0
    finally:
        await s.stop()


async def test_upstream_cookies_never_replayed():
    """A cookie one upstream answer sets must not ride along on the next client's request."""
    seen: list[str | None] = []

    async def gen(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.json_response({"id": "d", "choices": [{"index": 0, "text": "x"}]})
        resp.set_cookie("session", f"user-{len(seen)}")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", gen)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    # a host name (as in Kubernetes): aiohttp's default jar ignores cookies from bare IPs only
    dec = await Sidecar(cfg("decode", vllm_url=f"http://localhost:{port}")).start()
    try:
        for _ in range(3):
            status, _, _ = await post(dec.url + "/v1/completions", {"model": "m", "prompt": "hi"})
            assert status == 200
        assert seen == [None, None, None]
    finally:
        await dec.stop()
        await runner.cleanup()
