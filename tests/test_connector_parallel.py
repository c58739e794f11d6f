"""PdConnector with parallel engines on CPU: DP=2 rank addressing and P TP=2 -> D TP=1.

Slow (each pair starts 3 engine cores on 2 cores); run under the engine lock::

    flock /tmp/pdsidecar-engines.lock python -m pytest tests/test_connector_parallel.py -q
"""

from __future__ import annotations

import os
import threading

import pytest

from pdsidecar.dev.engines import EngineConfig

from test_connector_engines import aggregated, decode, make_prompts, ours_config, post, prefill  # noqa: E402

# Three engine cores on two CPUs (several minutes, sensitive to load): opt-in in CI.
pytestmark = [
    pytest.mark.engines,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PDSIDECAR_SLOW") != "1",
                       reason="DP=2 / TP=2 engine pairs: set PDSIDECAR_SLOW=1 (slow on 2 cores)"),
]


def pair(engine_pool, llama_dir, name, p_args, p_bind, d_args=(), d_bind="1"):
    # 3 engine cores on 2 busy CPUs: generous lease/timeout so starvation is not a failure
    cfg = ours_config(kv_lease_s=300, transfer_timeout_s=120, handshake_timeout_s=30)
    return engine_pool.get(name, lambda: [
        EngineConfig(model=llama_dir, name=f"{name}-prefill", kv_transfer_config=cfg,
                     cpu_bind=p_bind, extra_args=list(p_args), log_dir=engine_pool.log_dir),
        EngineConfig(model=llama_dir, name=f"{name}-decode", kv_transfer_config=cfg,
                     cpu_bind=d_bind, extra_args=list(d_args), log_dir=engine_pool.log_dir),
    ])


def test_dp2_prefill_names_its_rank(engine_pool, llama_dir):
    """Each DP rank is its own engine core/KV cache: the prefill response names the rank
    (remote_dp_rank, its own control port and engine id) and decode reads exactly there."""
    eng = pair(engine_pool, llama_dir, "ours-dp2", ["--data-parallel-size", "2"], "0|1")
    try:
        prompts = make_prompts(llama_dir, seed=11)[4:16]
        ref = [aggregated(eng[0], p) for p in prompts]
        params: dict[int, dict] = {}

        def one(i):
            params[i] = prefill(eng, prompts[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        ranks = {p["remote_dp_rank"] for p in params.values()}
        by_rank = {p["remote_dp_rank"]: (p["remote_port"], p["remote_engine_id"])
                   for p in params.values()}
        for r, (port, eid) in by_rank.items():
            assert eid.endswith(f"_dp{r}"), eid
        assert len({port for port, _ in by_rank.values()}) == len(by_rank)
        for i, p in enumerate(prompts):
            status, r = decode(eng, p, params[i])
            assert status == 200, r
            assert r["kv_transfer_params"]["pd_transfer"]["error"] == ""
            assert r["choices"][0]["text"] == ref[i]
        if len(ranks) < 2:
            pytest.skip(f"load balancer used only DP rank(s) {ranks}; addressing of one rank ok")
    finally:
        engine_pool.drop("ours-dp2")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PDSIDECAR_SLOW") != "1",
                    reason="known-failing and slow (waits transfer_timeout_s); set PDSIDECAR_SLOW=1")
@pytest.mark.xfail(reason="needs >= 3 free cores: the TP=2 prefill engine's engine core and two "
                   "TP workers busy-wait while idle and starve the TP=1 decode engine on 2 "
                   "cores; its request reaches the connector only after the prefill lease "
                   "expired (docs/connector.md, Parallelism)", strict=False)
def test_prefill_tp2_decode_tp1(engine_pool, llama_dir):
    eng = pair(engine_pool, llama_dir, "ours-tp2", ["--tensor-parallel-size", "2"], "0|1")
    try:
        prompts = make_prompts(llama_dir, seed=12)[6:12]
        # TP changes reduction order: accept the greedy output of either engine alone
        ref_p = [aggregated(eng[0], p) for p in prompts]
        ref_d = [aggregated(eng[1], p) for p in prompts]
        for i, p in enumerate(prompts):
            params = prefill(eng, p)
            assert params["tp_size"] == 2
            status, r = decode(eng, p, params)
            assert status == 200, r
            pt = r["kv_transfer_params"]["pd_transfer"]
            assert pt["error"] == "", pt
            assert pt["bytes"] > 0
            assert r["choices"][0]["text"] in (ref_p[i], ref_d[i])
    finally:
        engine_pool.drop("ours-tp2")


def _post_rank(engine, body: dict, rank: int) -> tuple[int, dict]:
    """POST a completion pinned to one DP rank (vLLM's X-data-parallel-rank)."""
    return post(engine, body, 120.0, {"X-data-parallel-rank": str(rank)})


def test_push_into_data_parallel_decode(engine_pool, llama_dir):
    """Push mode into a DP=2 decode engine behind one API server: each request's decode
    leg is pinned to a rank and its prefill leg names that rank's control plane (what
    `pdsidecar run --push-target A,B` does), so registration and lookup meet. Both decode
    ranks share core 1: a DP engine's idle ranks keep stepping and would starve the
    prefill engine on core 0."""
    import uuid

    eng = pair(engine_pool, llama_dir, "ours-push-ddp2", [], "0", ["--data-parallel-size", "2"], "1|1")
    try:
        addr = {}
        for r in (0, 1):  # each rank's control plane, read off a 1-token prefill it serves
            status, resp = _post_rank(eng[1], {"prompt": [11, 12, 13], "max_tokens": 1,
                                               "kv_transfer_params": {"do_remote_decode": True}}, r)
            assert status == 200, resp
            assert resp["kv_transfer_params"]["remote_dp_rank"] == r
            addr[r] = resp["kv_transfer_params"]["pd_control_addr"]
        assert addr[0] != addr[1]
        for i, p in enumerate(make_prompts(llama_dir, seed=13)[3:7]):
            rank, push_id = i % 2, "push-" + uuid.uuid4().hex
            ref = aggregated(eng[0], p)
            out: dict = {}
            t = threading.Thread(target=lambda: out.__setitem__("d", _post_rank(
                eng[1], {"prompt": p, "max_tokens": 8, "temperature": 0,
                         "kv_transfer_params": {"do_remote_prefill": True, "transfer_mode": "push",
                                                "remote_request_id": push_id}}, rank)))
            t.start()
            ps, pr = post(eng[0], {"prompt": p, "max_tokens": 1,
                                   "kv_transfer_params": {"do_remote_decode": True, "transfer_mode": "push",
                                                          "remote_request_id": push_id,
                                                          "push_target": addr[rank]}}, 120.0)
            t.join(150)
            assert ps == 200 and pr["kv_transfer_params"]["pd_push"] == "sent", pr
            status, d = out["d"]
            assert status == 200, d
            assert d["choices"][0]["text"] == ref, f"prompt {i} ({len(p)} tokens) differs"
            pt = d["kv_transfer_params"]["pd_transfer"]
            assert pt["error"] == "" and pt["mode"] == "push" and pt["bytes"] > 0, pt
    finally:
        engine_pool.drop("ours-push-ddp2")
