"""Head slices for heterogeneous TP come from the cache's real strides (issue 16).

Synthetic caches in every layout the engine hands the connector: K/V joint
``[blocks, H, N, 2D]`` (CPU; HND) or the same logical shape in NHD physical order
(vLLM >= 0.33), and K/V split ``[2, blocks, N, H, D]`` (FLASH_ATTN) in NHD or HND
physical order. A TP1 -> TP2 read is emulated byte for byte (``ctypes.memmove`` at the
addresses NIXL would use: regions + ``tp_read_plan`` offsets); head-major layouts land
exactly the right heads, token-major ones are refused (0 bytes per head), never
sliced by assumption.
"""

from __future__ import annotations

import ctypes

import pytest

torch = pytest.importorskip("torch")

from transfer.connector.tp_mapping import tp_read_plan  # noqa: E402
from transfer.layout import head_slice_bytes, regions_from_kv_caches  # noqa: E402

B, N, H, D = 6, 4, 4, 8


def joint(heads: int, nhd: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    if nhd:  # physical [B, N, H, 2D], logical [B, H, N, 2D]
        return torch.randn(B, N, heads, 2 * D, generator=g).permute(0, 2, 1, 3)
    return torch.randn(B, heads, N, 2 * D, generator=g)


def split(heads: int, nhd: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    if nhd:  # FLASH_ATTN default: physical = logical [2, B, N, H, D]
        return torch.randn(2, B, N, heads, D, generator=g)
    return torch.randn(2, B, heads, N, D, generator=g).permute(0, 1, 3, 2, 4)


def heads_of(t, lo: int, hi: int):
    """Logical heads [lo, hi) of every block, as a dense tensor."""
    return t[:, lo:hi] if t.dim() == 4 else t[:, :, :, lo:hi]


LAYOUTS = {"joint-HND": (joint, False), "joint-NHD": (joint, True),
           "split-HND": (split, False), "split-NHD": (split, True)}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_tp1_to_tp2_head_slices_byte_exact_or_refused(name):
    make, nhd = LAYOUTS[name]
    prefill = make(H, nhd, 1)  # TP 1: all heads
    decode = [make(H // 2, nhd, 10 + r) for r in range(2)]  # TP 2: half each
    bph = head_slice_bytes(decode[0], H // 2)
    if nhd:
        assert bph == 0  # a head is N separate ranges of a block: refuse, never slice
        return
    assert bph == head_slice_bytes(prefill, H)
    rreg = regions_from_kv_caches({"l": prefill}, B)
    before = [d.clone() for d in decode]
    for r, d in enumerate(decode):
        lreg = regions_from_kv_caches({"l": d}, B)
        plan = tp_read_plan(r, 2, 1, H, bytes_per_head=bph)
        for s in plan.slices:
            for lr, rr in zip(lreg, rreg):  # K and V regions of a split cache
                for blk, rblk in ((1, 4), (3, 0)):
                    ctypes.memmove(lr.base_addr + blk * lr.block_stride + s.local_offset,
                                   rr.base_addr + rblk * rr.block_stride + s.remote_offset,
                                   s.length)
        lo, hi = r * H // 2, (r + 1) * H // 2
        bsel = (slice(None), [1, 3]) if d.dim() == 5 else ([1, 3],)
        psel = (slice(None), [4, 0]) if d.dim() == 5 else ([4, 0],)
        assert torch.equal(d[bsel], heads_of(prefill[psel], lo, hi))
        other = (slice(None), [0, 2, 4, 5]) if d.dim() == 5 else ([0, 2, 4, 5],)
        assert torch.equal(d[other], before[r][other])  # nothing else written


def test_one_head_and_odd_shapes():
    t = joint(1, True, 3)
    assert head_slice_bytes(t, 1) == N * 2 * D * t.element_size()  # whole block
    assert head_slice_bytes(joint(H, False, 3), H + 1) == 0  # heads not where expected
    assert head_slice_bytes(torch.zeros(B, N, 16), 2) == 0  # unknown shape (MLA-like)


def block_kv(heads: int, nhd: bool, seed: int):
    """vLLM 0.26 FLASH_ATTN on the H100: ``[num_blocks, 2, N, H, D]`` (K and V inside
    each block; measured there), or the HND order of the same logical shape."""
    g = torch.Generator().manual_seed(seed)
    if nhd:
        return torch.randn(B, 2, N, heads, D, generator=g)
    return torch.randn(B, 2, heads, N, D, generator=g).permute(0, 1, 3, 2, 4)


@pytest.mark.parametrize("nhd", [True, False], ids=["NHD", "HND"])
def test_block_major_kv_cache_is_registered_whole_and_never_head_sliced(nhd):
    """A block-major K/V cache is one region per layer (K and V of a block move
    together, byte-exact), and its heads are never sliced: a head is two ranges (K, V)
    or N ranges of a block, so a TP1 -> TP2 pair is refused (0 bytes per head)."""
    t = block_kv(H // 2, nhd, 4)
    (r,) = regions_from_kv_caches({"l": t}, B)
    assert r.num_blocks == B and r.block_len == 2 * N * (H // 2) * D * t.element_size()
    assert r.block_stride == t.stride(0) * t.element_size()
    assert head_slice_bytes(t, H // 2) == 0
    before = t.clone()
    ctypes.memset(r.base_addr + 3 * r.block_stride, 0, r.block_len)  # the region's block 3
    assert torch.count_nonzero(t[3]) == 0  # is exactly the tensor's block 3, K and V
    keep = [0, 1, 2, 4, 5]
    assert torch.equal(t[keep], before[keep])
