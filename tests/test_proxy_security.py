"""Issue 17, proxy side: client, peer and neighbour attacks against REAL sidecars (in
process) whose upstreams are recording fakes; the connector's own defence against
malformed params (scheduler half, no engine). Each test names the attack it refuses."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web

from pdsidecar.config import load_config
from pdsidecar.dev.procs import free_port
from proxy import auth
from proxy.answer import AnswerRejected, check_prefill_kv, host_allowed
from proxy.endpoints import Endpoint
from proxy.pending import Pending, PendingKV
from proxy.server import Sidecar
from test_proxy_unit import TOKEN, FakeVllm, Stack, cfg, post, val

GOOD_KV = {"do_remote_prefill": True, "remote_block_ids": [[1, 2, 3]], "remote_request_id": "abc",
           "remote_engine_id": "eng-p", "remote_host": "127.0.0.1", "remote_port": 5600,
           "pd_control_addr": "127.0.0.1:5600"}


class Fake(FakeVllm):
    """FakeVllm that records the raw bytes it receives and answers prefill legs with
    `answer` (kv_transfer_params), `answer_extra` (top-level keys) and `pad` bytes."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.raw: list[bytes] = []
        self.answer: object = None
        self.answer_extra: dict = {}
        self.pad = 0

    async def gen(self, request: web.Request):
        raw = await request.read()
        self.raw.append(raw)
        try:
            kv = json.loads(raw).get("kv_transfer_params")
        except (ValueError, AttributeError):
            kv = None
        if isinstance(kv, dict) and kv.get("do_remote_decode") and (self.answer is not None or self.pad):
            self.requests.append((request.path, json.loads(raw), request.headers.copy()))
            out = {"id": "p", "choices": [{"index": 0, "text": "x", "prompt_token_ids": [9, 9]}],
                   "usage": {"prompt_tokens": 7}, "kv_transfer_params": self.answer, **self.answer_extra}
            if self.pad:
                out["pad"] = "x" * self.pad
            return web.json_response(out)
        return await super().gen(request)


async def mkstack(pre_kw=None, dec_kw=None, d_kw=None) -> Stack:
    p_vllm, d_vllm = await Fake().start(), await Fake(**(d_kw or {})).start()
    d_port = free_port()
    pre = await Sidecar(cfg("prefill", vllm_url=p_vllm.url, allowed_peers=[Endpoint("127.0.0.1", d_port)],
                            **(pre_kw or {}))).start()
    dkw = dict(port=d_port, vllm_url=d_vllm.url, targets=[Endpoint("127.0.0.1", pre.port)])
    dkw.update(dec_kw or {})
    dec = await Sidecar(cfg("decode", **dkw)).start()
    return Stack(p_vllm, d_vllm, pre, dec)


@pytest.fixture
async def ss():
    s = await mkstack()
    yield s
    await s.stop()


async def text_of(url: str) -> str:
    async with aiohttp.ClientSession() as c:
        async with c.get(url) as r:
            return await r.text()


# --------------------------------------------------------------------------- bodies

HOSTILE_BODIES = {
    "xargs_kv_string": {"vllm_xargs": {"kv_transfer_params": "127.0.0.66:14666", "keep": 1}},
    "xargs_ec_and_report_mode": {"vllm_xargs": {"ec_transfer_params": ["evil"], "kv_cache_report_mode": "full",
                                                "keep": 1}},
    "top_level_ec": {"ec_transfer_params": {"evil": 1}},
    "top_level_kv_null": {"kv_transfer_params": None},
}
DUP_BODIES = {  # raw bytes: the key twice, the last (harmless) one is what json.loads keeps
    "dup_kv_last_null": b'"kv_transfer_params":{"remote_host":"evil"},"kv_transfer_params":null',
    "dup_xargs": b'"vllm_xargs":{"kv_transfer_params":"evil"},"vllm_xargs":{"keep":1}',
    "dup_prompt": b'"prompt":"evil","prompt":"a b"',
}


def _raw_body(case: str, local: bool) -> bytes:
    extra = b',"n":2' if local else b""
    if case in DUP_BODIES:
        head = b'{"model":"m"' + extra + b"," + DUP_BODIES[case]
        return head + (b"" if b'"prompt"' in DUP_BODIES[case] else b',"prompt":"a b"') + b"}"
    body = {"model": "m", "prompt": "a b", **HOSTILE_BODIES[case]}
    if local:
        body["n"] = 2
    return json.dumps(body).encode()


@pytest.mark.parametrize("local", [True, False], ids=["local_raw_path", "disagg"])
@pytest.mark.parametrize("case", [*HOSTILE_BODIES, *DUP_BODIES])
async def test_client_transfer_fields_never_forwarded(ss, case, local):
    """Attack: transfer fields at the top level, inside vllm_xargs, or hidden behind a
    duplicate key; neither vLLM (local path: raw forwarding) nor the prefill leg sees them."""
    status, h, _ = await post(ss.dec.url + "/v1/completions", _raw_body(case, local))
    assert status == 200, h
    assert h["x-pd-path"] == ("local" if local else "disagg")
    sent = ss.d_vllm.raw + ss.p_vllm.raw
    assert sent
    for raw in sent:
        for bad in (b"evil", b"127.0.0.66", b"ec_transfer_params", b"kv_cache_report_mode"):
            assert bad not in raw, (bad, raw)
        pairs = json.loads(raw, object_pairs_hook=lambda p: (len(p) == len(dict(p)) or pytest.fail(f"dup {p}"),
                                                             dict(p))[1])
        assert not isinstance(pairs.get("vllm_xargs"), dict) or "kv_transfer_params" not in pairs["vllm_xargs"]
    db = json.loads(ss.d_vllm.raw[-1])
    if local:
        assert "kv_transfer_params" not in db
    else:
        assert db["kv_transfer_params"]["remote_request_id"] == "abc"  # only the prefill answer's
    if "keep" in _raw_body(case, local).decode():
        assert db["vllm_xargs"] == {"keep": 1}


# --------------------------------------------------------------------------- connector defence

def test_connector_non_dict_params_are_no_remote_kv():
    """Attack: kv_transfer_params a string / list / number (vllm_xargs, or vLLM's port
    reached directly): no exception in the scheduler, counted and dropped."""
    from test_connector_unit import fake_request, sched
    s = sched()
    for i, params in enumerate(("127.0.0.66:14666", ["do_remote_prefill"], 7, 1.5)):
        req = fake_request(f"r{i}", 40, params)
        assert s.get_num_new_matched_tokens(req, 0) == (0, False)
        assert req.kv_transfer_params is None
        s.update_state_after_alloc(req, None, 0)
        assert s.request_finished(req, [1]) == (False, None)
    # never scheduled: request_finished is the first to see the params
    req = fake_request("r-abort", 40, "127.0.0.66:14666")
    assert s.request_finished(req, []) == (False, None)
    assert s.bad_params == 5
    st = s.get_stats()
    assert st.data["failures"] == {"bad_params": 5}


def test_connector_push_target_unicode_digit_does_not_raise():
    """Attack (found reading transfer/connector/metadata.py): push_target "host:²" passed isdigit() and
    made int() raise ValueError inside the prefill engine's scheduler step."""
    from test_connector_unit import fake_request, sched
    s = sched(transfer_mode="push")
    params = {"do_remote_decode": True, "transfer_mode": "push", "remote_request_id": "x",
              "push_target": "127.0.0.1:\u00b2"}
    req = fake_request("p1", 40, params)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert params["do_remote_decode"] is False


def test_connector_expiry_out_of_range_is_bad_params():
    """Attack: remote_blocks_expiry_time 10**400 (OverflowError in float()), NaN, inf."""
    from transfer.connector.metadata import ParamsError, parse_remote_params
    for exp in (10 ** 400, float("nan"), float("inf")):
        with pytest.raises(ParamsError, match="out of range"):
            parse_remote_params({**GOOD_KV, "remote_num_tokens": 3, "remote_blocks_expiry_time": exp})


# --------------------------------------------------------------------------- prefill answers

def test_answer_schema_and_engine_address_rule():
    ok = check_prefill_kv({**GOOD_KV, "prompt_token_ids": [1, 2]}, {"127.0.0.1"})
    assert "prompt_token_ids" not in ok and ok["remote_host"] == "127.0.0.1"
    # vLLM 0.32's stock NixlConnector answer, as it comes (localhost, null expiry)
    stock = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[4, 5]],
             "remote_engine_id": "e1", "remote_request_id": "cmpl-1", "remote_host": "localhost",
             "remote_port": 5600, "tp_size": 1, "dcp_size": 1, "pp_size": 1, "remote_num_tokens": 20,
             "remote_blocks_expiry_time": None, "transfer_mode": "READ"}
    assert check_prefill_kv(stock, {"127.0.0.1"})["remote_engine_id"] == "e1"
    # loopback peer: any loopback address or "localhost" (vLLM's NixlConnector default)
    assert host_allowed("localhost", {"127.0.0.1"}) and host_allowed("::1", {"127.0.0.1"})
    assert not host_allowed("localhost", {"10.1.2.3"}) and not host_allowed("127.0.0.1", {"10.1.2.3"})
    assert host_allowed("10.1.2.3", {"10.1.2.3"}) and host_allowed("::ffff:10.1.2.3", {"10.1.2.3"})
    assert not host_allowed("10.1.2.4", {"10.1.2.3"}) and not host_allowed("10.0.0.0/8", {"10.1.2.3"})
    bad = [{**GOOD_KV, "remote_host": "10.9.9.9"}, {**GOOD_KV, "pd_control_addr": "10.9.9.9:5600"},
           {**GOOD_KV, "pd_control_addr": "127.0.0.1:\u00b2"}, {**GOOD_KV, "do_remote_decode": True},
           {**GOOD_KV, "remote_port": "5600"}, {**GOOD_KV, "remote_block_ids": "all"},
           {**GOOD_KV, "remote_block_ids": [[1, -2]]}, {**GOOD_KV, "do_remote_prefill": "yes"},
           {**GOOD_KV, "remote_blocks_expiry_time": True}, {**GOOD_KV, "remote_host": ""}, [], "x", {}]
    for kv in bad:
        with pytest.raises(AnswerRejected):
            check_prefill_kv(kv, {"127.0.0.1"})


def test_answer_signature_bound_to_nonce_status_and_body():
    body = b'{"kv_transfer_params":{}}'
    h = auth.sign_answer(TOKEN, "n" * 32, "pd-1", 200, body)
    assert auth.verify_answer(TOKEN, h, "n" * 32, "pd-1", 200, body) is None
    assert auth.verify_answer(TOKEN, h, "m" * 32, "pd-1", 200, body) == "bad_signature"  # another leg's nonce
    assert auth.verify_answer(TOKEN, h, "n" * 32, "pd-2", 200, body) == "bad_signature"
    assert auth.verify_answer(TOKEN, h, "n" * 32, "pd-1", 400, body) == "bad_signature"
    assert auth.verify_answer(TOKEN, h, "n" * 32, "pd-1", 200, body + b" ") == "bad_signature"
    assert auth.verify_answer("another-token-0123456789", h, "n" * 32, "pd-1", 200, body) == "bad_signature"
    assert auth.verify_answer(TOKEN, {}, "n" * 32, "pd-1", 200, body) == "missing"
    # a request signature is no answer signature (domain separated)
    req = auth.sign(TOKEN, "127.0.0.1:1", "pd-1", "/v1/completions", body, nonce="n" * 32)
    assert auth.verify_answer(TOKEN, {auth.ANSWER_SIG_HEADER: req[auth.SIG_HEADER], auth.BODY_HEADER:
                                      req[auth.BODY_HEADER]}, "n" * 32, "pd-1", 200, body) == "bad_signature"


@pytest.mark.parametrize("attack", ["foreign_remote_host", "foreign_control_addr", "do_remote_decode",
                                    "not_an_object", "oversized"])
async def test_prefill_answer_rejected_falls_back(attack):
    """Attack: the prefill side (its engine, or anything answering there) names another
    host, asks the decode engine to hold KV, or sends 30 MiB: local fallback, counted."""
    s = await mkstack(dec_kw={"max_prefill_answer_bytes": 64 * 1024})
    try:
        s.p_vllm.answer = {"foreign_remote_host": {**GOOD_KV, "remote_host": "10.9.9.9"},
                           "foreign_control_addr": {**GOOD_KV, "pd_control_addr": "169.254.169.254:80"},
                           "do_remote_decode": {**GOOD_KV, "do_remote_decode": True},
                           "not_an_object": ["remote_host", "10.9.9.9"],
                           "oversized": GOOD_KV}[attack]
        if attack == "oversized":
            s.p_vllm.pad = 30 << 20
        status, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "a b", "max_tokens": 2})
        assert status == 200 and h["x-pd-path"] == "fallback", (status, h, data[:200])
        reason = "protocol" if attack == "not_an_object" else "peer_answer_rejected"
        assert val(s.dec, "pd_fallbacks_total", reason=reason) == 1
        (_, db, _), = [r for r in s.d_vllm.requests]
        assert "kv_transfer_params" not in db
    finally:
        await s.stop()


async def test_unsigned_and_replayed_answers_rejected():
    """Attack: something answering on the peer's address without the key (unsigned,
    forged, or replaying a genuine signed answer captured earlier)."""
    captured: dict = {}
    mode = {"m": "relay"}
    s = await mkstack()
    try:
        async def rogue(request: web.Request):
            raw = await request.read()
            if mode["m"] == "relay":  # pass through, remember the genuine signed answer
                hs = {k: v for k, v in request.headers.items() if k.lower().startswith("x-") or k.lower() == "content-type"}
                async with aiohttp.ClientSession() as c:
                    async with c.post(s.pre.url + request.path, data=raw, headers=hs) as r:
                        captured["body"] = await r.read()
                        captured["headers"] = {k: v for k, v in r.headers.items() if k.lower().startswith("x-pd")}
                        return web.Response(status=r.status, body=captured["body"], content_type="application/json",
                                            headers=captured["headers"])
            body = json.dumps({"choices": [{"index": 0, "text": "x"}], "kv_transfer_params": GOOD_KV}).encode()
            if mode["m"] == "replay":
                return web.Response(body=captured["body"], content_type="application/json",
                                    headers=captured["headers"])
            if mode["m"] == "forged":
                return web.Response(body=body, content_type="application/json", headers=auth.sign_answer(
                    "not-the-token-0123456789", request.headers[auth.NONCE_HEADER], request.headers["x-request-id"],
                    200, body))
            return web.Response(body=body, content_type="application/json")  # unsigned

        app = web.Application()
        app.router.add_post("/v1/completions", rogue)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        s.dec.role.peers.targets[:] = [Endpoint("127.0.0.1", port)]
        s.dec.role.peers.peers.clear()
        await s.dec.role.peers.refresh()
        try:
            body = {"model": "m", "prompt": "a b", "max_tokens": 2}
            status, h, _ = await post(s.dec.url + "/v1/completions", body)
            assert status == 200 and h["x-pd-path"] == "disagg"  # relayed genuine answer: fine
            for i, m in enumerate(("replay", "forged", "unsigned"), 1):
                mode["m"] = m
                status, h, _ = await post(s.dec.url + "/v1/completions", body)
                assert status == 200 and h["x-pd-path"] == "fallback", m
                assert val(s.dec, "pd_fallbacks_total", reason="peer_answer_rejected") == i
        finally:
            await runner.cleanup()
    finally:
        await s.stop()


async def test_prompt_token_ids_only_from_verified_answers():
    """Attack: prompt_token_ids in an answer replace the client's prompt. Without a token
    nothing is verified, so no ids are taken; prompt_token_ids hidden in
    kv_transfer_params (vLLM's chat reuse key) are dropped."""
    s = await mkstack(pre_kw={"auth_token": None, "allow_unauthenticated": True},
                      dec_kw={"auth_token": None})
    try:
        s.p_vllm.answer = {**GOOD_KV, "prompt_token_ids": [6, 6, 6]}
        status, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "a b", "max_tokens": 2})
        assert status == 200 and h["x-pd-path"] == "disagg"
        (_, db, _), = s.d_vllm.requests
        assert db["prompt"] == "a b" and "prompt_token_ids" not in db["kv_transfer_params"]
        (_, pb, _), = s.p_vllm.requests
        assert "return_token_ids" not in pb
    finally:
        await s.stop()
    s = await mkstack()  # signed: ids are reused, but never from inside kv_transfer_params
    try:
        s.p_vllm.answer = {**GOOD_KV, "prompt_token_ids": [6, 6, 6]}
        status, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "a b", "max_tokens": 2})
        assert status == 200 and h["x-pd-path"] == "disagg"
        (_, db, _), = s.d_vllm.requests
        assert db["prompt"] == [9, 9] and "prompt_token_ids" not in db["kv_transfer_params"]
    finally:
        await s.stop()


# --------------------------------------------------------------------------- bounded state

async def test_client_named_peers_not_polled_labelled_or_kept():
    """Attack: under a wildcard allowlist, name a new peer per request
    (x-prefiller-host-port): no per-peer label, no stats polling, state gone after."""
    polls = {"target": 0, "named": 0}
    release = asyncio.Event()

    def app_for(name: str) -> web.Application:
        async def stats(request):
            polls[name] += 1
            return web.json_response({"pending": {"tokens": 0}, "in_flight": 0})

        async def leg(request):
            await release.wait()
            return web.json_response({"error": {"message": "no"}}, status=503)
        app = web.Application()
        app.router.add_get("/pd/v1/stats", stats)
        app.router.add_post("/v1/completions", leg)
        return app

    runners, ports = [], {}
    for name in polls:
        r = web.AppRunner(app_for(name))
        await r.setup()
        ports[name] = free_port()
        await web.TCPSite(r, "127.0.0.1", ports[name]).start()
        runners.append(r)
    d_vllm = await Fake().start()
    dec = await Sidecar(cfg("decode", vllm_url=d_vllm.url, targets=[Endpoint("127.0.0.1", ports["target"])],
                            allowed_peers=[Endpoint("127.0.0.0/8", None)], peer_stats_interval_s=0.05)).start()
    try:
        named = f"127.0.0.1:{ports['named']}"
        t = asyncio.ensure_future(post(dec.url + "/v1/completions", {"model": "m", "prompt": "a b"},
                                       {"x-prefiller-host-port": named}))
        deadline = time.monotonic() + 30
        while polls["target"] < 4 and time.monotonic() < deadline:  # the loop ran while the leg was out
            await asyncio.sleep(0.02)
        assert polls["target"] >= 4
        assert Endpoint("127.0.0.1", ports["named"]) in dec.role.peers.peers  # in flight: tracked
        release.set()
        status, h, _ = await t
        assert status == 200 and h["x-pd-path"] == "fallback"
        # 20 more client-named peers (nothing listens there): all evicted, one "other" label
        for i in range(20):
            status, _, _ = await post(dec.url + "/v1/completions", {"model": "m", "prompt": "a b"},
                                      {"x-prefiller-host-port": f"127.0.0.{2 + i}:{free_port()}"})
            assert status == 200
        assert polls["named"] == 0
        assert set(dec.role.peers.peers) == {Endpoint("127.0.0.1", ports["target"])}
        text = await text_of(dec.url + "/metrics")
        labels = {ln.split('peer="')[1].split('"')[0] for ln in text.splitlines() if 'peer="' in ln}
        assert labels <= {f"127.0.0.1:{ports['target']}", "other"}, labels
    finally:
        await dec.stop()
        await d_vllm.stop()
        for r in runners:
            await r.cleanup()


def test_pending_kv_keyed_by_peer_and_request_id():
    """Attack: a peer reuses another peer's request id to overwrite or release its entry."""
    p = PendingKV()
    p.add("pd-1", Pending("10.0.0.1:8000", 5, 1, 0, time.monotonic()))
    p.add("pd-1", Pending("10.0.0.2:8000", 7, 1, 0, time.monotonic()))
    assert len(p.items) == 2
    assert p.pop("pd-1", "10.0.0.3:8000") is None
    assert p.pop("pd-1", "10.0.0.2:8000").tokens == 7
    assert p.pop("pd-1", "10.0.0.1:8000").tokens == 5


async def test_unauthenticated_prefill_peer_labels_bounded():
    """Attack: --allow-unauthenticated, a new x-pd-peer port per leg (one label each)."""
    p_vllm = await Fake().start()
    pre = await Sidecar(cfg("prefill", vllm_url=p_vllm.url, auth_token=None, allow_unauthenticated=True)).start()
    try:
        for i in range(10):
            body = {"model": "m", "prompt": "x", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
            status, _, _ = await post(pre.url + "/v1/completions", body,
                                      {"x-request-id": f"leg-{i}", auth.PEER_HEADER: f"127.0.0.1:{20000 + i}"})
            assert status == 200
        assert set(pre.role.stats()["peers"]) == {"127.0.0.1:0"}
        text = await text_of(pre.url + "/metrics")
        assert not [ln for ln in text.splitlines() if 'peer="127.0.0.1:2' in ln]
    finally:
        await pre.stop()
        await p_vllm.stop()
    # an unsigned leg keeps its own kv_transfer_params object, loses every other transfer field
    p_vllm = await Fake().start()
    pre = await Sidecar(cfg("prefill", vllm_url=p_vllm.url, auth_token=None, allow_unauthenticated=True)).start()
    try:
        raw = (b'{"model":"m","prompt":"x","kv_transfer_params":{"do_remote_decode":true},'
               b'"vllm_xargs":{"kv_transfer_params":"127.0.0.66:1","keep":1},"ec_transfer_params":{"e":1}}')
        status, _, _ = await post(pre.url + "/v1/completions", raw, {"x-request-id": "leg-s"})
        assert status == 200
        fwd = json.loads(p_vllm.raw[-1])
        assert fwd["kv_transfer_params"] == {"do_remote_decode": True} and fwd["vllm_xargs"] == {"keep": 1}
        assert "ec_transfer_params" not in fwd
        status, _, _ = await post(pre.url + "/v1/completions", b"[1]", {"x-request-id": "leg-t"})
        assert status == 400
    finally:
        await pre.stop()
        await p_vllm.stop()
    # with an allowlist the claimed port is checked even without a token
    p_vllm = await Fake().start()
    pre = await Sidecar(cfg("prefill", vllm_url=p_vllm.url, auth_token=None, allow_unauthenticated=True,
                            allowed_peers=[Endpoint("127.0.0.1", 5555)])).start()
    try:
        body = {"model": "m", "prompt": "x", "max_tokens": 1}
        status, _, _ = await post(pre.url + "/v1/completions", body,
                                  {"x-request-id": "leg-x", auth.PEER_HEADER: "127.0.0.1:6666"})
        assert status == 403 and not p_vllm.raw
        status, _, _ = await post(pre.url + "/v1/completions", body,
                                  {"x-request-id": "leg-y", auth.PEER_HEADER: "127.0.0.1:5555"})
        assert status == 200
    finally:
        await pre.stop()
        await p_vllm.stop()


async def test_prefill_pending_labels_removed_after_release(ss):
    """Labels follow pending KV: a peer whose KV was all picked up has no label values left."""
    def samples(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.startswith("pd_pending_kv_requests{")]
    rid = "leg-lbl"
    me = f"127.0.0.1:{ss.dec.port}"
    body = json.dumps({"model": "m", "prompt": "x", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    status, _, _ = await post(ss.pre.url + "/v1/completions", body,
                              {"x-request-id": rid, **auth.sign(TOKEN, me, rid, "/v1/completions", body.encode())})
    assert status == 200
    assert samples(await text_of(ss.pre.url + "/metrics")) == [f'pd_pending_kv_requests{{peer="{me}"}} 1.0']
    rel = json.dumps({"releases": [{"id": rid, "status": "picked_up"}]})
    status, _, _ = await post(ss.pre.url + "/pd/v1/release", rel,
                              {"x-request-id": "rel-1", **auth.sign(TOKEN, me, "rel-1", "/pd/v1/release", rel.encode())})
    assert status == 200
    assert samples(await text_of(ss.pre.url + "/metrics")) == []


# --------------------------------------------------------------------------- hygiene

async def test_fallback_fail_error_names_no_internal_address():
    dead = free_port()
    s = await mkstack(dec_kw={"fallback": "fail", "targets": [Endpoint("127.0.0.1", dead)], "prefill_retries": 0})
    try:
        status, _, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "a b"})
        assert status == 502, data
        assert b"127.0.0.1" not in data and str(dead).encode() not in data
        assert json.loads(data)["error"]["code"] == "prefill_connect"
    finally:
        await s.stop()


async def test_no_server_version_banner(ss):
    from bench.chaos_hostile import raw_request
    for url in (ss.dec.url + "/health", ss.pre.url + "/health", ss.dec.url + "/nope"):
        async with aiohttp.ClientSession() as c:
            async with c.get(url) as r:
                assert r.headers.get("Server") == "pdsidecar", dict(r.headers)
    # parser-level errors (no handler runs) too
    r = await asyncio.to_thread(raw_request, ss.dec.port, "GET", "/", raw_head=b"GET / HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: -5\r\n\r\n")
    assert r.status == 400 and r.headers.get("server") == "pdsidecar", r.headers


async def test_forward_authorization_flag():
    assert load_config(["--role", "decode", "--forward-authorization"], {})[0].forward_authorization is True
    assert load_config(["--role", "decode"], {"PDSIDECAR_FORWARD_AUTHORIZATION": "true"})[0].forward_authorization
    assert load_config(["--role", "decode"], {})[0].forward_authorization is False
    assert load_config(["--role", "decode", "--max-prefill-answer-bytes", "1000"], {})[0].max_prefill_answer_bytes == 1000
    s = await mkstack(dec_kw={"forward_authorization": True})
    try:
        status, _, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "a b"},
                                  {"authorization": "Bearer k"})
        assert status == 200
        (_, _, ph), = s.p_vllm.requests
        assert ph["authorization"] == "Bearer k"
    finally:
        await s.stop()


async def test_prefill_models_needs_signature(ss):
    async with aiohttp.ClientSession() as c:
        async with c.get(ss.pre.url + "/v1/models") as r:
            assert r.status == 401
        async with c.get(ss.dec.url + "/v1/models") as r:  # the decode role serves clients
            assert r.status == 200
        me = f"127.0.0.1:{ss.dec.port}"
        h = {"x-request-id": "models-1", **auth.sign(TOKEN, me, "models-1", "/v1/models", b"", method="GET")}
        async with c.get(ss.pre.url + "/v1/models", headers=h) as r:
            assert r.status == 200 and (await r.json())["data"][0]["id"] == "m"
        async with c.get(ss.pre.url + "/v1/models", headers=h) as r:  # replay
            assert r.status == 401
