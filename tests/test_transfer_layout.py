"""Layout math against hand-computed cases."""

import numpy as np
import pytest
import torch

from transfer.errors import BlockIdError
from transfer.connector.tp_mapping import expected_notifications, tp_read_plan
from transfer.blocks import (block_descriptors, coalesce_pairs, coalesce_runs,
                             validate_block_id_pair, validate_block_ids)
from transfer.layout import (KVCacheSpec, Region, memory_ranges, regions_for_buffer,
                             regions_from_kv_caches)


def test_dense_llama8b_bytes():
    s = KVCacheSpec(num_layers=32, num_kv_heads=8, head_size=128, block_size=16)
    assert s.bytes_per_block_per_layer() == 64 * 1024  # 8*16*256*2
    assert s.bytes_per_block() == 2 * 1024 * 1024
    assert s.bytes_per_token() == 128 * 1024
    assert s.block_shape() == (8, 16, 256)


def test_gqa_tp_split_and_replication():
    s = KVCacheSpec(num_layers=80, num_kv_heads=8, head_size=128, block_size=16)
    assert s.bytes_per_block_per_layer(tp_size=2) == 32 * 1024
    assert s.bytes_per_block_per_layer(tp_size=16) == 8 * 1024  # 1 head, replicated
    assert s.bytes_per_token() == 320 * 1024
    with pytest.raises(ValueError):
        s.heads_per_rank(3)


def test_mla_deepseek_v3():
    s = KVCacheSpec(num_layers=61, num_kv_heads=1, head_size=576, block_size=64,
                    is_mla=True)
    assert s.bytes_per_token() // 61 == 1152
    assert s.bytes_per_token() == 70272
    assert s.bytes_per_block_per_layer(tp_size=8) == 1152 * 64  # replicated
    with pytest.raises(ValueError):
        KVCacheSpec(num_layers=1, num_kv_heads=2, head_size=8, block_size=4, is_mla=True)


def test_partial_last_block():
    s = KVCacheSpec(num_layers=2, num_kv_heads=1, head_size=8, block_size=16)
    assert s.num_blocks_for_tokens(0) == 0
    assert s.num_blocks_for_tokens(16) == 1
    assert s.num_blocks_for_tokens(17) == 2
    assert s.num_blocks_for_tokens(2048) == 128


def test_coalesce_runs():
    starts, lens = coalesce_runs([3, 4, 5, 9, 10, 2, 7])
    assert starts.tolist() == [3, 9, 2, 7]
    assert lens.tolist() == [3, 2, 1, 1]
    ls, rs, n = coalesce_pairs([1, 2, 3, 8], [5, 6, 9, 10])
    assert ls.tolist() == [1, 3, 8] and rs.tolist() == [5, 9, 10] and n.tolist() == [2, 1, 1]


def test_block_descriptors_coalesced_and_layers():
    regs = regions_for_buffer(0x1000, num_layers=2, num_blocks=10, block_len=100, device_id=3)
    d = block_descriptors(regs, [2, 3, 4, 7])
    assert d.dtype == np.int64 and d.shape == (4, 3)
    assert d.tolist() == [[0x1000 + 200, 300, 3], [0x1000 + 700, 100, 3],
                          [0x1000 + 1000 + 200, 300, 3], [0x1000 + 1000 + 700, 100, 3]]
    d1 = block_descriptors(regs, [2, 3], layers=[1], coalesce=False)
    assert d1.tolist() == [[0x1000 + 1200, 100, 3], [0x1000 + 1300, 100, 3]]
    # a slice inside each block is never coalesced
    ds = block_descriptors(regs[:1], [2, 3], offset=50, length=50)
    assert ds.tolist() == [[0x1000 + 250, 50, 3], [0x1000 + 350, 50, 3]]
    with pytest.raises(ValueError):
        block_descriptors(regs, [1], offset=90, length=20)
    with pytest.raises(ValueError):
        block_descriptors(regs, [1], layers=[5])


def test_strided_region_not_coalesced():
    r = Region("l0", base_addr=0, block_len=64, block_stride=256, num_blocks=4)
    d = block_descriptors([r], [0, 1, 2])
    assert d[:, 0].tolist() == [0, 256, 512] and set(d[:, 1].tolist()) == {64}


def test_validate_block_ids():
    assert validate_block_ids([0, 5, 9], 10).tolist() == [0, 5, 9]
    with pytest.raises(BlockIdError, match="out of range"):
        validate_block_ids([0, 10], 10)
    with pytest.raises(BlockIdError, match="out of range"):
        validate_block_ids([-1], 10)
    with pytest.raises(BlockIdError, match="duplicate block id 4"):
        validate_block_ids([4, 1, 4], 10)


def test_validate_block_id_pair():
    ids = validate_block_id_pair([3, 1, 2], np.array([7, 5, 0]), 4, 8)
    assert ids.dtype == np.int64 and ids.tolist() == [[3, 1, 2], [7, 5, 0]]
    # odd shapes take the per-list path and still come back as 2 x n
    assert validate_block_id_pair(np.array([[1], [2]]), [3, 4], 5, 5).tolist() == [[1, 2], [3, 4]]
    assert validate_block_id_pair([], [], 5, 5).shape == (2, 0)
    assert validate_block_id_pair([3], np.array([7]), 4, 8).tolist() == [[3], [7]]
    # same errors, same order as validate_block_ids(local), (remote), then the lengths
    with pytest.raises(BlockIdError, match="local block ids: block id 4 out of range"):
        validate_block_id_pair([4], [9], 4, 8)
    with pytest.raises(BlockIdError, match="remote x: block id 8 out of range"):
        validate_block_id_pair([3], [8], 4, 8, remote_what="remote x")
    with pytest.raises(BlockIdError, match="block id -1 out of range"):
        validate_block_id_pair([0], [-1], 4, 8)
    with pytest.raises(BlockIdError, match="local block ids: duplicate block id 2"):
        validate_block_id_pair([2, 0, 2], [1, 1, 1], 4, 8)
    with pytest.raises(BlockIdError, match="remote block ids: duplicate block id 6"):
        validate_block_id_pair([2, 0, 1], [6, 1, 6], 4, 8)
    with pytest.raises(BlockIdError, match="2 local block ids but 3 remote ones"):
        validate_block_id_pair([0, 1], [0, 1, 2], 4, 8)
    with pytest.raises(BlockIdError, match="local block ids: block id 9"):
        validate_block_id_pair([0, 9], [0, 1, 2], 4, 8)


def test_regions_from_packed_vllm_cache():
    # vLLM 0.32 CPU: [num_blocks, H, N, 2*head] per layer, two layers in one allocation
    base = torch.zeros(2, 6, 2, 4, 16, dtype=torch.bfloat16)
    caches = {"model.layers.0.attn": base[0], "model.layers.1.attn": base[1]}
    regs = regions_from_kv_caches(caches, num_blocks=6)
    bl = 2 * 4 * 16 * 2
    assert [r.block_len for r in regs] == [bl, bl]
    assert [r.block_stride for r in regs] == [bl, bl]
    assert regs[1].base_addr - regs[0].base_addr == 6 * bl
    assert [r.layer for r in regs] == [0, 1]
    assert memory_ranges(regs) == [(base.data_ptr(), 2 * 6 * bl, 0)]


def test_regions_from_kv_split_and_token_major_view():
    # FlashAttention-style [2, num_blocks, N, H, D]: two regions per layer
    t = torch.zeros(2, 5, 16, 4, 8, dtype=torch.float16)
    regs = regions_from_kv_caches({"l0": t}, num_blocks=5)
    assert [r.name for r in regs] == ["l0.k", "l0.v"]
    assert regs[1].base_addr - regs[0].base_addr == 5 * 16 * 4 * 8 * 2
    assert regs[0].block_len == 16 * 4 * 8 * 2 and regs[0].layer == regs[1].layer == 0
    # head-major physical layout exposed as a permuted logical view: still one range
    phys = torch.zeros(5, 4, 16, 8)  # B, H, N, C
    logical = phys.permute(0, 2, 1, 3)  # B, N, H, C
    r = regions_from_kv_caches({"x": logical})[0]
    assert r.block_len == 4 * 16 * 8 * 4 and r.block_stride == r.block_len
    # a non-contiguous block cannot be one range
    with pytest.raises(ValueError, match="not contiguous"):
        regions_from_kv_caches({"y": torch.zeros(5, 4, 16, 8)[..., :4]})


def test_hetero_tp_decode_larger():
    # P TP=2 (4 heads each), D TP=4 (2 heads each), 8 KV heads, 1 KiB per head
    plan = tp_read_plan(local_rank=3, local_tp=4, remote_tp=2, num_kv_heads=8,
                        bytes_per_head=1024)
    (s,) = plan.slices
    assert (s.remote_rank, s.remote_head_start, s.local_head_start, s.num_heads) == (1, 2, 0, 2)
    assert (s.remote_offset, s.local_offset, s.length) == (2048, 0, 2048)
    assert expected_notifications(1, local_tp=4, remote_tp=2, num_kv_heads=8) == 2


def test_hetero_tp_decode_smaller():
    # P TP=4 (2 heads each), D TP=2 (4 heads each): D rank 1 reads P ranks 2 and 3
    plan = tp_read_plan(1, local_tp=2, remote_tp=4, num_kv_heads=8, bytes_per_head=100)
    got = [(s.remote_rank, s.remote_offset, s.local_offset, s.length) for s in plan.slices]
    assert got == [(2, 0, 0, 200), (3, 0, 200, 200)]
    assert plan.remote_ranks == (2, 3)
    assert expected_notifications(2, local_tp=2, remote_tp=4, num_kv_heads=8) == 1


def test_hetero_tp_token_major_rejected():
    with pytest.raises(ValueError, match="head-major"):
        tp_read_plan(0, local_tp=4, remote_tp=2, num_kv_heads=8, kv_layout="NHD")
    # whole blocks are fine in any layout
    assert tp_read_plan(0, 2, 2, 8, kv_layout="NHD").slices[0].num_heads == 4


def test_hetero_tp_mla_and_replicated_heads():
    # MLA: D TP 2 < P TP 4: each D rank reads one whole block; unread P ranks notified
    p0 = tp_read_plan(0, local_tp=2, remote_tp=4, num_kv_heads=1, is_mla=True)
    p1 = tp_read_plan(1, local_tp=2, remote_tp=4, num_kv_heads=1, is_mla=True)
    assert p0.remote_ranks == (0,) and p1.remote_ranks == (1,)
    assert p0.notify_only == (2,) and p1.notify_only == (3,)
    for r in range(4):
        assert expected_notifications(r, 2, 4, 1, is_mla=True) == 1
    # 2 KV heads, D TP 4 (replicated), P TP 1
    plans = [tp_read_plan(r, 4, 1, 2, bytes_per_head=10) for r in range(4)]
    assert [(p.slices[0].remote_rank, p.slices[0].remote_head_start) for p in plans] == \
        [(0, 0), (0, 0), (0, 1), (0, 1)]
    assert expected_notifications(0, 4, 1, 2) == 4
