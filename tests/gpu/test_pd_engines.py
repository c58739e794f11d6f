"""GPU-only: PdConnector inside real vLLM GPU engines (two engines on one GPU).

The default attention backend of the GPU (FLASH_ATTN on Hopper), the caches vLLM
hands the connector, the same-host CUDA-IPC path chosen automatically; pull and push
outputs identical to aggregated serving on tiny Llama and Mixtral models made on the
host. Engines start one after the other (vLLM's memory profiling assumes nothing
else allocates on the GPU meanwhile).
"""

from __future__ import annotations

import os
import random

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("vllm")

from pdsidecar.engines import Engine, EngineConfig, start_engines  # noqa: E402
from test_connector_engines import (aggregated, metric, ours_config, post,  # noqa: E402
                                    prefill, vocab, wait_metric)
from test_connector_push import push_pair_request, control_addr  # noqa: E402

pytestmark = pytest.mark.engines
GPU_UTIL = os.environ.get("PDSIDECAR_GPU_UTIL", "0.2")
MAX_LEN = 8192


def gpu_pair(model: str, ktc: dict, log_dir: str) -> list[Engine]:
    return start_engines([EngineConfig(model=model, name=f"gpu-{role}", kv_transfer_config=ktc,
                                       cpu_bind=None, pin_process=False, max_model_len=MAX_LEN,
                                       extra_args=["--gpu-memory-utilization", GPU_UTIL],
                                       log_dir=log_dir, startup_timeout_s=600)
                          for role in ("prefill", "decode")], sequential=True)


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def pair(request, tmp_path_factory):
    model = request.getfixturevalue(f"{request.param}_dir")
    log_dir = str(tmp_path_factory.mktemp(f"gpu-engines-{request.param}"))
    engines = gpu_pair(model, ours_config(), log_dir)
    yield request.param, model, engines
    for e in engines:
        e.stop()


def gpu_prompts(model_dir: str, seed: int) -> list[list[int]]:
    """>= 20 prompts of 16 to 8000 tokens (GPU blocks are 16 tokens): partial and
    exact blocks, shared prefixes (decode prefix hits pull only missing blocks)."""
    rng = random.Random(seed)
    v = vocab(model_dir)
    tok = lambda n: [rng.randrange(10, v - 1) for _ in range(n)]  # noqa: E731
    prompts = [tok(n) for n in (16, 17, 31, 32, 33, 100, 255, 256, 257, 511, 1000, 1500,
                                2048, 3000, 4096, 6000, 8000)]
    base = tok(700)
    prompts += [base + tok(n) for n in (1, 16, 40, 300)]
    prompts += [list(prompts[10]), list(prompts[12])]  # exact repeats
    return prompts


def test_pull_identical_to_aggregated_over_ipc(pair):
    name, model, (p_eng, d_eng) = pair
    prompts = gpu_prompts(model, seed=21)
    ref = [aggregated(p_eng, p) for p in prompts]
    backends, moved = set(), 0
    for i, p in enumerate(prompts):
        params = prefill((p_eng, d_eng), p)
        status, r = post(d_eng, {"prompt": p, "max_tokens": 8, "temperature": 0,
                                 "kv_transfer_params": params}, timeout=300)
        assert status == 200, r
        t = r["kv_transfer_params"]["pd_transfer"]
        assert t["error"] == "", (i, len(p), t)
        assert r["choices"][0]["text"] == ref[i], f"{name}: prompt {i} ({len(p)} tokens) differs"
        backends.add(t["backend"])
        moved += t["bytes"]
    assert backends == {"ipc"}, backends  # same GPU: CUDA IPC chosen automatically
    assert moved > 0
    assert wait_metric(p_eng, "pd_connector_blocks_pending_pickup", 0) == 0
    assert metric(d_eng, "pd_connector_bytes_transferred_total") >= moved


def test_push_identical_to_aggregated_over_ipc(pair):
    name, model, engines = pair
    d_addr = control_addr(engines[1])
    prompts = gpu_prompts(model, seed=22)[:14]
    for p in prompts:
        ref = aggregated(engines[0], p)
        (ds, d), (ps, pr) = push_pair_request(engines, p, d_addr)
        assert ds == 200 and ps == 200, (d, pr)
        t = d["kv_transfer_params"]["pd_transfer"]
        assert t["error"] == "" and t["mode"] == "push", t
        assert d["choices"][0]["text"] == ref, f"{name}: push, {len(p)} tokens differs"
    assert wait_metric(engines[0], "pd_connector_blocks_pending_pickup", 0) == 0


@pytest.mark.parametrize("case", ["unknown_engine", "block_range"])
def test_failed_load_recomputes_identically(pair, case):
    """A load that fails (vLLM 0.26: reported through get_block_ids_with_load_errors)
    is recomputed by the decode engine: same output, the failure counted."""
    name, model, (p_eng, d_eng) = pair
    p = gpu_prompts(model, seed=23)[11]
    ref = aggregated(p_eng, p)
    params = prefill((p_eng, d_eng), p)
    bad = dict(params)
    if case == "unknown_engine":
        bad["remote_engine_id"] = "no-such-engine"
    else:
        bad["remote_block_ids"] = [[10 ** 7 + i for i in range(len(params["remote_block_ids"][0]))]]
    status, r = post(d_eng, {"prompt": p, "max_tokens": 8, "temperature": 0,
                             "kv_transfer_params": bad}, timeout=300)
    assert status == 200, r
    assert r["kv_transfer_params"]["pd_transfer"]["error"] == case
    assert r["choices"][0]["text"] == ref
    from transfer.connector.control_client import send_release
    send_release(params["remote_host"], params["remote_port"], "test",
                 params["remote_engine_id"], params["remote_request_id"], 5.0)
