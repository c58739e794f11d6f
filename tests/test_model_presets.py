"""Real-shaped model presets: the KV geometry of the models they are named after."""

import pytest

from pdsidecar.dev.tiny_models import PRESETS, TinyModelSpec, _build_config

pytest.importorskip("transformers")


@pytest.mark.parametrize("name,layers,kv_heads,arch", [("llama3-8b-shape", 32, 8, "llama"),
                                                      ("llama3-8b-kv", 32, 8, "llama"),
                                                      ("mixtral-small-shape", 16, 8, "mixtral")])
def test_preset_shapes(name, layers, kv_heads, arch):
    spec = TinyModelSpec(**PRESETS[name])
    cfg = _build_config(spec, 2048, bos=1, eos=2)
    assert spec.arch == arch and spec.head_dim == 128
    assert cfg.num_hidden_layers == layers and cfg.num_key_value_heads == kv_heads
    # bf16 KV bytes per token, as the benchmarks state them
    kv = 2 * layers * kv_heads * 128 * 2
    assert kv == {"llama3-8b-shape": 128 * 1024, "llama3-8b-kv": 128 * 1024,
                  "mixtral-small-shape": 64 * 1024}[name]


def test_cli_rejects_unknown_preset(capsys):
    from pdsidecar.cli import main
    assert main(["models", "make", "--preset", "nope", "--out", "/tmp/pd-preset-x"]) == 2
    assert "unknown preset" in capsys.readouterr().err
