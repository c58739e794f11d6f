"""Tiny model generator: deterministic bytes, and both archs serve in a real vLLM engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdsidecar.dev.engines import Engine, EngineConfig
from pdsidecar.dev.tiny_models import ModelError, folder_digest, make_model


def test_same_seed_same_bytes(tmp_path):
    a = make_model("llama", tmp_path / "a", seed=7)
    b = make_model("llama", tmp_path / "b", seed=7)
    c = make_model("llama", tmp_path / "c", seed=8)
    assert folder_digest(a) == folder_digest(b)
    assert folder_digest(a) != folder_digest(c)


def test_mixtral_config_is_moe(tmp_path):
    cfg = json.loads((make_model("mixtral", tmp_path / "m") / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (8, 2)
    assert cfg["head_dim"] == 64


def test_tokenizer_round_trips_text(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_model("llama", tmp_path / "t")))
    text = "the river and the cache block move north."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                      add_generation_prompt=True)


def test_unknown_arch_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="unknown arch 'gpt'"):
        make_model("gpt", tmp_path / "x")


@pytest.mark.parametrize("argv, message", [
    (["models", "make", "--arch", "gpt", "--out", "{tmp}/x"], "unknown arch"),
    (["models", "make", "--out", "/proc/pdsidecar-cannot-write"], "cannot write"),
])
def test_cli_bad_input_one_line_no_traceback(tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r = subprocess.run([sys.executable, "-m", "pdsidecar", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.engines
@pytest.mark.parametrize("arch_fixture", ["llama_dir", "mixtral_dir"])
def test_both_archs_complete_in_real_vllm(request, engine_pool, arch_fixture):
    from openai import OpenAI

    model = request.getfixturevalue(arch_fixture)
    # Share the started engine with other tests when it is the default llama pair's prefill.
    engine = Engine(EngineConfig(model=model, name=f"agg-{arch_fixture}", cpu_bind="0",
                                 log_dir=engine_pool.log_dir)).start().wait_ready()
    try:
        c = OpenAI(base_url=engine.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r1 = c.completions.create(model=model, prompt="the cache block", max_tokens=8, temperature=0)
        r2 = c.completions.create(model=model, prompt="the cache block", max_tokens=8, temperature=0)
        assert r1.usage.completion_tokens == 8
        assert r1.choices[0].text == r2.choices[0].text and r1.choices[0].text.strip()
    finally:
        engine.stop()
