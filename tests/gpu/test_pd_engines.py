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

from pdsidecar.dev.engines import Engine, EngineConfig, start_engines  # noqa: E402
from test_connector_engines import (aggregated, metric, ours_config, post,  # noqa: E402
                                    prefill, vocab, wait_metric)
from test_connector_push import push_pair_request, control_addr  # noqa: E402

pytestmark = pytest.mark.engines
GPU_UTIL = os.environ.get("PDSIDECAR_GPU_UTIL", "0.2")
MAX_LEN = 8192
# Greedy steps with logprobs: the P/D answer is compared step by step with aggregated.
LOGPROBS = {"logprobs": 2, "return_tokens_as_token_ids": True}
# bf16 (FLASH_ATTN): the decode engine computes the last prompt token alone over loaded
# KV, aggregated computes it inside the whole prompt; the two kernel shapes round
# differently (measured on CPU: 0.04 - 0.11 nats of logit), and a random-weight model's
# flat logits turn that into argmax flips where its top-2 are closer than this.
TIE_NATS = 0.1
PAIRS = {  # name -> (model fixture, --dtype: None = vLLM's choice, bf16 + FLASH_ATTN here)
    "llama": ("llama_dir", None),
    "mixtral": ("mixtral_dir", None),
    # float32: vLLM picks a non-FLASH_ATTN backend; rounding differences between the two
    # paths are ~1e-5 nats there, so P/D must be byte-identical to aggregated
    "llama-fp32": ("llama_dir", "float32"),
}


def gpu_pair(model: str, ktc: dict, log_dir: str, dtype: str | None = None) -> list[Engine]:
    return start_engines([EngineConfig(model=model, name=f"gpu-{role}", kv_transfer_config=ktc,
                                       cpu_bind=None, pin_process=False, max_model_len=MAX_LEN,
                                       dtype=dtype,
                                       extra_args=["--gpu-memory-utilization", GPU_UTIL],
                                       log_dir=log_dir, startup_timeout_s=600)
                          for role in ("prefill", "decode")], sequential=True)


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request, tmp_path_factory):
    fixture, dtype = PAIRS[request.param]
    model = request.getfixturevalue(fixture)
    log_dir = str(tmp_path_factory.mktemp(f"gpu-engines-{request.param}"))
    engines = gpu_pair(model, ours_config(), log_dir, dtype)
    yield request.param, model, engines
    for e in engines:
        e.stop()


def greedy(engine, prompt: list[int], max_tokens: int = 8) -> dict:
    status, r = post(engine, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                              **LOGPROBS}, timeout=300)
    assert status == 200, r
    return r["choices"][0]


def steps(choice: dict) -> list[tuple[str, dict[str, float]]]:
    lp = choice["logprobs"]
    return list(zip(lp["tokens"], lp["top_logprobs"]))


def compare(name: str, pd: dict, ref: dict, where: str) -> bool:
    """True when the greedy tokens are identical. Otherwise (bf16 only) the first
    different step must be a near-tie of aggregated's top-2 that P/D resolved the other
    way, and every step before it must agree within ``TIE_NATS``; fp32 must be identical."""
    a, b = steps(pd), steps(ref)
    for k, ((ta, topa), (tb, topb)) in enumerate(zip(a, b)):
        if ta == tb:
            assert abs(topa[ta] - topb[tb]) < TIE_NATS, (where, k, topa, topb)
            continue
        ranked = sorted(topb.values(), reverse=True)
        gap = ranked[0] - ranked[1]
        print(f"{where}: diverged at step {k}: aggregated top-2 gap {gap:.4f} nats")
        assert not name.endswith("fp32"), f"{where}: differs at step {k} ({ta} vs {tb})"
        assert ta in topb and gap < TIE_NATS, (where, k, ta, topb, gap)
        return False
    assert len(a) == len(b)
    return True


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
    ref = [greedy(p_eng, p) for p in prompts]
    # vLLM alone, for scale: the same prompts again hit the prefix cache (a few tokens
    # computed over cached KV, as on the decode engine): how many answers change?
    again = sum(steps(greedy(p_eng, p)) == steps(r) for p, r in zip(prompts, ref))
    print(f"{name}: aggregated twice (prefix-cache hit): {again}/{len(prompts)} token-identical")
    backends, moved, same = set(), 0, 0
    for i, p in enumerate(prompts):
        params = prefill((p_eng, d_eng), p)
        status, r = post(d_eng, {"prompt": p, "max_tokens": 8, "temperature": 0, **LOGPROBS,
                                 "kv_transfer_params": params}, timeout=300)
        assert status == 200, r
        t = r["kv_transfer_params"]["pd_transfer"]
        assert t["error"] == "", (i, len(p), t)
        same += compare(name, r["choices"][0], ref[i], f"{name}: prompt {i} ({len(p)} tokens)")
        backends.add(t["backend"])
        moved += t["bytes"]
    print(f"{name}: pull: {same}/{len(prompts)} prompts token-identical to aggregated")
    assert same >= 0.8 * len(prompts), (same, len(prompts))
    assert backends == {"ipc"}, backends  # same GPU: CUDA IPC chosen automatically
    assert moved > 0
    assert wait_metric(p_eng, "pd_connector_blocks_pending_pickup", 0) == 0
    assert metric(d_eng, "pd_connector_bytes_transferred_total") >= moved


def test_push_identical_to_aggregated_over_ipc(pair):
    name, model, engines = pair
    d_addr = control_addr(engines[1])
    prompts = gpu_prompts(model, seed=22)[:14]
    same = 0
    for p in prompts:
        ref = greedy(engines[0], p)
        (ds, d), (ps, pr) = push_pair_request(engines, p, d_addr, extra=LOGPROBS)
        assert ds == 200 and ps == 200, (d, pr)
        t = d["kv_transfer_params"]["pd_transfer"]
        assert t["error"] == "" and t["mode"] == "push", t
        same += compare(name, d["choices"][0], ref, f"{name}: push, {len(p)} tokens")
    print(f"{name}: push: {same}/{len(prompts)} prompts token-identical to aggregated")
    assert same >= 0.8 * len(prompts), (same, len(prompts))
    assert wait_metric(engines[0], "pd_connector_blocks_pending_pickup", 0) == 0


@pytest.mark.parametrize("case", ["unknown_engine", "block_range"])
def test_failed_load_recomputes_identically(pair, case):
    """A load that fails (vLLM 0.26: reported through get_block_ids_with_load_errors)
    is recomputed by the decode engine: same output, the failure counted."""
    name, model, (p_eng, d_eng) = pair
    p = gpu_prompts(model, seed=23)[11]
    ref = aggregated(p_eng, p)  # a recompute is a whole prefill, like aggregated's
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
