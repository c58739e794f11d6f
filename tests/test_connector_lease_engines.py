"""The pull lease between real vLLM engines (issue 16).

One P/D pair whose wall clocks disagree by a minute (``PDSIDECAR_TEST_CLOCK_OFFSET_S``:
prefill -30 s, decode +30 s), a 4 s lease and a decode engine that runs one request at
a time, so a request can be made to wait in its queue for longer than the lease.
Outputs are compared with aggregated serving on the prefill engine (same weights).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

import pytest

from pdsidecar.dev.engines import pd_pair_configs
from test_connector_engines import (aggregated, decode, failures, make_prompts, metric,
                                    ours_config, post, prefill, wait_metric)

pytestmark = pytest.mark.engines

LEASE_S = 4.0  # long enough for a loaded CI machine's prefill -> decode hand-off


def skewed_pair_configs(model: str, ktc: dict, log_dir: str, prefill_offset_s: int) -> list:
    """A P/D pair's configs whose connector wall clocks are shifted by
    ``prefill_offset_s`` (prefill) and its negative (decode)."""
    cfgs = pd_pair_configs(model, ktc, log_dir=log_dir)
    cfgs[0].env["PDSIDECAR_TEST_CLOCK_OFFSET_S"] = str(prefill_offset_s)
    cfgs[1].env["PDSIDECAR_TEST_CLOCK_OFFSET_S"] = str(-prefill_offset_s)
    return cfgs


@pytest.fixture
def lease_pair(engine_pool, llama_dir):
    def configs():
        cfgs = skewed_pair_configs(llama_dir, ours_config(kv_lease_s=LEASE_S), engine_pool.log_dir,
                                   prefill_offset_s=-30)
        cfgs[1].extra_args += ["--max-num-seqs", "1"]
        return cfgs
    return engine_pool.get("ours-llama-lease", configs)


def test_clock_offset_serves_no_stale_and_no_false_expiry(lease_pair, llama_dir):
    """60 s between the two wall clocks: every load reads the KV (no `expired`
    recompute), and every answer equals aggregated serving."""
    prompts = make_prompts(llama_dir, seed=21)[:6]
    refused0 = failures(lease_pair[1], "expired")
    for p in prompts:
        ref = aggregated(lease_pair[0], p)
        params = prefill(lease_pair, p)
        assert params["pd_kv_lease_s"] == LEASE_S and params["remote_blocks_expiry_time"] is None
        status, r = decode(lease_pair, p, params)
        assert status == 200, r
        assert r["choices"][0]["text"] == ref
        assert r["kv_transfer_params"]["pd_transfer"]["error"] == "", r["kv_transfer_params"]
    assert failures(lease_pair[1], "expired") == refused0


class Blocker:
    """A long streaming request on the decode engine (it runs one request at a time);
    closing it aborts it and lets the queue move."""

    def __init__(self, engine, prompt: list[int]) -> None:
        body = {"model": engine.model_name, "prompt": prompt, "max_tokens": 3000,
                "ignore_eos": True, "stream": True, "temperature": 0}
        req = urllib.request.Request(engine.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        self.resp = urllib.request.urlopen(req, timeout=120)
        self.resp.readline()  # it runs

    def close(self) -> None:
        self.resp.close()


def test_request_waiting_longer_than_the_lease_keeps_it_by_renewals(lease_pair, llama_dir):
    """The decode request waits in the queue for more than the lease; its renewals keep
    the prefill blocks, so it still reads them (no recompute) and answers correctly."""
    prompt = make_prompts(llama_dir, seed=22)[9]
    ref = aggregated(lease_pair[0], prompt)
    expired0 = metric(lease_pair[0], "pd_connector_expired_requests_total")
    # the blocker runs first, so the decode request follows its prefill at once
    blocker = Blocker(lease_pair[1], [7, 8, 9])
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=decode(lease_pair, prompt, params)))
    try:
        params = prefill(lease_pair, prompt)
        renewed0 = metric(lease_pair[0], "pd_connector_lease_renewals_total")
        t.start()
        # wait (bounded) until the prefill saw renewals for more than one lease: ~lease/6 each
        deadline = time.monotonic() + 60
        while metric(lease_pair[0], "pd_connector_lease_renewals_total") - renewed0 < 8 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metric(lease_pair[0], "pd_connector_lease_renewals_total") - renewed0 >= 8
        assert "r" not in out  # still queued behind the blocker
    finally:
        blocker.close()
        if t.ident is not None:
            t.join(120)
    status, r = out["r"]
    assert status == 200, r
    assert r["choices"][0]["text"] == ref
    assert r["kv_transfer_params"]["pd_transfer"]["error"] == "", r["kv_transfer_params"]
    assert metric(lease_pair[0], "pd_connector_expired_requests_total") == expired0


def test_unrenewed_lease_expires_and_a_late_read_is_refused(lease_pair, llama_dir):
    """Nobody renews: the prefill frees the blocks after the lease (counted); a decode
    that comes later is refused by the prefill (`expired`) and recomputes correctly."""
    prompt = make_prompts(llama_dir, seed=23)[8]
    ref = aggregated(lease_pair[0], prompt)
    expired0 = metric(lease_pair[0], "pd_connector_expired_requests_total")
    params = prefill(lease_pair, prompt)
    deadline = time.monotonic() + 60
    while metric(lease_pair[0], "pd_connector_expired_requests_total") == expired0 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(lease_pair[0], "pd_connector_expired_requests_total") == expired0 + 1
    refused0 = failures(lease_pair[1], "expired")
    status, r = decode(lease_pair, prompt, params)
    assert status == 200, r
    assert r["choices"][0]["text"] == ref
    assert r["kv_transfer_params"]["pd_transfer"]["error"] == "expired"
    assert failures(lease_pair[1], "expired") == refused0 + 1


def test_leases_under_load_expire_exactly_for_the_unread(lease_pair, llama_dir):
    """Six prefills at once while both engines serve a stream of other requests: the
    three read at once (queued behind the load on the one-request decode engine, kept by
    renewals) load their KV; the three read only after their leases ended are refused
    (`expired`) and recompute. Every answer equals aggregated serving, exactly three
    leases expire, and no block stays held on either engine."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = make_prompts(llama_dir, seed=25)[2:8]
    refs = [aggregated(lease_pair[0], p) for p in prompts]
    expired0 = metric(lease_pair[0], "pd_connector_expired_requests_total")
    refused0 = failures(lease_pair[1], "expired")
    stop = threading.Event()

    def load(engine) -> None:
        while not stop.is_set():
            post(engine, {"prompt": prompts[0], "max_tokens": 16, "temperature": 0})

    loaders = [threading.Thread(target=load, args=(e,), daemon=True) for e in lease_pair]
    for t in loaders:
        t.start()
    try:
        with ThreadPoolExecutor(6) as ex:
            params = list(ex.map(lambda p: prefill(lease_pair, p), prompts))
            now = list(ex.map(lambda i: decode(lease_pair, prompts[i], params[i]), range(3)))
        deadline = time.monotonic() + 60
        while metric(lease_pair[0], "pd_connector_expired_requests_total") < expired0 + 3 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        late = [decode(lease_pair, prompts[i], params[i]) for i in range(3, 6)]
    finally:
        stop.set()
        for t in loaders:
            t.join(60)
    for i, (status, r) in enumerate(now + late):
        assert status == 200, r
        assert r["choices"][0]["text"] == refs[i], f"prompt {i} differs"
        assert r["kv_transfer_params"]["pd_transfer"]["error"] == ("" if i < 3 else "expired"), i
    assert metric(lease_pair[0], "pd_connector_expired_requests_total") == expired0 + 3
    assert failures(lease_pair[1], "expired") == refused0 + 3
    assert wait_metric(lease_pair[0], "pd_connector_blocks_pending_pickup", 0) == 0
    for name in ("pd_connector_recv_blocks_inflight", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert wait_metric(lease_pair[1], name, 0) == 0, name


def test_prefill_killed_during_the_load_decode_recomputes_no_leak(lease_pair, engine_pool,
                                                                   llama_dir):
    """The prefill engine stops answering once it handed out its KV and is killed while
    the decode engine is loading (its request waits for the read grant, which never
    comes, or its READ is in flight): the decode recomputes (correct output), stays up
    and holds no blocks afterwards (its own metrics)."""
    prompt = make_prompts(llama_dir, seed=24)[10]
    ref = aggregated(lease_pair[0], prompt)
    params = prefill(lease_pair, prompt)
    lease_pair[0].kill(signal.SIGSTOP)  # frozen: the decode's read request hangs
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=decode(lease_pair, prompt, params)))
    try:
        t.start()
        deadline = time.monotonic() + 60  # bounded wait for the load to be in progress

        def loading() -> bool:
            return metric(lease_pair[1], "pd_connector_recv_blocks_inflight") > 0 or \
                metric(lease_pair[1], "vllm:num_requests_waiting") > 0
        while not loading() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loading()
        lease_pair[0].kill(signal.SIGKILL)
        t.join(120)
        status, r = out["r"]
        assert status == 200, r
        assert r["choices"][0]["text"] == ref
        assert r["kv_transfer_params"]["pd_transfer"]["error"] in (
            "unreachable", "transfer_failed", "timeout")
        assert lease_pair[1].alive()
        for name in ("pd_connector_recv_blocks_inflight", "vllm:num_requests_running",
                     "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            assert wait_metric(lease_pair[1], name, 0) == 0, name
    finally:
        engine_pool.drop("ours-llama-lease")

