"""``pdbench transfer``: the command line turned into a :class:`Plan` (shapes, backends, ops).

Bad values raise :class:`UsageError` (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any


MODELS = {
    # name: (layers, kv_heads, head_size, block_size, dtype, is_mla)
    "llama3-8b": (32, 8, 128, 16, "bfloat16", False),
    "llama3-70b": (80, 8, 128, 16, "bfloat16", False),
    "deepseek-v3": (61, 1, 576, 64, "bfloat16", True),
}
ALL_BACKENDS = ("nixl", "raw-nixl", "ipc", "ipc-torch", "torch", "memcpy")


class UsageError(Exception):
    """Bad command-line value: printed as one line, exit status 2."""



def _ints(s: str, name: str, lo: int = 1) -> list[int]:
    try:
        vals = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name}: expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < lo for v in vals):
        raise UsageError(f"--{name}: values must be >= {lo}, got {s!r}")
    return vals


def _float(s: str, name: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise UsageError(f"--{name}: expected a number, got {s!r}") from None
    if v <= 0:
        raise UsageError(f"--{name}: must be > 0")
    return v


@dataclass
class Case:
    layers: int
    block_bytes: int
    blocks: int
    label: str = ""


@dataclass
class Plan:
    mem: str
    backends: list[str]
    ops: list[str]
    cases: list[Case]
    iters: int
    warmup: int
    max_seconds: float
    protocol: str
    timeout: float
    seed: int
    json: str = ""
    plot: str = ""
    progress: bool = True
    prepare_only: bool = False
    model: str = ""
    notes: list[str] = field(default_factory=list)


def _model_shape(model: str) -> tuple[str, Any]:
    from transfer.layout import KVCacheSpec
    if model in MODELS:
        l, h, d, bs, dt, mla = MODELS[model]
        return model, KVCacheSpec(l, h, d, bs, dt, mla)
    if model.endswith(".json"):
        try:
            with open(model) as f:
                d = json.load(f)
            return os.path.basename(model), KVCacheSpec(**d)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"--model {model}: cannot read a KVCacheSpec ({e})") from None
    raise UsageError(f"--model: unknown model {model!r} (known: {', '.join(MODELS)}, "
                     f"or a .json file)")


def make_plan(a: argparse.Namespace) -> Plan:
    mem = a.mem.upper()
    if mem not in ("DRAM", "VRAM"):
        raise UsageError(f"--mem: expected DRAM or VRAM, got {a.mem!r}")
    default = "ipc,ipc-torch,nixl,raw-nixl,torch" if mem == "VRAM" else "nixl,raw-nixl,torch"
    backends = [b.strip() for b in (a.backends or default).split(",") if b.strip()]
    bad = [b for b in backends if b not in ALL_BACKENDS]
    if bad:
        raise UsageError(f"--backends: unknown {bad} (choose from {', '.join(ALL_BACKENDS)})")
    if mem == "DRAM" and any(b.startswith("ipc") for b in backends):
        raise UsageError("--backends: ipc needs --mem VRAM")
    prepare_only = bool(getattr(a, "prepare_only", False))
    if prepare_only and any(b not in ("nixl", "raw-nixl") for b in backends):
        raise UsageError("--prepare-only: only the nixl and raw-nixl backends "
                         "(pass --backends nixl,raw-nixl)")
    ops = [o.strip().lower() for o in a.ops.split(",") if o.strip()]
    if not ops or any(o not in ("read", "write") for o in ops):
        raise UsageError(f"--ops: expected read and/or write, got {a.ops!r}")
    if a.protocol not in ("rdma", "tcp"):
        raise UsageError(f"--protocol: expected rdma or tcp, got {a.protocol!r}")
    cases: list[Case] = []
    if a.model:
        name, spec = _model_shape(a.model)
        if not a.tokens:
            raise UsageError("--model needs --tokens N[,N...]")
        bb = spec.bytes_per_block_per_layer()
        for t in _ints(a.tokens, "tokens"):
            cases.append(Case(spec.num_layers, bb, spec.num_blocks_for_tokens(t),
                              f"{name} {t} tok"))
    else:
        if a.tokens:
            raise UsageError("--tokens needs --model")
        for l in _ints(a.layers, "layers"):
            for bb in _ints(a.block_bytes, "block-bytes", 8):
                if bb % 8:
                    raise UsageError("--block-bytes: must be a multiple of 8")
                for n in _ints(a.blocks, "blocks"):
                    cases.append(Case(l, bb, n))
    return Plan(mem=mem, backends=backends, ops=ops, cases=cases,
                iters=_ints(a.iters, "iters")[0], warmup=_ints(a.warmup, "warmup", 0)[0],
                max_seconds=_float(a.max_seconds, "max-seconds"), protocol=a.protocol,
                timeout=_float(a.timeout, "timeout"), seed=_ints(a.seed, "seed", 0)[0],
                json=a.json, plot=a.plot, progress=not a.no_progress, model=a.model,
                prepare_only=prepare_only)
