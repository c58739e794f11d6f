"""`--first-token-from-prefill` edge cases without engines: the connector's continuation
rule, the sidecar's eligibility, bodies and stream conversion, and fake-server cases
beside the real-engine test (tests/test_first_token_engines.py)."""

from __future__ import annotations

import json

import aiohttp

import pytest
from aiohttp import web

from proxy.first_token import (FirstToken, StreamFormat, continuation_body, first_token, limit_of,
                               skip_reason)
from proxy.tokens import prompt_digest
from test_proxy_unit import FakeVllm, post, settle, stack, val
from transfer.connector.metadata import parse_remote_params, plan_block_read, remote_prompt_tokens
from transfer.errors import FailureReason, ParamsError

BS = 16


def params(**kw):
    p = {"do_remote_prefill": True, "remote_block_ids": [[5, 6, 7]], "remote_engine_id": "e",
         "remote_request_id": "r", "remote_host": "127.0.0.1", "remote_port": 5600, "remote_num_tokens": 40,
         "pd_protocol_version": 2}
    p.update(kw)
    return p


# ------------------------------------------------------------------ connector


def test_continuation_reads_only_the_remote_prompt():
    src = parse_remote_params(params(pd_extra_tokens=1))
    assert src.extra_tokens == 1
    # 40 remote tokens = 2 full blocks + 8; the decode prompt has 41; 3 blocks read
    assert plan_block_read(src, 41, BS, [11, 12, 13], 0) == ([11, 12, 13], [5, 6, 7])
    # block-aligned remote prompt (48 = 3 blocks): the extra token starts a 4th, not read
    src = parse_remote_params(params(pd_extra_tokens=1, remote_num_tokens=48))
    assert plan_block_read(src, 49, BS, [11, 12, 13], 1) == ([12, 13], [6, 7])


@pytest.mark.parametrize("extra,ntok", [(None, 41), (1, 40), (1, 42), (2, 41)])
def test_continuation_other_lengths_refused(extra, ntok):
    src = parse_remote_params(params(**({} if extra is None else {"pd_extra_tokens": extra})))
    with pytest.raises(ParamsError) as e:
        plan_block_read(src, ntok, BS, [11, 12, 13], 0)
    assert e.value.reason == FailureReason.MISMATCH


@pytest.mark.parametrize("bad", [0, 17, -1, True, "1", 1.0])
def test_bad_extra_tokens(bad):
    with pytest.raises(ParamsError) as e:
        parse_remote_params(params(pd_extra_tokens=bad))
    assert e.value.reason == FailureReason.BAD_PARAMS
    assert remote_prompt_tokens({"pd_extra_tokens": bad}, 41) == 41  # claims all, refused at planning


def test_prompt_digest_checked_against_the_decode_prompt():
    from types import SimpleNamespace

    from transfer.connector.metadata import check_prompt_digest, prompt_digest, prompt_fields
    prefill = SimpleNamespace(prompt_token_ids=[3, 4, 5], output_token_ids=[9])
    f = prompt_fields(prefill, 3)
    assert f == {"pd_prompt_sha256": prompt_digest([3, 4, 5]), "pd_next_token_id": 9}
    assert prompt_fields(prefill, 4) == {}  # the KV covers something else than the prompt
    check_prompt_digest(f, [3, 4, 5], 3)
    check_prompt_digest(f, [3, 4, 5, 9], 3)  # a continuation: prompt + the first token
    check_prompt_digest({}, [1], 3)  # no digest (stock params, older prefill): nothing to check
    for ids, n in (([3, 4, 6], 3), ([3, 4], 3), (None, 3), ([4, 3, 5, 9], 3)):
        with pytest.raises(ParamsError) as e:
            check_prompt_digest(f, ids, n)
        assert e.value.reason == FailureReason.MISMATCH
    with pytest.raises(ParamsError):
        check_prompt_digest({"pd_prompt_sha256": 5}, [3, 4, 5], 3)


def test_remote_prompt_tokens():
    assert remote_prompt_tokens({"pd_extra_tokens": 1}, 41) == 40
    assert remote_prompt_tokens({}, 41) == 41
    assert remote_prompt_tokens({"pd_extra_tokens": 1}, 1) == 1


# ------------------------------------------------------------------ eligibility and bodies

BASE = {"model": "m", "prompt": "hi", "stream": True, "max_tokens": 8, "temperature": 0}


@pytest.mark.parametrize("extra,reason", [
    ({}, None),
    ({"stream_options": {"include_usage": True}, "seed": 3, "min_tokens": 2}, None),
    ({"logprobs": 2}, "request"),
    ({"stop": ["."]}, "request"),
    ({"stop_token_ids": [3]}, "request"),
    ({"echo": True}, "request"),
    ({"n": 2}, "request"),
    ({"best_of": 2}, "request"),
    ({"presence_penalty": 0.5}, "request"),
    ({"seed": 3, "temperature": 0.7}, "request"),
    ({"response_format": {"type": "json_object"}}, "request"),
    ({"guided_json": {}}, "request"),
    ({"suffix": "x"}, "request"),
    ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "request"),
    ({"max_tokens": 0}, "request"),
])
def test_skip_reason_completions(extra, reason):
    assert skip_reason("completions", {**BASE, **extra}) == reason


def test_skip_reason_chat():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert skip_reason("chat", chat) == "no_max_tokens"
    assert skip_reason("chat", {**chat, "max_completion_tokens": 5}) is None
    assert skip_reason("chat", {**chat, "max_tokens": 5, "tools": [{}]}) == "request"
    assert skip_reason("chat", {**chat, "max_tokens": 5, "top_logprobs": 2, "logprobs": True}) == "request"
    assert skip_reason("chat", {**chat, "max_tokens": 5, "add_generation_prompt": False}) == "request"
    assert limit_of("chat", {**chat, "max_tokens": 5, "max_completion_tokens": 3}) == 3
    assert limit_of("completions", {"prompt": "x"}) == 16  # vLLM's completions default


def answer(text="Hi", fr="length", **kw):
    a = {"id": "p", "created": 1700, "model": "m", "usage": {"prompt_tokens": 7, "completion_tokens": 1},
         "choices": [{"index": 0, "text": text, "finish_reason": fr}]}
    a.update(kw)
    return a


KV = {"pd_next_token_id": 42}


def test_first_token_from_answer():
    f = first_token("completions", answer(), 8, KV)
    assert isinstance(f, FirstToken) and (f.token_id, f.text, f.finish_reason) == (42, "Hi", None)
    assert first_token("completions", answer(), 1, KV).finish_reason == "length"
    assert first_token("completions", answer(text="", fr="stop"), 8, KV).finish_reason == "stop"
    assert first_token("completions", answer(text="\ufffd"), 8, KV) == "partial_char"
    assert first_token("completions", answer(), 8, {}) == "no_token_ids"  # not PdConnector's params
    assert first_token("completions", answer(), 8, {"pd_next_token_id": -1}) == "no_token_ids"
    assert first_token("completions", answer(), 8, {"pd_next_token_id": True}) == "no_token_ids"
    chat = answer()
    chat["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}
    assert first_token("chat", chat, 8, KV) == "answer"
    chat["choices"][0]["message"] = {"role": "assistant", "content": "Yo"}
    assert first_token("chat", chat, 8, KV).text == "Yo"


def test_prompt_digest_is_the_connectors():
    """The sidecar's digest of its own tokenization and PdConnector's pd_prompt_sha256 of
    the prefill's tokens: one contract on both sides of the seam."""
    from proxy.tokens import prompt_digest as sidecar_digest
    from transfer.connector.metadata import prompt_digest as connector_digest
    for ids in ([1], [0, 5, 128000, 7], list(range(8064))):
        assert sidecar_digest(ids) == connector_digest(ids)
    assert sidecar_digest([1, 2]) != sidecar_digest([2, 1]) and sidecar_digest([12]) != sidecar_digest([1, 2])


def test_continuation_body():
    f = first_token("completions", answer(), 8, KV)
    body = {**BASE, "min_tokens": 3, "top_k": 5, "stream_options": {"include_usage": True}}
    b = continuation_body("completions", body, [1, 2, 3], f, {"remote_request_id": "r"})
    assert b["prompt"] == [1, 2, 3, 42] and b["max_tokens"] == 7 and b["min_tokens"] == 2
    assert b["top_k"] == 5 and b["temperature"] == 0 and b["stream"] is True
    assert b["kv_transfer_params"] == {"remote_request_id": "r", "pd_extra_tokens": 1}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_completion_tokens": 4}
    b = continuation_body("chat", chat, [1], f, None)
    assert "messages" not in b and "kv_transfer_params" not in b and b["max_tokens"] == 3
    assert continuation_body("completions", {"model": "m", "prompt": "x"}, [1], f, None)["max_tokens"] == 15


def events(raw: bytes) -> list:
    return [ln[6:].decode() if ln[6:] == b"[DONE]" else json.loads(ln[6:])
            for ln in raw.split(b"\n") if ln.startswith(b"data: ")]


def test_stream_format_chat():
    f = first_token("completions", answer(), 8, KV)
    fmt = StreamFormat("chat", "rid", f, include_usage=True)
    ev = events(fmt.opening())
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert ev[1]["choices"][0]["delta"] == {"content": "Hi"} and ev[1]["object"] == "chat.completion.chunk"
    assert fmt.convert(b'{"id":"cmpl-x","created":5,"model":"z","choices":[{"index":0,"text":""}]}') == b""
    out = events(fmt.convert(b'{"id":"cmpl-x","created":5,"choices":[{"index":0,"text":"!",'
                             b'"finish_reason":"length","stop_reason":null}]}'))[0]
    assert (out["id"], out["created"], out["model"]) == ("chatcmpl-rid", 1700, "m")
    assert out["choices"][0]["finish_reason"] == "length" and out["choices"][0]["delta"] == {"content": "!"}
    u = events(fmt.convert(b'{"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":6,"total_tokens":14}}'))[0]
    assert u["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14} and u["choices"] == []
    assert fmt.convert(b"[DONE]") == b"data: [DONE]\n\n"


def test_stream_format_prefill_only():
    f = first_token("completions", answer(fr="stop", text=""), 8, KV)
    fmt = StreamFormat("completions", "rid", f, include_usage=True)
    ev = events(fmt.opening() + fmt.prefill_only_end())
    assert ev[0]["choices"][0]["finish_reason"] == "stop"
    assert ev[1]["usage"] == {"prompt_tokens": 7, "total_tokens": 8, "completion_tokens": 1}
    assert ev[2] == "[DONE]"


# ------------------------------------------------------------------ fake servers


class FtFake(FakeVllm):
    """A prefill answer with created, model and a finish reason (the first token's id is
    in PdConnector's params: OURS); a decode that can fail with 500."""

    fail_decode = False

    async def gen(self, request: web.Request):
        body = await request.json()
        kv = body.get("kv_transfer_params") or {}
        if kv.get("do_remote_decode"):
            resp = await super().gen(request)
            out = json.loads(resp.body)
            out.update(created=1700, model="m")
            out["choices"][0].update(finish_reason=self.first_finish)
            return web.json_response(out)
        if self.fail_decode and body.get("stream"):
            self.requests.append((request.path, body, request.headers.copy()))
            return web.json_response({"error": {"message": "boom"}}, status=500)
        return await super().gen(request)

    first_finish = "length"


# PdConnector's params of a 3-token prompt [5, 6, 7] (the fakes' tokenization of "a b c")
OURS = {"pd_protocol_version": 2, "transfer_mode": "pull", "remote_num_tokens": 3,
        "pd_prompt_sha256": prompt_digest([5, 6, 7]), "pd_next_token_id": 42}
REQ = {"model": "m", "prompt": "a b c", "stream": True, "max_tokens": 8, "temperature": 0}


async def ft_stack(p_kw=None, d_kw=None, **dec_kw):
    return await stack(p_kw=p_kw, d_kw=d_kw, fake=FtFake, dec_kw={"first_token_from_prefill": "all", **dec_kw})


async def test_fake_served_one_stream():
    s = await ft_stack(p_kw={"prefill_kv_extra": OURS})
    try:
        status, hdrs, raw = await post(s.dec.url + "/v1/completions", REQ, headers={"x-request-id": "r1"})
        ev = events(raw)
        assert status == 200 and [e["choices"][0]["text"] for e in ev[:-1]] == ["x", "t0", "t1", "t2"]
        assert {e["id"] for e in ev[:-1]} == {"cmpl-r1"} and ev[-1] == "[DONE]"
        _, body, _ = s.d_vllm.requests[-1]
        assert body["prompt"] == [5, 6, 7, 42] and body["kv_transfer_params"]["pd_extra_tokens"] == 1
        assert val(s.dec, "pd_first_token_from_prefill_total", api="completions") == 1
        # the prompt's ids come from the local vLLM, not from the prefill answer
        (_, leg, _), = s.p_vllm.requests
        assert "return_token_ids" not in leg
        assert s.d_vllm.tokenized == [{"model": "m", "prompt": "a b c"}]
        assert val(s.dec, "pd_first_token_ids_wait_seconds_count") == 1
    finally:
        await s.stop()


async def test_fake_slow_local_tokenize_holds_the_first_token_and_is_counted():
    """A local /tokenize slower than the prefill leg holds the first token back (its ids
    are needed before the stream starts); the wait is in pd_first_token_ids_wait_seconds."""
    s = await ft_stack(p_kw={"prefill_kv_extra": OURS}, d_kw={"tokenize_delay": 0.5})
    try:
        status, _, raw = await post(s.dec.url + "/v1/completions", REQ)
        assert status == 200 and [e["choices"][0]["text"] for e in events(raw)[:-1]] == ["x", "t0", "t1", "t2"]
        assert val(s.dec, "pd_first_token_ids_wait_seconds_count") == 1
        # /tokenize answered 0.5 s after it started, the fake prefill at once
        assert val(s.dec, "pd_first_token_ids_wait_seconds_sum") >= 0.25
    finally:
        await s.stop()


@pytest.mark.parametrize("kv, fails, reason", [
    ({**OURS, "pd_prompt_sha256": prompt_digest([5, 6, 8])}, False, "tokens"),  # tokenized otherwise
    ({**OURS, "remote_num_tokens": 4}, False, "tokens"),
    ({k: v for k, v in OURS.items() if k != "pd_prompt_sha256"}, False, "tokens"),
    ({k: v for k, v in OURS.items() if k != "pd_next_token_id"}, False, "no_token_ids"),
    (OURS, True, "no_token_ids"),  # the local /tokenize failed
])
async def test_fake_local_tokens_unproven_normal_path(kv, fails, reason):
    s = await ft_stack(p_kw={"prefill_kv_extra": kv}, d_kw={"tokenize_fails": fails})
    try:
        status, _, raw = await post(s.dec.url + "/v1/completions", REQ)
        assert status == 200 and [e["choices"][0]["text"] for e in events(raw)[:-1]] == ["t0", "t1", "t2"]
        assert s.d_vllm.requests[-1][1]["prompt"] == "a b c"  # the client's text, nothing from the answer
        assert val(s.dec, "pd_first_token_skipped_total", reason=reason) == 1
        assert val(s.dec, "pd_first_token_from_prefill_total", api="completions") == 0
    finally:
        await s.stop()


async def test_fake_stock_connector_normal_path():
    s = await ft_stack()  # the fake's params carry no pd_protocol_version: not PdConnector
    try:
        status, _, raw = await post(s.dec.url + "/v1/completions", REQ)
        assert status == 200 and [e["choices"][0]["text"] for e in events(raw)[:-1]] == ["t0", "t1", "t2"]
        # the client's text: a first-token request asks the prefill for no ids (no token reuse)
        assert s.d_vllm.requests[-1][1]["prompt"] == "a b c"
        assert val(s.dec, "pd_first_token_skipped_total", reason="connector") == 1
        assert val(s.dec, "pd_first_token_from_prefill_total", api="completions") == 0
    finally:
        await s.stop()


async def test_fake_no_auth_token_normal_path():
    s = await ft_stack(p_kw={"prefill_kv_extra": OURS}, auth_token=None)
    try:
        await post(s.dec.url + "/v1/completions", REQ)
    finally:
        await s.stop()
    assert val(s.dec, "pd_first_token_skipped_total", reason="no_token_ids") == 1


@pytest.mark.parametrize("reuse", ["all", "off"])
async def test_fake_ids_from_the_prefill_answer(reuse):
    """`--first-token-ids prefill`: the prefill leg asks for the ids, the continuation takes
    them from the signed answer, the local vLLM tokenizes nothing; a request that then takes
    the normal path reuses them only as --reuse-token-ids says."""
    s = await ft_stack(p_kw={"prefill_kv_extra": OURS}, first_token_ids="prefill", reuse_token_ids=reuse)
    try:
        status, _, raw = await post(s.dec.url + "/v1/completions", REQ)
        assert status == 200 and [e["choices"][0]["text"] for e in events(raw)[:-1]] == ["x", "t0", "t1", "t2"]
        assert s.d_vllm.requests[-1][1]["prompt"] == [5, 6, 7, 42]
        assert s.p_vllm.requests[-1][1]["return_token_ids"] is True and not s.d_vllm.tokenized
        assert val(s.dec, "pd_first_token_ids_wait_seconds_count") == 0  # nothing to wait for
        s.p_vllm.prefill_kv_extra = {k: v for k, v in OURS.items() if k != "pd_next_token_id"}
        status, _, raw = await post(s.dec.url + "/v1/completions", REQ)  # normal path: no next token
        assert status == 200 and val(s.dec, "pd_first_token_skipped_total", reason="no_token_ids") == 1
        assert s.d_vllm.requests[-1][1]["prompt"] == ([5, 6, 7] if reuse == "all" else "a b c")
    finally:
        await s.stop()


async def test_fake_no_local_tokenize_decided_before_the_next_prefill_leg():
    """A decode vLLM without /tokenize (404): that request takes the normal path, and the
    next ones are not eligible at all, so their prefill legs ask for token ids again."""
    s = await ft_stack(p_kw={"prefill_kv_extra": OURS}, d_kw={"tokenize_status": 404})
    try:
        for _ in range(2):
            status, _, raw = await post(s.dec.url + "/v1/completions", REQ)
            assert status == 200 and [e["choices"][0]["text"] for e in events(raw)[:-1]] == ["t0", "t1", "t2"]
        assert len(s.d_vllm.tokenized) == 1
        legs = [b for _, b, _ in s.p_vllm.requests]
        assert "return_token_ids" not in legs[0] and legs[1]["return_token_ids"] is True
        assert s.d_vllm.requests[-1][1]["prompt"] == [5, 6, 7]  # token reuse again
        assert val(s.dec, "pd_first_token_skipped_total", reason="no_token_ids") == 2
    finally:
        await s.stop()


async def test_fake_decode_fails_fail_policy_error_event():
    s = await ft_stack(p_kw={"prefill_kv_extra": OURS}, fallback="fail")
    s.d_vllm.fail_decode = True
    try:
        status, _, raw = await post(s.dec.url + "/v1/completions", REQ)
        ev = events(raw)
        assert status == 200 and ev[0]["choices"][0]["text"] == "x"
        assert ev[1]["error"]["code"] == "decode_failed" and ev[2] == "[DONE]" and len(ev) == 3
        assert sum(1 for _, b, _ in s.d_vllm.requests if b.get("stream")) == 1  # no recompute
        assert val(s.dec, "pd_requests_total", role="decode", api="completions", path="error") == 1
    finally:
        await s.stop()


async def test_fake_first_token_stop_ends_without_decode_leg():
    s = await ft_stack(p_kw={"prefill_kv_extra": OURS})
    s.p_vllm.first_finish = "stop"
    try:
        status, _, raw = await post(s.dec.url + "/v1/completions", REQ)
        ev = events(raw)
        assert ev[0]["choices"][0]["finish_reason"] == "stop" and ev[-1] == "[DONE]" and len(ev) == 2
        assert not [b for _, b, _ in s.d_vllm.requests if b.get("stream")]  # only the release pull
    finally:
        await s.stop()


async def test_fake_client_leaves_during_continuation():
    """The client leaves after the first token: the continuation is aborted upstream and
    the prefill result settled once."""
    s = await ft_stack(p_kw={"prefill_kv_extra": OURS}, d_kw={"chunks": 100, "delay": 0.05})
    try:
        async with aiohttp.ClientSession() as c:
            async with c.post(s.dec.url + "/v1/completions", json=REQ) as r:
                assert b'"text":"x"' in await r.content.readuntil(b"\n\n")  # the first token
                await r.content.readuntil(b"\n\n")  # a continuation chunk: the leg is running
                r.close()
        await settle(lambda: s.d_vllm.cancelled)
        assert s.d_vllm.cancelled == ["decode"]
        await settle(lambda: not s.pre.role.pending.items and s.dec.in_flight == 0)
        assert not s.pre.role.pending.items and s.dec.in_flight == 0
    finally:
        await s.stop()
