"""`--first-token-from-prefill` on real vLLM CPU engines (tiny Llama, PdConnector) with
the real `openai` client: streaming completions and chat, greedy, token-identical to
aggregated serving (the prefill engine without kv_transfer_params), usage equal.

A gate (a small HTTP relay in front of the decode engine, `Gate`) records what the decode
sidecar sends to its vLLM and can hold it, fail it or cut its stream: the first chunk is
shown to reach the client while the decode leg is still held (order of events, no
timing). Run under the engines lock:

    flock /tmp/pd-engines.lock python -m pytest tests/test_first_token_engines.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib

import aiohttp
import openai
import pytest
from aiohttp import web

from pdsidecar.dev.engines import pd_pair_configs, vllm_available
from pdsidecar.dev.procs import free_port
from test_proxy_engines import client, engine_metric, metric, pair, prompt, wait_for

pytestmark = [pytest.mark.engines, pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]


@pytest.fixture
def ours_pair(engine_pool, llama_dir):
    from test_connector_engines import ours_config  # the shared "ours-llama" group's config
    return engine_pool.get("ours-llama", lambda: pd_pair_configs(llama_dir, ours_config(),
                                                                 log_dir=engine_pool.log_dir))


class Gate:
    """A relay in front of the decode engine: records each generate request (path, body),
    can hold the next ones until released, answer 500 to the next `fail_next`, or cut a
    stream after `cut_after` chunks; counts /tokenize calls (never held)."""

    def __init__(self, target: str):
        self.target = target
        self.seen: list[tuple[str, dict]] = []
        self.events: list[str] = []
        self.open = asyncio.Event()
        self.open.set()
        self.fail_next = 0
        self.cut_after: int | None = None
        self.tokenized = 0
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession()

    async def stop(self) -> None:
        await self.session.close()
        await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        if request.path == "/tokenize":
            self.tokenized += 1
        elif request.method == "POST":
            self.seen.append((request.path, body))
            self.events.append("decode_leg_arrived")
            await self.open.wait()
            self.events.append("decode_leg_forwarded")
            if self.fail_next:
                self.fail_next -= 1
                return web.json_response({"error": {"message": "injected", "code": 500}}, status=500)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "x-request-id")}
        async with self.session.request(request.method, self.target + request.path_qs, data=raw or None,
                                        headers=headers) as r:
            if r.content_type != "text/event-stream":
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
            out = web.StreamResponse(status=r.status, headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            n = 0
            async for chunk in r.content.iter_any():
                await out.write(chunk)
                n += 1
                if self.cut_after is not None and n >= self.cut_after:
                    self.cut_after = None
                    request.transport.close()  # the decode engine's stream breaks off
                    return out
            await out.write_eof()
            return out


@contextlib.asynccontextmanager
async def gated(prefill_engine, decode_engine, **kw):
    gate = Gate(decode_engine.url)
    await gate.start()
    try:
        async with pair(prefill_engine, gate, **kw) as (pre, dec):
            yield gate, pre, dec
    finally:
        await gate.stop()


async def collect(stream, chat: bool, first: str | None = None) -> dict:
    """Text, usage, finish reason and the ids/created/models seen over a stream."""
    out = {"text": [] if first is None else [first], "usage": None, "finish": None, "ids": set(),
           "created": set(), "models": set(), "roles": []}
    async for ch in stream:
        out["ids"].add(ch.id)
        out["created"].add(ch.created)
        out["models"].add(ch.model)
        if ch.choices:
            c = ch.choices[0]
            if chat:
                out["text"].append(c.delta.content or "")
                if c.delta.role:
                    out["roles"].append(c.delta.role)
            else:
                out["text"].append(c.text)
            out["finish"] = c.finish_reason or out["finish"]
        if ch.usage:
            out["usage"] = ch.usage
    out["text"] = "".join(out["text"])
    return out


def msgs(p: str) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": p}]


async def ask(c: openai.AsyncOpenAI, api: str, model: str, p: str, **kw):
    kw.setdefault("max_tokens", 12)
    if api == "chat":
        return await c.chat.completions.create(model=model, messages=msgs(p), temperature=0, stream=True,
                                               stream_options={"include_usage": True}, **kw)
    return await c.completions.create(model=model, prompt=p, temperature=0, stream=True,
                                      stream_options={"include_usage": True}, **kw)


async def block_aligned_prompt(url: str, model: str, block: int = 128, salt: int = 0) -> str:
    """A prompt whose token count is a whole number of KV blocks (the continuation's
    first token then starts a new block); another `salt`, another prompt."""
    async with aiohttp.ClientSession() as s:
        for n in range(40, 200):
            for seed in range(4):
                p = prompt(n, seed=1000 * n + seed + 10 * salt)
                async with s.post(url + "/tokenize", json={"model": model, "prompt": p}) as r:
                    if (await r.json())["count"] % block == 0:
                        return p
    raise AssertionError("no block-aligned prompt found")


def same(got: dict, want: dict) -> None:
    assert got["text"] == want["text"] and want["text"]
    assert got["finish"] == want["finish"]
    assert got["usage"].prompt_tokens == want["usage"].prompt_tokens
    assert got["usage"].completion_tokens == want["usage"].completion_tokens
    assert got["usage"].total_tokens == want["usage"].total_tokens
    assert len(got["ids"]) == len(got["created"]) == len(got["models"]) == 1  # one coherent stream


@pytest.mark.parametrize("api, ids", [("completions", "local"), ("chat", "local"), ("completions", "prefill")])
async def test_first_token_from_prefill_identical(ours_pair, api, ids):
    prefill_engine, decode_engine = ours_pair
    model = decode_engine.model_name
    agg = client(prefill_engine.url)
    chat = api == "chat"
    # prompts of their own (another case's would be in the decode engine's prefix cache)
    prompts = [prompt(60 + 25 * s, seed=zlib.crc32(f"ft{api}{ids}{s}".encode())) for s in range(3)]
    prompts.append(await block_aligned_prompt(prefill_engine.url, model, salt=ids == "prefill"))
    loads0 = await engine_metric(decode_engine.url, "pd_connector_transfers_total")
    fails0 = await engine_metric(decode_engine.url, "pd_connector_failures_total")
    async with gated(prefill_engine, decode_engine, first_token_from_prefill="all",
                     first_token_ids=ids) as (gate, pre, dec):
        pd = client(dec.url)
        for p in prompts:
            want = await collect(await ask(agg, api, model, p), chat)
            gate.open.clear()  # hold the decode leg: the first chunk must come without it
            gate.events.clear()
            s = await ask(pd, api, model, p)
            it = s.__aiter__()
            first = await asyncio.wait_for(it.__anext__(), 120)  # hang guard only
            gate.events.append("client_first_chunk")
            assert "decode_leg_forwarded" not in gate.events
            gate.open.set()
            head = (first.choices[0].delta.content or "") if chat else first.choices[0].text
            got = await collect(it, chat, head)
            got["ids"].add(first.id)
            got["created"].add(first.created)
            got["models"].add(first.model)
            if chat:
                assert first.choices[0].delta.role == "assistant"
            same(got, want)
            assert gate.events.index("client_first_chunk") < gate.events.index("decode_leg_forwarded")
            path, body = gate.seen[-1]
            # the continuation: prompt ids + first token, one token less, the KV loaded
            assert path == "/v1/completions" and body["max_tokens"] == 11
            assert len(body["prompt"]) == want["usage"].prompt_tokens + 1
            assert body["kv_transfer_params"]["pd_extra_tokens"] == 1
        # the prompt's ids: the decode engine's own tokenization, one call per request (or
        # the prefill answer's)
        assert gate.tokenized == (len(prompts) if ids == "local" else 0)
        assert metric(dec, "pd_first_token_from_prefill_total", api=api) == len(prompts)
        assert metric(dec, "pd_requests_total", role="decode", api=api, path="disagg") == len(prompts)
        assert metric(dec, "pd_fallbacks_total", reason="kv_load") == 0
        await wait_for(lambda: not pre.role.pending.items, 10, "pickup reports")
        assert metric(pre, "pd_kv_released_total", status="picked_up") == len(prompts)
    # the decode engine read the prompt's KV for every continuation, never failed a load
    assert await engine_metric(decode_engine.url, "pd_connector_transfers_total") - loads0 == len(prompts)
    assert await engine_metric(decode_engine.url, "pd_connector_failures_total") == fails0


async def test_first_token_fallbacks(ours_pair):
    """Requests the option cannot serve identically take the normal path (counted); a
    one-token request is finished from the prefill answer alone."""
    prefill_engine, decode_engine = ours_pair
    model = decode_engine.model_name
    agg = client(prefill_engine.url)
    p = prompt(70, seed=7)
    async with gated(prefill_engine, decode_engine, first_token_from_prefill="all") as (gate, pre, dec):
        pd = client(dec.url)
        # logprobs: normal path (the decode leg is the client's own request, KV loaded)
        want = await collect(await ask(agg, "completions", model, p, logprobs=2), False)
        got = await collect(await ask(pd, "completions", model, p, logprobs=2), False)
        same(got, want)
        assert gate.seen[-1][1].get("logprobs") == 2 and "pd_extra_tokens" not in gate.seen[-1][1]["kv_transfer_params"]
        assert metric(dec, "pd_first_token_skipped_total", reason="request") == 1
        # max_tokens=1: the prefill answer is the whole answer; no continuation is sent
        n_before = sum(1 for _, b in gate.seen if b.get("stream"))
        for api, chat in (("completions", False), ("chat", True)):
            want = await collect(await ask(agg, api, model, p, max_tokens=1), chat)
            got = await collect(await ask(pd, api, model, p, max_tokens=1), chat)
            same(got, want)
            assert got["finish"] == "length"
        assert sum(1 for _, b in gate.seen if b.get("stream")) == n_before
        assert metric(dec, "pd_first_token_from_prefill_total", api="completions") == 1
        assert metric(dec, "pd_first_token_from_prefill_total", api="chat") == 1
        await wait_for(lambda: not pre.role.pending.items, 20, "every prefill result settled")


async def test_first_token_decode_failures(ours_pair):
    """After the first token went out: a continuation that fails before output is
    recomputed locally from prompt + first token (identical output, nothing twice); one
    whose stream breaks off ends with an error event."""
    prefill_engine, decode_engine = ours_pair
    model = decode_engine.model_name
    agg = client(prefill_engine.url)
    p = prompt(80, seed=11)
    async with gated(prefill_engine, decode_engine, first_token_from_prefill="all") as (gate, pre, dec):
        pd = client(dec.url)
        for api, chat in (("completions", False), ("chat", True)):
            want = await collect(await ask(agg, api, model, p), chat)
            gate.fail_next = 1
            got = await collect(await ask(pd, api, model, p), chat)
            same(got, want)
            path, body = gate.seen[-1]  # the local recompute: same continuation, no KV params
            assert "kv_transfer_params" not in body and len(body["prompt"]) == want["usage"].prompt_tokens + 1
        assert metric(dec, "pd_fallbacks_total", reason="kv_load") == 2
        assert metric(dec, "pd_requests_total", role="decode", api="chat", path="fallback") == 1
        gate.cut_after = 1
        with pytest.raises(openai.APIError):
            await collect(await ask(pd, "completions", model, p), False)
        assert metric(dec, "pd_upstream_errors_total", reason="stream") == 1
        assert metric(dec, "pd_requests_total", role="decode", api="completions", path="error") == 1
        await wait_for(lambda: not pre.role.pending.items, 20, "every prefill result settled")


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_stock_connector_takes_the_normal_path(stock_pair, api):
    """vLLM's NixlConnector cannot load a prompt shorter than the decode's: with the option
    on, its requests are served the normal way (counted), identical to aggregated."""
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    agg = client(prefill_engine.url)
    chat = api == "chat"
    p = prompt(90, seed=zlib.crc32(f"stock{api}".encode()))
    async with gated(prefill_engine, decode_engine, first_token_from_prefill="all") as (gate, pre, dec):
        want = await collect(await ask(agg, api, model, p), chat)
        got = await collect(await ask(client(dec.url), api, model, p), chat)
        same(got, want)
        path, body = gate.seen[-1]
        assert path.endswith("chat/completions" if chat else "/v1/completions")
        assert "pd_extra_tokens" not in body["kv_transfer_params"] and body["max_tokens"] == 12
        assert metric(dec, "pd_first_token_skipped_total", reason="connector") == 1
        assert metric(dec, "pd_first_token_from_prefill_total", api=api) == 0
        assert metric(dec, "pd_requests_total", role="decode", api=api, path="disagg") == 1
