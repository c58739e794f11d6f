"""A READ that completes after its timeout, between real vLLM engines (issue 16).

The decode engine's connector posts every READ LATE_S late (the test hook
``PDSIDECAR_TEST_READ_DELAY_S``, transfer.late_peer: a peer that answers late) and gives
up on it after TIMEOUT_S. Its cache has room for 7 blocks: A's load takes 4, and B
(sent once A's load timed out) needs 4 for its prompt, 7 by its end. Were A's blocks
handed back to vLLM at the timeout (A recomputed, finished, freed), B would get them and
A's late bytes would land in B's KV while B decodes (checked: B's text then differs
after ~1,700 characters, and the in-flight gauge reads 0); quarantined, they are held
until the READ ended and B waits for them. Both answers equal aggregated serving (the
prefill engine, same weights), and no block stays held on either engine afterwards.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time

import pytest

from pdsidecar.dev.engines import pd_pair_configs
from test_connector_engines import (aggregated, decode, failures, metric, ours_config, prefill,
                                    vocab, wait_metric)

pytestmark = pytest.mark.engines

LATE_S = 2.5
TIMEOUT_S = 0.5
BLOCKS = 8  # 128-token blocks on CPU, one of them vLLM's null block: 7 for A (4) and B (4 + 3)


@pytest.fixture
def late_pair(engine_pool, llama_dir):
    def configs():
        cfgs = pd_pair_configs(llama_dir, ours_config(transfer_mode="pull", transfer_timeout_s=TIMEOUT_S),
                               log_dir=engine_pool.log_dir)
        d = cfgs[1]
        d.env["PDSIDECAR_TEST_READ_DELAY_S"] = str(LATE_S)
        d.max_model_len = 896
        d.extra_args += ["--num-gpu-blocks-override", str(BLOCKS)]
        return cfgs
    return engine_pool.get("ours-llama-late", configs)


B_FIELDS = {"max_tokens": 440, "ignore_eos": True}  # B: 4 blocks of prompt, 7 with its output


def prompts(llama_dir: str, seed: int) -> tuple[list[int], list[int]]:
    """A's prompt (4 blocks) and B's (4 blocks)."""
    rng = random.Random(seed)
    v = vocab(llama_dir)
    return ([rng.randrange(10, v - 1) for _ in range(500)],
            [rng.randrange(10, v - 1) for _ in range(450)])


def wait_for_a_loading(pair) -> None:
    """Until A's blocks are allocated and its (held) READ posted: its load in flight."""
    deadline = time.monotonic() + 30
    while metric(pair[1], "pd_connector_recv_blocks_inflight") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(pair[1], "pd_connector_recv_blocks_inflight") > 0


def serve_b_while_a_is_late(pair, b: list[int], ref_b: str) -> None:
    """B arrives after A's load timed out, while A's READ is still to land."""
    assert metric(pair[1], "pd_connector_recv_blocks_inflight") > 0  # A's blocks held
    assert aggregated(pair[1], b, **B_FIELDS) == ref_b


def assert_nothing_held(pair) -> None:
    for engine, names in ((pair[1], ("pd_connector_recv_blocks_inflight", "vllm:num_requests_running",
                                     "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")),
                          (pair[0], ("pd_connector_blocks_pending_pickup",))):
        for name in names:
            assert wait_metric(engine, name, 0) == 0, name


def test_late_read_never_lands_in_another_requests_blocks(late_pair, llama_dir):
    a, b = prompts(llama_dir, 31)
    ref_a = aggregated(late_pair[0], a)
    ref_b = aggregated(late_pair[0], b, **B_FIELDS)
    timeouts0 = failures(late_pair[1], "timeout")
    params = prefill(late_pair, a)
    out: dict = {}
    t_a = threading.Thread(target=lambda: out.update(a=decode(late_pair, a, params)))
    t0 = time.monotonic()
    t_a.start()
    wait_for_a_loading(late_pair)
    time.sleep(TIMEOUT_S + 0.3)  # A's load timed out; its READ lands ~1.5 s later
    serve_b_while_a_is_late(late_pair, b, ref_b)
    t_a.join(120)
    t_a_done = time.monotonic() - t0
    status_a, r_a = out["a"]
    assert status_a == 200, r_a
    assert r_a["choices"][0]["text"] == ref_a
    assert r_a["kv_transfer_params"]["pd_transfer"]["error"] == "timeout"
    assert failures(late_pair[1], "timeout") == timeouts0 + 1
    assert t_a_done > LATE_S  # A's failed load was reported only once its READ ended
    assert_nothing_held(late_pair)


def test_abort_during_the_read_keeps_its_blocks_until_it_ended(late_pair, llama_dir):
    """The client gives up on A while its READ is in flight: vLLM frees an aborted
    request's blocks only once the connector reports its load over, i.e. after the
    late READ landed; B, which needs them, waits and answers correctly (without the
    quarantine B's text differs after ~1,900 characters). The in-flight gauge counts
    A's blocks until then, and returns to 0 (it used to stay at A's 4 blocks)."""
    a, b = prompts(llama_dir, 32)
    ref_b = aggregated(late_pair[0], b, **B_FIELDS)
    params = prefill(late_pair, a)
    d = late_pair[1]
    conn = http.client.HTTPConnection(d.config.host, d.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": d.model_name, "prompt": a, "max_tokens": 8, "temperature": 0, "kv_transfer_params": params}),
        {"Content-Type": "application/json"})
    wait_for_a_loading(late_pair)
    conn.close()  # the client is gone: vLLM aborts A while its READ is held
    time.sleep(TIMEOUT_S)
    serve_b_while_a_is_late(late_pair, b, ref_b)
    assert_nothing_held(late_pair)
