"""Deterministic tiny random-weight models that vLLM serves, built offline.

`make_model("llama", out)` writes a Hugging Face model folder (config, safetensors
weights, a BPE tokenizer trained on generated text, a chat template). Same arch and
seed give the same bytes, so tests and benchmarks are reproducible without any hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path

ARCHS = ("llama", "mixtral")
# Bump when the generator's output changes, so cached folders are rebuilt.
GENERATOR_VERSION = 4

# A chat template vLLM's /v1/chat/completions can render without a hub.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

_WORDS = (
    "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega cache block "
    "token layer expert router prefill decode transfer memory tensor vector matrix "
    "queue stream server client request response model engine network socket graph "
    "river mountain forest ocean city garden window bridge music paper story number "
    "red green blue yellow quick slow bright dark small large early late north south "
    "run jump read write send move open close start stop build test measure count"
).split()


class ModelError(Exception):
    """A model cannot be made (bad arch, unwritable folder, missing package)."""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model. head_dim 64 keeps vLLM's CPU attention happy."""

    arch: str = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 2048
    max_position_embeddings: int = 8192
    num_experts: int = 8
    experts_per_token: int = 2
    seed: int = 0
    dtype: str = "bfloat16"
    initializer_range: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Real-shaped presets (random weights; KV cache and compute of the real model): for GPU
# benchmarks. Both fit one 80 GB GPU twice (two engines at --gpu-memory-utilization 0.35).
PRESETS: dict[str, dict] = {
    # Llama-3-8B: 32 layers, 32 heads, 8 KV heads, head dim 128, bf16 (~14 GB of weights)
    "llama3-8b-shape": dict(arch="llama", hidden_size=4096, num_layers=32, num_heads=32,
                            num_kv_heads=8, intermediate_size=14336, initializer_range=0.02),
    # Llama-3-8B's KV cache (32 layers x 8 KV heads x 128, 128 KiB per token) with little
    # compute (hidden 1024, ~0.7 GB of weights): KV-transfer benchmarks, fast to start
    "llama3-8b-kv": dict(arch="llama", hidden_size=1024, num_layers=32, num_heads=8,
                         num_kv_heads=8, intermediate_size=2048, initializer_range=0.02),
    # a small Mixtral: 16 layers, 8 experts top-2, 8 KV heads, head dim 128 (~9 GB)
    "mixtral-small-shape": dict(arch="mixtral", hidden_size=2048, num_layers=16, num_heads=16,
                                num_kv_heads=8, intermediate_size=5632, initializer_range=0.02),
}


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 24)
        out.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + rng.choice([".", "!", "?", ","]))
    return out


def _build_tokenizer(spec: TinyModelSpec, out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace (no byte fallback): every token decodes to readable text, so a random
    # model's greedy output is words, not broken UTF-8. Unseen characters map to <unk>.
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(_corpus(spec.seed, 50))) | set(string.ascii_letters + string.digits + ".,!?:;'-"))
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": spec.max_position_embeddings,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2)
        + "\n"
    )
    return tok.get_vocab_size()


def _build_config(spec: TinyModelSpec, vocab: int, bos: int, eos: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=3,
        torch_dtype=spec.dtype,
    )
    if spec.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    from transformers import MixtralConfig

    return MixtralConfig(num_local_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token, **common)


def _build_weights(spec: TinyModelSpec, config, out: Path, device: str = "cpu") -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    with torch.device("meta"):
        if spec.arch == "llama":
            from transformers import LlamaForCausalLM as cls
        else:
            from transformers import MixtralForCausalLM as cls
        meta_model = cls(config)
    shapes = _checkpoint_shapes(meta_model.state_dict())
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight") or "layernorm" in name:
            t = torch.ones(shape, dtype=torch.float32)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * spec.initializer_range
        tensors[name] = t.to(dtype).contiguous().cpu()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _checkpoint_shapes(state_dict) -> dict[str, tuple[int, ...]]:
    """Tensor names/shapes in the classic Hub checkpoint format that vLLM loads.

    Recent transformers fuse Mixtral experts (`mlp.experts.gate_up_proj`); checkpoints on
    the Hub (and vLLM's loader) use `block_sparse_moe.experts.{j}.w1/w2/w3`.
    """
    out: dict[str, tuple[int, ...]] = {}
    for name, p in state_dict.items():
        shape = tuple(p.shape)
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.split(".mlp.")[0] + ".block_sparse_moe.experts"
            experts, two_i, hidden = shape
            for j in range(experts):
                out[f"{prefix}.{j}.w1.weight"] = (two_i // 2, hidden)
                out[f"{prefix}.{j}.w3.weight"] = (two_i // 2, hidden)
        elif ".mlp.experts.down_proj" in name:
            prefix = name.split(".mlp.")[0] + ".block_sparse_moe.experts"
            experts, hidden, inter = shape
            for j in range(experts):
                out[f"{prefix}.{j}.w2.weight"] = (hidden, inter)
        elif ".mlp.gate.weight" in name and "experts" not in name and len(shape) == 2 and "gate_proj" not in name:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = shape
        else:
            out[name] = shape
    return out


def make_model(arch: str, out: str | os.PathLike, seed: int = 0, device: str = "cpu", **overrides) -> Path:
    """Build a tiny `arch` model folder at `out` and return its path.

    Overrides change `TinyModelSpec` fields (e.g. num_layers=8 for a deeper cache).
    `device="cuda"` draws the random weights on the GPU (fast for the real-shaped
    presets); the same seed gives the same bytes on the same device kind only.
    """
    if arch not in ARCHS:
        raise ModelError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise ModelError(f"missing package {e.name!r}: pip install 'pdsidecar[models]' torch") from None
    spec = TinyModelSpec(arch=arch, seed=seed, **overrides)
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ModelError(f"cannot write to {path}: {e.strerror}") from None
    vocab = _build_tokenizer(spec, path)
    config = _build_config(spec, vocab, bos=1, eos=2)
    config_dict = config.to_dict()
    config_dict.pop("transformers_version", None)
    config_dict["architectures"] = ["LlamaForCausalLM" if arch == "llama" else "MixtralForCausalLM"]
    (path / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}, indent=2) + "\n"
    )
    _build_weights(spec, config, path, device)
    marker = _marker(arch, seed, overrides) | ({"device": device} if device != "cpu" else {})
    (path / "pdsidecar-model.json").write_text(json.dumps(marker, sort_keys=True) + "\n")
    return path


def _marker(arch: str, seed: int, overrides: dict) -> dict:
    return {"arch": arch, "seed": seed, "generator": GENERATOR_VERSION, **overrides}


def folder_digest(path: str | os.PathLike) -> str:
    """sha256 over every file's relative name and bytes, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def ensure_model(arch: str, out: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Return `out` if it already holds this model, else build it there.

    Safe to call from several processes at once: a file lock serialises builders and the
    folder is built aside and renamed into place.
    """
    import fcntl
    import shutil

    path = Path(out)
    want = _marker(arch, seed, overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = path / "pdsidecar-model.json"
        if marker.exists() and (path / "model.safetensors").exists():
            try:
                if json.loads(marker.read_text()) == want:
                    return path
            except ValueError:
                pass
        tmp = path.with_name(f".{path.name}.build-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        make_model(arch, tmp, seed=seed, **overrides)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path
