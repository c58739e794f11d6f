"""KV-cache layout math: pure functions from cache shapes to byte ranges.

Nothing here touches a device or a NIXL agent. Tensors are read duck-typed
(``shape``, ``stride()``, ``element_size()``, ``data_ptr()``, ``device``), so the
module imports without torch.

Vocabulary:

* *region*: one registered range holding ``num_blocks`` blocks of one layer (or one
  of K/V for caches with a leading K/V dim of 2). Block ``b`` of a region starts at
  ``base_addr + b * block_stride`` and is ``block_len`` bytes long.
* *descriptor*: ``(addr, len, dev)``; lists of them are numpy ``N x 3`` int64 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1, "int8": 1,
    "fp8_e4m3": 1, "fp8_e5m2": 1,
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (``"bfloat16"``, ``"torch.float16"``, ``"fp8"``)."""
    name = str(dtype).removeprefix("torch.").lower()
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown KV-cache dtype {dtype!r}") from None


@dataclass(frozen=True)
class KVCacheSpec:
    """Model-level KV-cache shape (whole model, before tensor parallelism).

    ``head_size_v`` defaults to ``head_size`` for standard attention; MLA caches
    have one latent "head" of ``head_size`` (kv_lora_rank + rope dim) and no V.
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int  # tokens per block
    dtype: str = "bfloat16"
    is_mla: bool = False
    head_size_v: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.is_mla and self.num_kv_heads != 1:
            raise ValueError("MLA caches have exactly one KV head")
        dtype_bytes(self.dtype)

    @property
    def v_size(self) -> int:
        if self.is_mla:
            return 0
        return self.head_size if self.head_size_v is None else self.head_size_v

    def heads_per_rank(self, tp_size: int) -> int:
        """KV heads held by one TP rank (heads are replicated when tp > heads)."""
        return heads_per_rank(self.num_kv_heads, tp_size, self.is_mla)

    def bytes_per_head_per_block(self) -> int:
        """Bytes of one KV head in one block of one layer (K and V together)."""
        return self.block_size * (self.head_size + self.v_size) * dtype_bytes(self.dtype)

    def bytes_per_block_per_layer(self, tp_size: int = 1) -> int:
        """Bytes of one block of one layer on one TP rank."""
        return self.heads_per_rank(tp_size) * self.bytes_per_head_per_block()

    def bytes_per_block(self, tp_size: int = 1) -> int:
        """Bytes of one block over all layers on one TP rank."""
        return self.num_layers * self.bytes_per_block_per_layer(tp_size)

    def bytes_per_token(self, tp_size: int = 1) -> int:
        return self.bytes_per_block(tp_size) // self.block_size

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks holding ``num_tokens`` tokens (the last one may be partial)."""
        if num_tokens < 0:
            raise ValueError("num_tokens must be >= 0")
        return -(-num_tokens // self.block_size)

    def block_shape(self, tp_size: int = 1) -> tuple[int, int, int]:
        """Logical per-block shape ``(H, N, C)`` as vLLM hands it to a connector."""
        return (self.heads_per_rank(tp_size), self.block_size, self.head_size + self.v_size)


def heads_per_rank(num_kv_heads: int, tp_size: int, is_mla: bool = False) -> int:
    if tp_size <= 0:
        raise ValueError("tp_size must be positive")
    if is_mla:
        return 1
    if tp_size <= num_kv_heads:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads do not split over TP {tp_size}")
        return num_kv_heads // tp_size
    if tp_size % num_kv_heads:
        raise ValueError(f"TP {tp_size} is not a multiple of {num_kv_heads} KV heads")
    return 1


def rank_heads(rank: int, tp_size: int, num_kv_heads: int, is_mla: bool = False) -> range:
    """Global KV-head indices held by ``rank`` (replicas share indices)."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} outside TP size {tp_size}")
    if is_mla:
        return range(0, 1)
    h = heads_per_rank(num_kv_heads, tp_size)
    if tp_size <= num_kv_heads:
        return range(rank * h, rank * h + h)
    start = rank * num_kv_heads // tp_size
    return range(start, start + 1)


# --------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class Region:
    """One registered per-layer (or per-layer-K/V) block array."""

    name: str
    base_addr: int
    block_len: int
    block_stride: int
    num_blocks: int
    device_id: int = 0
    layer: int = 0  # index of the attention layer this region belongs to

    @property
    def span(self) -> tuple[int, int]:
        """``(start, end)`` byte range covered by the region's blocks."""
        end = self.base_addr + (self.num_blocks - 1) * self.block_stride + self.block_len
        return self.base_addr, end

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "base_addr": self.base_addr, "block_len": self.block_len,
            "block_stride": self.block_stride, "num_blocks": self.num_blocks,
            "device_id": self.device_id, "layer": self.layer,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Region":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _device_index(t: Any) -> int:
    dev = getattr(t, "device", None)
    idx = getattr(dev, "index", None)
    return int(idx) if idx is not None else 0


def regions_from_kv_caches(
    kv_caches: Mapping[str, Any], num_blocks: int | None = None
) -> list[Region]:
    """Regions for vLLM's ``{layer_name: tensor}`` (``register_kv_caches`` input).

    Handles ``[num_blocks, H, N, C]`` (one region per layer; strides read from the
    tensor, so any physical layout with a block-contiguous inner part works) and the
    older ``[2, num_blocks, ...]`` K/V-split form (two regions per layer). The split
    form is detected when dim 0 is 2 and ``num_blocks`` (if given) sits in dim 1, or
    when dim 0 is 2 and the tensor's dim-0 stride is larger than dim 1's.
    """
    regions: list[Region] = []
    for layer, (name, t) in enumerate(kv_caches.items()):
        shape = tuple(t.shape)
        strides = tuple(t.stride())
        esize = int(t.element_size())
        base = int(t.data_ptr())
        dev = _device_index(t)
        split = (
            len(shape) >= 3
            and shape[0] == 2
            and (
                (num_blocks is not None and shape[1] == num_blocks and shape[0] != num_blocks)
                or (num_blocks is None and strides[0] > strides[1])
            )
        )
        if split:
            for kv, part in ((0, "k"), (1, "v")):
                inner = shape[2:]
                regions.append(Region(
                    name=f"{name}.{part}",
                    base_addr=base + kv * strides[0] * esize,
                    block_len=_inner_block_bytes(inner, strides[2:], esize, name),
                    block_stride=strides[1] * esize,
                    num_blocks=shape[1], device_id=dev, layer=layer,
                ))
        else:
            regions.append(Region(
                name=name, base_addr=base,
                block_len=_inner_block_bytes(shape[1:], strides[1:], esize, name),
                block_stride=strides[0] * esize,
                num_blocks=shape[0], device_id=dev, layer=layer,
            ))
        if num_blocks is not None and regions[-1].num_blocks != num_blocks:
            raise ValueError(
                f"layer {name!r}: {regions[-1].num_blocks} blocks, expected {num_blocks}"
            )
    return regions


def _inner_block_bytes(
    shape: Sequence[int], strides: Sequence[int], esize: int, name: str
) -> int:
    """Bytes of one block when its inner dims are contiguous in some order."""
    n = int(np.prod(shape)) if len(shape) else 1
    # inner dims must tile a dense range: max extent == element count
    extent = 1 + sum((s - 1) * st for s, st in zip(shape, strides) if s > 1)
    if extent != n:
        raise ValueError(
            f"layer {name!r}: a block is not contiguous (shape {tuple(shape)}, "
            f"strides {tuple(strides)}); cannot describe it with one range"
        )
    return n * esize


def head_slice_bytes(t: Any, heads: int) -> int:
    """Bytes of one KV head inside one block of ``t`` (one layer's cache), read from
    its strides; 0 when a head is not one contiguous range of each block region.

    Logical shapes as vLLM hands them: ``[num_blocks, H, N, C]`` (K and V in C: CPU,
    vLLM >= 0.33) or ``[2, num_blocks, N, H, D]`` (K/V split, e.g. FLASH_ATTN), each in
    whatever physical order the layout chose (HND: heads outermost in a block; NHD:
    tokens outermost). Head slices (heterogeneous TP) are only byte ranges when the
    heads dim is the outermost inner dim of a block and the rest of the block is dense.
    """
    shape, strides = tuple(t.shape), tuple(t.stride())
    esize = int(t.element_size())
    split = len(shape) == 5 and shape[0] == 2
    if heads == 1:  # one head (or MLA's latent): a slice is the whole block
        return int(np.prod(shape[2:] if split else shape[1:])) * esize
    if split:
        inner, istr, hdim = shape[2:], strides[2:], 1  # [N, H, D]
    elif len(shape) == 4:
        inner, istr, hdim = shape[1:], strides[1:], 0  # [H, N, C]
    else:
        return 0
    if inner[hdim] != heads:
        return 0
    rest = [(n, st) for i, (n, st) in enumerate(zip(inner, istr)) if i != hdim]
    per_head = int(np.prod([n for n, _ in rest]))
    extent = 1 + sum((n - 1) * st for n, st in rest if n > 1)
    if istr[hdim] != per_head or extent != per_head:
        return 0
    return per_head * esize


def regions_for_buffer(
    base_addr: int, num_layers: int, num_blocks: int, block_len: int,
    device_id: int = 0, layer_stride: int | None = None, prefix: str = "layer",
) -> list[Region]:
    """Regions for one flat buffer laid out layer-major, ``[L, num_blocks, block_len]``."""
    layer_stride = num_blocks * block_len if layer_stride is None else layer_stride
    return [
        Region(f"{prefix}{i}", base_addr + i * layer_stride, block_len, block_len,
               num_blocks, device_id, layer=i)
        for i in range(num_layers)
    ]


def memory_ranges(regions: Iterable[Region]) -> list[tuple[int, int, int]]:
    """Merged ``(addr, len, dev)`` ranges covering all regions (register each once)."""
    spans = sorted((r.device_id, *r.span) for r in regions)
    out: list[list[int]] = []
    for dev, start, end in spans:
        if out and out[-1][2] == dev and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], end - out[-1][0])
        else:
            out.append([start, end - start, dev])
    return [tuple(r) for r in out]  # type: ignore[misc]
