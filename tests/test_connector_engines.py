"""PdConnector on real vLLM engines (tiny Llama and tiny Mixtral, CPU).

Run under the engine lock, e.g.::

    flock /tmp/pdsidecar-engines.lock python -m pytest tests/test_connector_engines.py -q

Engines are shared through the session ``engine_pool``; no timed assertions (waits
for eventual states have generous deadlines and only fail when never reached).
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pdsidecar.dev.engines import pd_pair_configs

pytestmark = pytest.mark.engines


def ours_config(policy: str = "recompute", **extra) -> dict:
    return {"kv_connector": "PdConnector", "kv_connector_module_path": "transfer.connector",
            "kv_role": "kv_both", "kv_load_failure_policy": policy,
            "kv_connector_extra_config": {"control_port": 0, "protocol": "auto",
                                          "transfer_mode": "push",
                                          "allowed_remote_hosts": ["127.0.0.1"], **extra}}


@pytest.fixture
def ours_pair(engine_pool, llama_dir):
    return engine_pool.get("ours-llama", lambda: pd_pair_configs(
        llama_dir, ours_config(), log_dir=engine_pool.log_dir))


@pytest.fixture
def ours_fail_pair(engine_pool, llama_dir):
    return engine_pool.get("ours-llama-fail", lambda: pd_pair_configs(
        llama_dir, ours_config("fail", kv_lease_s=6), log_dir=engine_pool.log_dir))


@pytest.fixture
def ours_mixtral_pair(engine_pool, mixtral_dir):
    return engine_pool.get("ours-mixtral", lambda: pd_pair_configs(
        mixtral_dir, ours_config(), log_dir=engine_pool.log_dir))


# ------------------------------------------------------------------ helpers


def post(engine, body: dict, timeout: float = 120.0, headers: dict | None = None) -> tuple[int, dict]:
    body = {"model": engine.model_name, **body}
    req = urllib.request.Request(engine.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except Exception:
            return e.code, {}


def metric(engine, name: str) -> float:
    text = urllib.request.urlopen(engine.url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def failures(engine, reason: str) -> float:
    """Value of pd_connector_failures_total{reason=...}."""
    text = urllib.request.urlopen(engine.url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pd_connector_failures_total{")
               and f'reason="{reason}"' in line)


def wait_metric(engine, name: str, want: float, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    v = metric(engine, name)
    while v != want and time.monotonic() < deadline:
        time.sleep(0.5)
        v = metric(engine, name)
    return v


def vocab(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def make_prompts(model_dir: str, seed: int) -> list[list[int]]:
    """>= 20 prompts: many blocks (block = 128 tokens on CPU), partial last blocks,
    exact block multiples, shared prefixes, and an exact repeat."""
    rng = random.Random(seed)
    v = vocab(model_dir)
    tok = lambda n: [rng.randrange(10, v - 1) for _ in range(n)]  # noqa: E731
    prompts = [tok(n) for n in (3, 17, 127, 128, 129, 255, 256, 300, 515, 700, 1000, 1502)]
    base = tok(400)
    prompts += [base + tok(n) for n in (1, 20, 128, 150, 333)]
    base2 = tok(256)
    prompts += [base2 + tok(n) for n in (5, 200)]
    prompts += [list(prompts[9]), list(prompts[13])]  # exact repeats: decode prefix hits
    return prompts


def prefill(pair, prompt, **kw) -> dict:
    status, r = post(pair[0], {"prompt": prompt, "max_tokens": 1,
                               "kv_transfer_params": {"do_remote_decode": True}, **kw})
    assert status == 200, r
    assert r["kv_transfer_params"]["do_remote_prefill"] is True
    return r["kv_transfer_params"]


def release(params: dict) -> None:
    """Free a prefill lease without reading it (``release:`` over the control plane)."""
    from pdsidecar.dev.engines import harness_token
    from transfer.connector.control_client import configure_auth, send_release
    configure_auth(harness_token())  # the engines' control-plane token
    send_release(params["remote_host"], params["remote_port"], "test",
                 params["remote_engine_id"], params["remote_request_id"], 5.0)


def decode(pair, prompt, params, max_tokens=8, timeout=120.0) -> tuple[int, dict]:
    return post(pair[1], {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                          "kv_transfer_params": params}, timeout)


def aggregated(engine, prompt, max_tokens=8, **fields) -> str:
    """Greedy text of a plain request (no KV transfer); `fields`: more body fields."""
    status, r = post(engine, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **fields})
    assert status == 200, r
    return r["choices"][0]["text"]


def check_identical(pair, model_dir, seed):
    prompts = make_prompts(model_dir, seed)
    ref = [aggregated(pair[0], p) for p in prompts]
    partial_pulls = 0
    for i, p in enumerate(prompts):
        params = prefill(pair, p)
        nblocks = len(params["remote_block_ids"][0])
        assert nblocks == -(-len(p) // params["remote_block_size"])
        assert params["remote_dp_rank"] == 0 and params["pd_protocol_version"] == 2
        status, r = decode(pair, p, params)
        assert status == 200, r
        assert r["choices"][0]["text"] == ref[i], f"prompt {i} ({len(p)} tokens) differs"
        pt = r["kv_transfer_params"]["pd_transfer"]
        assert pt["error"] == "", pt
        assert pt["bytes"] > 0 and pt["descriptors"] > 0 and pt["backend"] == "nixl"
        if pt["blocks"] < nblocks:
            partial_pulls += 1
        else:  # the prefill side's size hint equals what the decode side read
            assert pt["bytes"] == params["pd_kv_bytes"]
    # shared prefixes and repeats hit the decode prefix cache: only missing blocks pulled
    assert partial_pulls >= 4
    assert wait_metric(pair[0], "pd_connector_blocks_pending_pickup", 0) == 0
    assert metric(pair[1], "pd_connector_bytes_transferred_total") > 0


# ------------------------------------------------------------------ tests


def test_llama_pd_identical_to_aggregated(ours_pair, llama_dir):
    check_identical(ours_pair, llama_dir, seed=1)


def test_concurrent_16_no_blocks_held(ours_pair, llama_dir):
    prompts = make_prompts(llama_dir, seed=2)[:16]
    ref = [aggregated(ours_pair[0], p) for p in prompts]
    out: dict[int, str] = {}
    errors: list[str] = []

    def one(i):
        try:
            params = prefill(ours_pair, prompts[i])
            status, r = decode(ours_pair, prompts[i], params)
            out[i] = r["choices"][0]["text"] if status == 200 else f"HTTP {status} {r}"
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert [out.get(i) for i in range(16)] == ref
    for eng, name in ((ours_pair[0], "pd_connector_blocks_pending_pickup"),
                      (ours_pair[0], "pd_connector_requests_pending_pickup"),
                      (ours_pair[1], "pd_connector_recv_blocks_inflight")):
        assert wait_metric(eng, name, 0) == 0, name
    assert wait_metric(ours_pair[1], "vllm:num_requests_running", 0) == 0


@pytest.mark.parametrize("case", ["bad_types", "unknown_engine", "block_range", "foreign_host",
                                  "expired", "unreachable", "token_mismatch", "other_prompt", "not_a_dict"])
def test_bad_params_recompute(ours_pair, llama_dir, case):
    """Wrong/malicious params: the decode engine recomputes, output unchanged, no crash.
    `other_prompt`: the KV of a prompt of the same length that differs in its first token
    (pd_prompt_sha256 says so; loaded, it would change the output)."""
    prompt = make_prompts(llama_dir, seed=3)[8]
    params = prefill(ours_pair, prompt)
    if case == "other_prompt":
        prompt = [prompt[0] + 1 if prompt[0] < 100 else prompt[0] - 1, *prompt[1:]]
    ref = aggregated(ours_pair[0], prompt)
    good = dict(params)
    reason = {"bad_types": "bad_params", "unknown_engine": "unknown_engine",
              "block_range": "block_range", "foreign_host": "foreign_host",
              "expired": "expired", "unreachable": "unreachable",
              "token_mismatch": "mismatch", "other_prompt": "mismatch", "not_a_dict": None}[case]
    if case == "bad_types":
        params["remote_block_ids"] = "all of them"
    elif case == "unknown_engine":
        params["remote_engine_id"] = "no-such-engine"
    elif case == "block_range":
        params["remote_block_ids"] = [[10_000_000 + i for i in range(len(good["remote_block_ids"][0]))]]
    elif case == "foreign_host":
        params["remote_host"] = "198.51.100.7"
    elif case == "expired":  # a lease the prefill no longer holds: it refuses the read
        release(params)
    elif case == "unreachable":
        params["remote_port"] = 1
    elif case == "token_mismatch":
        params["remote_num_tokens"] = len(prompt) + 3
    elif case == "not_a_dict":
        params = ["do_remote_prefill"]
    status, r = decode(ours_pair, prompt, params)
    if case == "not_a_dict":  # rejected by vLLM's request validation: a clean 4xx
        assert 400 <= status < 500, r
    else:
        assert status == 200, r
        assert r["choices"][0]["text"] == ref
        assert r["kv_transfer_params"]["pd_transfer"]["error"] == reason
        assert metric(ours_pair[1], "pd_connector_failures_total") >= 1
    # the good params still work afterwards if the blocks were not released
    assert ours_pair[0].alive() and ours_pair[1].alive()
    status, r = decode(ours_pair, prompt, prefill(ours_pair, prompt))
    assert status == 200 and r["choices"][0]["text"] == ref


def test_unauthenticated_release_refused_kv_still_read(ours_pair, llama_dir):
    """A ``Notify release`` without the control token is refused and counted; the
    prefill blocks stay, so the decode engine still reads them (issue 17)."""
    import grpc

    from transfer import control_pb2 as pb
    from transfer.control import SERVICE
    prompt = make_prompts(llama_dir, seed=5)[8]
    ref = aggregated(ours_pair[0], prompt)
    params = prefill(ours_pair, prompt)
    msg = f"release:{params['remote_request_id']}".encode()
    req = pb.NotifyRequest(sender="attacker", receiver=params["remote_engine_id"], message=msg)
    ch = grpc.insecure_channel(f"{params['remote_host']}:{params['remote_port']}")
    try:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(SERVICE + "Notify")(req.SerializeToString(), timeout=10)
    finally:
        ch.close()
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status, r = decode(ours_pair, prompt, params)
    assert status == 200, r
    pt = r["kv_transfer_params"]["pd_transfer"]
    assert pt["error"] == "" and pt["bytes"] > 0, pt
    assert r["choices"][0]["text"] == ref
    aggregated(ours_pair[0], prompt[:5], max_tokens=1)  # a step reports the scheduler's stats
    deadline = time.monotonic() + 60
    while metric(ours_pair[0], "pd_connector_control_refused_total") < 1 \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metric(ours_pair[0], "pd_connector_control_refused_total") >= 1, \
        "refused control call not counted"


def test_abort_frees_blocks_on_both_sides(ours_pair, llama_dir):
    prompts = make_prompts(llama_dir, seed=4)[8:14]
    for i, p in enumerate(prompts):
        params = prefill(ours_pair, p)
        # abort the decode request from the client side at staggered points
        try:
            decode(ours_pair, p, params, max_tokens=200, timeout=0.002 * (i + 1) ** 2)
        except Exception:
            pass
    # an aborted prefill (client gone mid-prefill) holds nothing either
    try:
        post(ours_pair[0], {"prompt": prompts[-1] * 2, "max_tokens": 1,
                            "kv_transfer_params": {"do_remote_decode": True}}, timeout=0.005)
    except Exception:
        pass
    assert wait_metric(ours_pair[0], "pd_connector_blocks_pending_pickup", 0) == 0
    assert wait_metric(ours_pair[1], "pd_connector_recv_blocks_inflight", 0) == 0
    assert wait_metric(ours_pair[1], "vllm:num_requests_running", 0) == 0
    assert wait_metric(ours_pair[1], "vllm:num_requests_waiting", 0) == 0
    assert wait_metric(ours_pair[1], "vllm:kv_cache_usage_perc", 0) == 0
    assert wait_metric(ours_pair[0], "vllm:kv_cache_usage_perc", 0) == 0


def test_kill_prefill_then_decode_recomputes(ours_pair, engine_pool, llama_dir):
    prompt = make_prompts(llama_dir, seed=5)[10]
    ref = aggregated(ours_pair[0], prompt)
    params = prefill(ours_pair, prompt)
    ours_pair[0].kill(signal.SIGKILL)
    try:
        status, r = decode(ours_pair, prompt, params)
        assert status == 200, r
        assert r["choices"][0]["text"] == ref
        assert r["kv_transfer_params"]["pd_transfer"]["error"] in (
            "unreachable", "transfer_failed", "timeout")
        assert ours_pair[1].alive()
    finally:
        engine_pool.drop("ours-llama")


def test_fail_policy_gives_clean_error(ours_fail_pair, engine_pool, llama_dir):
    """Pair with kv_load_failure_policy=fail and a 6 s lease."""
    prompts = make_prompts(llama_dir, seed=6)
    prompt = prompts[9]
    bad = dict(prefill(ours_fail_pair, prompt), remote_engine_id="impostor")
    status, r = decode(ours_fail_pair, prompt, bad)
    assert status >= 400 or r["choices"][0]["finish_reason"] == "error", r
    # the engine survives and serves real params
    status, r = decode(ours_fail_pair, prompt, prefill(ours_fail_pair, prompt))
    assert status == 200, r
    assert r["kv_transfer_params"]["pd_transfer"]["error"] == ""
    # unread prefill blocks expire: freed on the prefill side, counted, and a late
    # decode gets a clean error instead of reading reused blocks
    late = prefill(ours_fail_pair, prompts[11])
    assert wait_metric(ours_fail_pair[0], "pd_connector_requests_pending_pickup", 0) == 0
    assert metric(ours_fail_pair[0], "pd_connector_expired_requests_total") >= 1
    assert metric(ours_fail_pair[0], "pd_connector_expired_blocks_total") >= len(
        late["remote_block_ids"][0])
    status, r = decode(ours_fail_pair, prompts[11], late)
    assert status >= 400 or r["choices"][0]["finish_reason"] == "error", r
    assert failures(ours_fail_pair[1], "expired") >= 1
    assert failures(ours_fail_pair[1], "unknown_engine") >= 1
    # prefill engine gone -> clean error, decode engine stays up
    params = prefill(ours_fail_pair, prompts[10])
    ours_fail_pair[0].kill(signal.SIGKILL)
    try:
        status, r = decode(ours_fail_pair, prompts[10], params)
        assert status >= 400 or r["choices"][0]["finish_reason"] == "error", r
        assert ours_fail_pair[1].alive()
        status, r = post(ours_fail_pair[1], {"prompt": [5, 6, 7], "max_tokens": 2})
        assert status == 200
    finally:
        engine_pool.drop("ours-llama-fail")


def test_mixtral_pd_identical_to_aggregated(ours_mixtral_pair, mixtral_dir):
    check_identical(ours_mixtral_pair, mixtral_dir, seed=7)


def test_hostile_params_straight_to_vllm(ours_pair, llama_dir):
    """Issue 17: vLLM's own port reached directly (no sidecar filtering). Malformed
    kv_transfer_params never raise inside a scheduler step: the engines keep serving and
    answer the hostile request itself as a plain (recomputed) request or a vLLM-side error."""
    prefill_engine, decode_engine = ours_pair
    prompt = make_prompts(llama_dir, seed=5)[2]
    ref = aggregated(prefill_engine, prompt)
    base = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    # push_target "host:²": isdigit() but int() raised ValueError in the prefill scheduler
    status, r = post(prefill_engine, {**base, "kv_transfer_params": {
        "do_remote_decode": True, "transfer_mode": "push", "remote_request_id": "evil-push",
        "push_target": "127.0.0.1:\u00b2"}})
    assert status == 200 and r["choices"][0]["text"] == ref, r
    # non-finite expiry: a failed load (bad_params), recomputed
    status, r = post(decode_engine, {**base, "kv_transfer_params": {
        "do_remote_prefill": True, "remote_engine_id": "x", "remote_request_id": "x", "remote_host": "127.0.0.1",
        "remote_port": 1, "remote_block_ids": [[0, 1, 2]], "remote_num_tokens": len(prompt),
        "remote_blocks_expiry_time": float("inf")}})
    assert status == 200 and r["choices"][0]["text"] == ref, r
    # transfer params through vllm_xargs (not a dict: vLLM's schema allows only scalars and lists)
    for xa in ("127.0.0.66:14666", ["do_remote_prefill"], 0, ""):
        status, r = post(decode_engine, {**base, "vllm_xargs": {"kv_transfer_params": xa}})
        assert status == 200 or 400 <= status < 600, (xa, status, r)
        if status == 200:
            assert r["choices"][0]["text"] == ref
    assert prefill_engine.alive() and decode_engine.alive()
    for eng in (prefill_engine, decode_engine):
        assert aggregated(eng, prompt) == ref
