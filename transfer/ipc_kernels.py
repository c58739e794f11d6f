"""Batched block copy between paged KV caches: one launch per layer group.

:func:`copy_blocks` moves ``len(src_ids)`` blocks of every layer in a group with a
single Triton launch: a device table holds each layer's base pointer (source and
destination), programs are ``(chunk of a block, block, layer)``. Without Triton (or
on CPU) :func:`copy_blocks_torch` does ``index_select`` + ``index_copy_`` per layer.
torch and triton are imported lazily.
"""

from __future__ import annotations

from typing import Any

_KERNEL: Any = None
_ALIGNED_OK: bool | None = None  # None: not tried yet


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_blocks_kernel(src_tab, dst_tab, src_ids, dst_ids, src_stride, dst_stride,
                            src_off, dst_off, nwords, CHUNK: tl.constexpr,
                            ALIGNED: tl.constexpr):
        c = tl.program_id(0)
        b = tl.program_id(1)
        layer = tl.program_id(2)
        sb = tl.load(src_ids + b).to(tl.int64)
        db = tl.load(dst_ids + b).to(tl.int64)
        sp = tl.load(src_tab + layer).to(tl.pointer_type(tl.int64))
        dp = tl.load(dst_tab + layer).to(tl.pointer_type(tl.int64))
        start = c * CHUNK
        s = sp + (sb * src_stride + src_off + start)
        d = dp + (db * dst_stride + dst_off + start)
        if ALIGNED:  # bases/strides/offsets are 16-byte multiples: allow 128-bit access
            s = tl.multiple_of(s, 16)
            d = tl.multiple_of(d, 16)
        offs = tl.arange(0, CHUNK)
        m = offs < nwords - start
        v = tl.load(s + offs, mask=m)
        tl.store(d + offs, v, mask=m)

    _KERNEL = _copy_blocks_kernel
    return _KERNEL


def copy_blocks_triton(src_tab: Any, dst_tab: Any, src_ids: Any, dst_ids: Any,
                       src_stride_w: int, dst_stride_w: int, src_off_w: int, dst_off_w: int,
                       nwords: int, aligned16: bool, chunk_words: int = 1024,
                       num_warps: int = 4) -> None:
    """Launch the gather/scatter on the current stream. Units: 8-byte words.

    ``src_tab``/``dst_tab``: int64 device tensors of per-layer base addresses;
    ``src_ids``/``dst_ids``: int32/int64 device tensors of block ids (same length).
    """
    global _ALIGNED_OK
    k = _kernel()
    nlayers = int(src_tab.numel())
    nblocks = int(src_ids.numel())
    if nlayers == 0 or nblocks == 0:
        return
    chunk = min(chunk_words, _next_pow2(nwords))
    grid = (-(-nwords // chunk), nblocks, nlayers)
    args = (src_tab, dst_tab, src_ids, dst_ids, src_stride_w, dst_stride_w, src_off_w,
            dst_off_w, nwords)
    if aligned16 and _ALIGNED_OK is not False:
        try:
            k[grid](*args, CHUNK=chunk, ALIGNED=True, num_warps=num_warps)
            _ALIGNED_OK = True
            return
        except Exception:
            if _ALIGNED_OK:  # it compiled before: a real launch error
                raise
            _ALIGNED_OK = False
    k[grid](*args, CHUNK=chunk, ALIGNED=False, num_warps=num_warps)


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def copy_blocks_torch(src_views: list[Any], dst_views: list[Any], src_ids: Any,
                      dst_ids: Any) -> None:
    """Fallback: per layer ``dst[dst_ids] = src[src_ids]`` on ``[num_blocks, bytes]`` views."""
    for s, d in zip(src_views, dst_views):
        d.index_copy_(0, dst_ids, s.index_select(0, src_ids))
