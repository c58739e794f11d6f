"""The sidecar on real vLLM engines (CPU, tiny Llama) with the real `openai` client.

Every P/D answer is compared with aggregated serving (the prefill engine without
kv_transfer_params) under greedy sampling. Run under the engines lock:

    flock /tmp/pdsidecar-engines.lock python -m pytest tests/test_proxy_engines.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import aiohttp
import openai
import pytest
import pytest_asyncio

from pdsidecar.dev.engines import pd_pair_configs, vllm_available
from pdsidecar.dev.procs import free_port
from proxy.config import SidecarConfig
from proxy.endpoints import Endpoint
from proxy.server import Sidecar

pytestmark = [pytest.mark.engines, pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]

TOKEN = "proxy-test-token-0123456789"
REPO = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega cache block token layer expert "
         "router prefill decode transfer memory tensor vector matrix queue stream server client request").split()


def prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def ours_available() -> str | None:
    """None when our connector (transfer.connector.PdConnector) is importable, else why not."""
    if not (REPO / "transfer" / "connector" / "__init__.py").exists():
        return "transfer/connector/ (PdConnector) has not landed yet"
    return None


async def start_pair(prefill_engine, decode_engine, **decode_kw) -> tuple[Sidecar, Sidecar]:
    p_port, d_port = free_port(), free_port()
    pre = Sidecar(SidecarConfig(role="prefill", host="127.0.0.1", port=p_port, vllm_url=prefill_engine.url,
                                auth_token=TOKEN, allowed_peers=[Endpoint("127.0.0.1", d_port)],
                                connect_timeout_s=10, log_format="text"))
    await pre.start()
    kw = dict(role="decode", host="127.0.0.1", port=d_port, vllm_url=decode_engine.url,
              targets=[Endpoint("127.0.0.1", p_port)], auth_token=TOKEN, peer_stats_interval_s=0.5,
              connect_timeout_s=10)
    kw.update(decode_kw)
    dec = Sidecar(SidecarConfig(**kw))
    try:
        await dec.start()
    except BaseException:
        await pre.stop()
        raise
    return pre, dec


@contextlib.asynccontextmanager
async def pair(prefill_engine, decode_engine, **decode_kw):
    pre, dec = await start_pair(prefill_engine, decode_engine, **decode_kw)
    try:
        yield pre, dec
    finally:
        await dec.stop()
        await pre.stop()


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


async def completion_text(c: openai.AsyncOpenAI, model: str, p: str, stream: bool, max_tokens: int = 12,
                          **kw) -> tuple[str, object]:
    if not stream:
        r = await c.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0, **kw)
        return r.choices[0].text, r.usage
    text, usage = [], None
    s = await c.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0, stream=True,
                                   stream_options={"include_usage": True}, **kw)
    async for ch in s:
        if ch.choices:
            text.append(ch.choices[0].text)
        if ch.usage:
            usage = ch.usage
    return "".join(text), usage


async def chat_text(c: openai.AsyncOpenAI, model: str, p: str, stream: bool) -> tuple[str, object]:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": p}]
    if not stream:
        r = await c.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
        return r.choices[0].message.content, r.usage
    text, usage = [], None
    s = await c.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    async for ch in s:
        if ch.choices and ch.choices[0].delta.content:
            text.append(ch.choices[0].delta.content)
        if ch.usage:
            usage = ch.usage
    return "".join(text), usage


def metric(sc: Sidecar, name: str, **labels) -> float:
    """A sample's value from the sidecar's registry (0 when absent)."""
    v = sc.metrics.registry.get_sample_value(name, labels or None)
    return v or 0.0


def _engine_metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def engine_metric(url: str, name: str) -> float:
    """Sum of an engine metric's samples (off the event loop: the sidecars under test share it)."""
    return await asyncio.to_thread(_engine_metric, url, name)


async def _is_zero(url: str, name: str) -> bool:
    return await engine_metric(url, name) == 0


async def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- #
# connectors under test: vLLM's stock NixlConnector, and ours when it lands


@pytest.fixture
def ours_pair(engine_pool, llama_dir):
    why = ours_available()
    if why:
        pytest.skip(why)
    from transfer import connector as _c  # noqa: F401  (import errors surface here)

    # the same config as test_connector_engines' "ours-llama" group (a pool group is
    # reused by name: a different config here would change what those tests run on)
    from test_connector_engines import ours_config
    return engine_pool.get("ours-llama", lambda: pd_pair_configs(llama_dir, ours_config(),
                                                                 log_dir=engine_pool.log_dir))


@pytest.fixture(params=["stock", "ours"])
def engines(request):
    return request.getfixturevalue("stock_pair" if request.param == "stock" else "ours_pair")


# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["nostream", "stream"])
async def test_identical_to_aggregated(engines, api, stream, request):
    prefill_engine, decode_engine = engines
    model = decode_engine.model_name
    agg = client(prefill_engine.url)
    async with pair(prefill_engine, decode_engine) as (pre, dec):
        pd = client(dec.url)
        fn = completion_text if api == "completions" else chat_text
        for seed in range(3):
            p = prompt(60 + 20 * seed, seed=zlib.crc32(f"{api}{stream}{seed}".encode()))
            want, want_usage = await fn(agg, model, p, stream)
            got, got_usage = await fn(pd, model, p, stream)
            assert got == want and want
            assert got_usage.prompt_tokens == want_usage.prompt_tokens
            assert got_usage.completion_tokens == want_usage.completion_tokens
        assert metric(dec, "pd_requests_total", role="decode", api=api, path="disagg") == 3
        assert metric(dec, "pd_requests_total", role="decode", api=api, path="fallback") == 0
        assert metric(pre, "pd_requests_total", role="prefill", api=api, path="disagg") == 3
        assert metric(dec, "pd_ttft_seconds_count", path="disagg") == 3
        assert metric(dec, "pd_prefill_leg_seconds_count") == 3
        # token ids handed to the decode leg (completions: prompt ids; chat: vLLM's reuse key)
        assert metric(dec, "pd_token_id_reuse_total", api=api) == 3
        if request.node.callspec.params["engines"] == "ours" and not stream:
            # our connector reports per-request transfer size/time in the decode response
            assert metric(dec, "pd_kv_transfer_bytes_count") == 3
            assert metric(dec, "pd_kv_transfer_bytes_sum") > 0
        # every handed-out KV was reported picked up
        await wait_for(lambda: not pre.role.pending.items, 10, "pickup reports")
        assert metric(pre, "pd_kv_released_total", status="picked_up") == 3


async def test_headers_and_non_reuse(stock_pair):
    """x-pd-path header, echo (no token reuse: response must still match), raw HTTP usage."""
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    async with pair(prefill_engine, decode_engine) as (pre, dec):
        c = client(dec.url)
        p = prompt(50, 7)
        raw = await c.completions.with_raw_response.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                                           echo=True)
        assert raw.headers["x-pd-path"] == "disagg"
        got = raw.parse()
        want = await client(prefill_engine.url).completions.create(model=model, prompt=p, max_tokens=8,
                                                                   temperature=0, echo=True)
        assert got.choices[0].text == want.choices[0].text
        assert metric(dec, "pd_token_id_reuse_total", api="completions") == 0


async def test_llmd_header_and_allowlist(stock_pair):
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    # no KV_TRANSFER_TARGET: the router names the prefill sidecar; it is allowlisted host AND port
    p_port = free_port()
    async with pair(prefill_engine, decode_engine, targets=[]) as (pre, dec):
        allowed = f"127.0.0.1:{pre.port}"
        dec.role.allow.entries.append(Endpoint("127.0.0.1", pre.port))
        c = client(dec.url)
        p = prompt(40, 11)
        raw = await c.completions.with_raw_response.create(
            model=model, prompt=p, max_tokens=8, temperature=0, extra_headers={"x-prefiller-host-port": allowed})
        assert raw.headers["x-pd-path"] == "disagg"
        want = await client(prefill_engine.url).completions.create(model=model, prompt=p, max_tokens=8,
                                                                   temperature=0)
        assert raw.parse().choices[0].text == want.choices[0].text
        for bad, status in ((f"127.0.0.1:{p_port}", 403), (f"127.0.0.2:{pre.port}", 403),
                            (f"[::1]:{pre.port}", 403), (f"user@127.0.0.1:{pre.port}", 400),
                            (f"127.0.0.1:{pre.port}@evil.example", 400), (f"http://127.0.0.1:{pre.port}", 400),
                            ("127.0.0.1", 400)):
            with pytest.raises(openai.APIStatusError) as ei:
                await c.completions.create(model=model, prompt=p, max_tokens=2,
                                           extra_headers={"x-prefiller-host-port": bad})
            assert ei.value.status_code == status, bad
            err = ei.value.response.json()["error"]
            assert err["message"] and err["type"] and err["code"], err
        # without the header and without targets: served locally, same answer
        raw = await c.completions.with_raw_response.create(model=model, prompt=p, max_tokens=8, temperature=0)
        assert raw.headers["x-pd-path"] == "local"
        assert raw.parse().choices[0].text == want.choices[0].text


async def test_conditional_local(stock_pair):
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    async with pair(prefill_engine, decode_engine, local_threshold_tokens=40) as (pre, dec):
        c = client(dec.url)
        short, long = prompt(5, 1), prompt(200, 2)
        for p, path in ((short, "local"), (long, "disagg")):
            for stream in (False, True):
                raw = await c.completions.with_raw_response.create(model=model, prompt=p, max_tokens=6,
                                                                   temperature=0, stream=stream)
                assert raw.headers["x-pd-path"] == path
                await raw.http_response.aread()
        assert metric(dec, "pd_local_decisions_total", reason="threshold") == 2
        assert metric(dec, "pd_requests_total", role="decode", api="completions", path="local") == 2
        assert metric(dec, "pd_requests_total", role="decode", api="completions", path="disagg") == 2
        assert metric(pre, "pd_requests_total", role="prefill", api="completions", path="disagg") == 2


async def test_tokenize_estimator(stock_pair):
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    async with pair(prefill_engine, decode_engine, local_threshold_tokens=30, token_estimator="tokenize") as (_, dec):
        c = client(dec.url)
        raw = await c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": prompt(4, 3)}], max_tokens=4)
        assert raw.headers["x-pd-path"] == "local"
        raw = await c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": prompt(80, 3)}], max_tokens=4)
        assert raw.headers["x-pd-path"] == "disagg"


async def test_bad_input_real_engines(stock_pair):
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    async with pair(prefill_engine, decode_engine, max_body_bytes=64 * 1024) as (pre, dec):
        async with aiohttp.ClientSession() as s:
            cases = [
                ("/v1/completions", b"{not json", 400),
                ("/v1/completions", b"[1, 2]", 400),
                ("/v1/completions", json.dumps({"prompt": "hi"}).encode(), 400),
                ("/v1/completions", json.dumps({"model": model, "prompt": "hi", "max_tokens": "5"}).encode(), 400),
                ("/v1/completions", json.dumps({"model": model, "prompt": "hi", "stream": "yes"}).encode(), 400),
                ("/v1/completions", json.dumps({"model": model, "prompt": {"a": 1}}).encode(), 400),
                ("/v1/chat/completions", json.dumps({"model": model, "messages": "hi"}).encode(), 400),
                ("/v1/completions", json.dumps({"model": model, "prompt": "x" * 70000}).encode(), 413),
                # vLLM's own validation errors pass through (here from the prefill engine)
                ("/v1/completions", json.dumps({"model": "no-such-model", "prompt": "hi"}).encode(), 404),
                ("/v1/completions", json.dumps({"model": model, "prompt": "hi", "temperature": -3}).encode(), 400),
            ]
            for path, body, status in cases:
                async with s.post(dec.url + path, data=body, headers={"content-type": "application/json"},
                                  timeout=aiohttp.ClientTimeout(total=60)) as r:
                    assert r.status == status, (body[:60], r.status, await r.text())
                    err = (await r.json())["error"]
                    assert err["message"] and err["type"] and "code" in err
            # the prefill sidecar refuses unauthenticated / forged legs
            body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 1,
                               "kv_transfer_params": {"do_remote_decode": True}}).encode()
            for headers, status in (
                ({"x-request-id": "r1"}, 401),
                ({"x-request-id": "r1", "x-pd-peer": f"127.0.0.1:{dec.port}", "x-pd-timestamp": str(int(time.time())),
                  "x-pd-signature": "v1=" + "0" * 64}, 401),
                ({}, 400),
            ):
                async with s.post(pre.url + "/v1/completions", data=body,
                                  headers={"content-type": "application/json", **headers}) as r:
                    assert r.status == status
                    assert (await r.json())["error"]["code"]
        assert await engine_metric(prefill_engine.url, "vllm:num_requests_running") == 0


async def test_disconnect_mid_stream_frees_kv(stock_pair):
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    async with pair(prefill_engine, decode_engine) as (pre, dec):
        async with aiohttp.ClientSession() as s:
            body = {"model": model, "prompt": prompt(300, 5), "max_tokens": 2000, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            async with s.post(dec.url + "/v1/completions", json=body) as r:
                assert r.status == 200 and r.headers["x-pd-path"] == "disagg"
                n = 0
                async for _ in r.content.iter_any():
                    n += 1
                    if n >= 3:
                        break
                assert await engine_metric(decode_engine.url, "vllm:num_requests_running") >= 1
                r.close()
        # the decode engine aborts, the prefill engine holds nothing, the prefill sidecar's pending KV is closed
        await wait_for(lambda: _is_zero(decode_engine.url, "vllm:num_requests_running"), 30, "decode abort")
        await wait_for(lambda: _is_zero(decode_engine.url, "vllm:kv_cache_usage_perc"), 30, "decode KV free")
        await wait_for(lambda: _is_zero(prefill_engine.url, "vllm:kv_cache_usage_perc"), 30,
                       "prefill KV free")
        await wait_for(lambda: not pre.role.pending.items, 10, "pending KV released")
        await wait_for(lambda: dec.in_flight == 0, 10, "decode sidecar idle")
        assert metric(dec, "pd_client_disconnects_total", stage="decode") == 1


async def test_disconnect_during_prefill_aborts_it(stock_pair):
    """The client leaves while the prefill leg runs: the prefill sidecar and engine abort it."""
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    async with pair(prefill_engine, decode_engine) as (pre, dec):
        async with aiohttp.ClientSession() as s:
            body = {"model": model, "prompt": prompt(3000, 9), "max_tokens": 5}
            with contextlib.suppress(asyncio.TimeoutError):
                await s.post(dec.url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.05))
        await wait_for(lambda: dec.in_flight == 0 and pre.in_flight == 0, 30, "both sidecars idle")
        await wait_for(lambda: _is_zero(prefill_engine.url, "vllm:num_requests_running"), 30,
                       "prefill engine idle")
        await wait_for(lambda: _is_zero(prefill_engine.url, "vllm:kv_cache_usage_perc"), 30,
                       "prefill KV free")
        assert metric(dec, "pd_requests_total", role="decode", api="completions", path="disagg") == 0


async def test_drain_on_sigterm_loses_nothing(stock_pair, tmp_path):
    """The decode sidecar as a real process: SIGTERM while streams run; all finish, new ones get 503."""
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    p_port, d_port = free_port(), free_port()
    pre = Sidecar(SidecarConfig(role="prefill", host="127.0.0.1", port=p_port, vllm_url=prefill_engine.url,
                                auth_token=TOKEN, allowed_peers=[Endpoint("127.0.0.1", d_port)]))
    await pre.start()
    env = dict(os.environ, PREFILL_MODE="false", KV_TRANSFER_TARGET=f"127.0.0.1:{p_port}",
               PDSIDECAR_VLLM_URL=decode_engine.url, PDSIDECAR_PORT=str(d_port), PDSIDECAR_HOST="127.0.0.1",
               PDSIDECAR_AUTH_TOKEN=TOKEN, PDSIDECAR_DRAIN_GRACE="60", PDSIDECAR_CONNECT_TIMEOUT="10",
               PYTHONPATH=str(REPO))
    log = open(tmp_path / "decode-sidecar.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pdsidecar.sidecar"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{d_port}"
    try:
        async with aiohttp.ClientSession() as s:
            async def ready():
                try:
                    async with s.get(url + "/ready") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False
            await wait_for(ready, 30, "sidecar ready")
            c = client(url)
            prompts = [prompt(40, 100 + i) for i in range(4)]
            # long enough to be seen in flight and still running at SIGTERM (12-token
            # requests finished before the first metrics poll once engines ran in fp32)
            n = 400
            want = [(await completion_text(client(prefill_engine.url), model, p, False, n,
                                           extra_body={"ignore_eos": True}))[0] for p in prompts]

            async def one(p):
                return (await completion_text(c, model, p, True, n, extra_body={"ignore_eos": True}))[0]

            tasks = [asyncio.create_task(one(p)) for p in prompts]
            async def started():
                return (await engine_metric(decode_engine.url, "vllm:num_requests_running")
                        + await engine_metric(decode_engine.url, "vllm:num_requests_waiting")) >= 1
            await wait_for(started, 60, "requests running")
            proc.send_signal(signal.SIGTERM)

            async def not_ready():
                async with s.get(url + "/ready") as r:
                    return r.status == 503
            # /ready goes false as soon as the process handles the signal (no timing asserted:
            # this machine is shared); new requests then get 503 + Retry-After
            await wait_for(not_ready, 30, "/ready 503")
            async with s.post(url + "/v1/completions", json={"model": model, "prompt": "hi"}) as r:
                assert r.status == 503 and r.headers.get("Retry-After")
                assert (await r.json())["error"]["code"] == "draining"
            got = await asyncio.gather(*tasks)
            assert got == want
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        await pre.stop()
    lines = [json.loads(x) for x in (tmp_path / "decode-sidecar.log").read_text().splitlines() if x.startswith("{")]
    assert any(x.get("msg") == "draining" for x in lines)
    reqs = [x for x in lines if x.get("msg") == "request"]
    assert sum(1 for x in reqs if x.get("pd_path") == "disagg" and x.get("status") == 200) == 4
    # never prompts or tokens in logs
    text = (tmp_path / "decode-sidecar.log").read_text()
    assert not any(p[:30] in text for p in prompts) and TOKEN not in text


async def test_zz_fallback_when_prefill_engine_dies(stock_pair, engine_pool):
    """Kill the prefill engine (the pair is dropped from the pool after): requests are
    recomputed locally with identical output; with --fallback fail they get 502."""
    prefill_engine, decode_engine = stock_pair
    model = decode_engine.model_name
    prompts = [prompt(60, 300 + i) for i in range(2)]
    want = [(await completion_text(client(prefill_engine.url), model, p, False))[0] for p in prompts]
    want_chat = (await chat_text(client(prefill_engine.url), model, prompts[0], True))[0]
    try:
        prefill_engine.kill(signal.SIGKILL)
        await wait_for(lambda: not prefill_engine.alive() or prefill_engine.proc.poll() is not None, 30, "engine dead")
        async with pair(prefill_engine, decode_engine) as (pre, dec):
            c = client(dec.url)
            raw = await c.completions.with_raw_response.create(model=model, prompt=prompts[0], max_tokens=12,
                                                               temperature=0)
            assert raw.headers["x-pd-path"] == "fallback"
            assert raw.parse().choices[0].text == want[0]
            assert (await completion_text(c, model, prompts[1], True))[0] == want[1]
            assert (await chat_text(c, model, prompts[0], True))[0] == want_chat
            assert metric(dec, "pd_requests_total", role="decode", api="completions", path="fallback") == 2
            assert metric(dec, "pd_fallbacks_total", reason="http_5xx") == 3
        async with pair(prefill_engine, decode_engine, fallback="fail") as (pre, dec):
            with pytest.raises(openai.APIStatusError) as ei:
                await client(dec.url).completions.create(model=model, prompt=prompts[0], max_tokens=4)
            assert ei.value.status_code == 502
            assert ei.value.response.headers["x-pd-path"] == "error"
            assert ei.value.response.json()["error"]["code"] == "prefill_http_5xx"
        # the prefill sidecar itself gone (connect error, nothing sent): also falls back
        async with pair(prefill_engine, decode_engine, targets=[Endpoint("127.0.0.1", free_port())]) as (pre, dec):
            raw = await client(dec.url).completions.with_raw_response.create(model=model, prompt=prompts[0],
                                                                            max_tokens=12, temperature=0)
            assert raw.headers["x-pd-path"] == "fallback"
            assert raw.parse().choices[0].text == want[0]
            assert metric(dec, "pd_fallbacks_total", reason="connect") == 1
    finally:
        engine_pool.drop("stock-llama")
