"""IPC engine logic on CPU (one process, torch fallback) and protocol selection."""

import pytest
import torch

from transfer.engine import PeerInfo
from transfer.errors import BlockIdError, TransferError, UnknownPeerError
from transfer.ipc import IpcTransferEngine
from transfer.layout import Region
from transfer.select import peer_backend, resolve_protocol


def _caches(seed, layers=3):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randint(-9, 9, (16, 2, 4, 8), generator=g, dtype=torch.int16)
            for i in range(layers)}


@pytest.fixture
def engines():
    ka, kb = _caches(1), _caches(2)
    a = IpcTransferEngine("ipc-a", use_triton=False)
    b = IpcTransferEngine("ipc-b", use_triton=False)
    a.register_kv_caches(ka)
    b.register_kv_caches(kb)
    a.add_peer(b.local_info())
    b.add_peer(a.local_info())
    yield a, b, ka, kb
    a.close()
    b.close()


def test_read_write_layers_and_slices(engines):
    a, b, ka, kb = engines
    a.transfer("READ", "ipc-b", [1, 2, 9], [10, 5, 7], notif="r1:1")
    assert all(torch.equal(ka[n][[1, 2, 9]], kb[n][[10, 5, 7]]) for n in ka)
    assert b.get_new_notifs() == {"ipc-a": [b"r1:1"]}
    a.transfer("WRITE", "ipc-b", [4], [0], layers=[2])
    assert torch.equal(kb["l2"][0], ka["l2"][4]) and not torch.equal(kb["l0"][0], ka["l0"][4])
    # hetero-TP style slice: local head 0 <- remote head 1 (one head = 4*8*2 bytes)
    hb = 4 * 8 * 2
    a.transfer("READ", "ipc-b", [6], [8], local_slice=(0, hb), remote_slice=(hb, hb))
    assert all(torch.equal(ka[n][6, 0], kb[n][8, 1]) for n in ka)


def test_errors(engines):
    a, *_ = engines
    with pytest.raises(BlockIdError):
        a.read_blocks("ipc-b", [0], [16])
    with pytest.raises(BlockIdError):
        a.read_blocks("ipc-b", [0, 0], [1, 2])
    with pytest.raises(UnknownPeerError):
        a.read_blocks("ghost", [0], [0])
    with pytest.raises(TransferError, match="no CUDA IPC handles"):
        a.add_peer(PeerInfo("elsewhere", "ipc", "VRAM", [Region("x", 0, 8, 8, 1)]))


def test_protocol_selection(monkeypatch):
    mk = lambda host, mem, h=b"h": PeerInfo("p", "multi", mem, [], host_id=host, ipc_handles=h)
    assert peer_backend("auto", mk("A", "VRAM"), mk("A", "VRAM")) == "ipc"
    assert peer_backend("auto", mk("A", "VRAM"), mk("B", "VRAM")) == "nixl"
    assert peer_backend("auto", mk("A", "DRAM"), mk("A", "DRAM", b"")) == "nixl"
    assert peer_backend("rdma", mk("A", "VRAM"), mk("A", "VRAM")) == "nixl"
    with pytest.raises(TransferError, match="same host|this host"):
        peer_backend("ipc", mk("A", "VRAM"), mk("B", "VRAM"))
    monkeypatch.setenv("KV_TRANSFER_PROTOCOL", "TCP")
    assert resolve_protocol() == "tcp"
    monkeypatch.setenv("KV_TRANSFER_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ValueError, match="KV_TRANSFER_PROTOCOL"):
        resolve_protocol()


def test_check_block_ids_fast_path_matches_validate():
    import numpy as np

    from transfer.blocks import validate_block_ids as check_block_ids
    ids = np.array([5, 1, 9], dtype=np.int64)
    assert check_block_ids(ids, 10) is ids  # no copy on the hot path
    assert check_block_ids([3], 10).tolist() == [3]
    assert check_block_ids([], 10).size == 0
    assert check_block_ids(np.array([2, 3], dtype=np.int32), 4).tolist() == [2, 3]
    for bad, msg in (([0, 10], "out of range"), ([-1], "out of range"),
                     ([4, 2, 4], "duplicate"), (np.array([[1, 1]]), "duplicate")):
        with pytest.raises(BlockIdError, match=msg):
            check_block_ids(bad, 10)


def test_plan_groups_geometry():
    from transfer.ipc_plan import plan_groups
    kb = 64 * 1024
    pairs = [(1 << 20 | i * 2 * kb * 0, 2 << 20, kb, kb, 0, 0, kb) for i in range(3)]
    g = plan_groups(pairs)
    assert len(g) == 1 and g[0]["nwords"] == kb // 8 and g[0]["aligned16"]
    assert g[0]["src_stride"] == kb // 8 and len(g[0]["src"]) == 3
    # two geometries -> two groups; 8- but not 16-byte aligned offset
    g = plan_groups(pairs + [(4096, 8192, 2 * kb, kb, 8, 0, 512)])
    assert len(g) == 2 and g[0]["aligned16"] and not g[1]["aligned16"]
    assert g[1]["src_off"] == 1 and g[1]["nwords"] == 64
    assert plan_groups([(0, 0, 12, 12, 0, 0, 12)]) is None  # not 8-byte aligned: torch


def test_many_transfers_cpu_fallback_bytes_and_stats(engines):
    a, b, ka, kb = engines
    import numpy as np
    rng = np.random.default_rng(0)
    for _ in range(20):
        l, r = rng.choice(16, 5, replace=False), rng.choice(16, 5, replace=False)
        st = a.transfer("READ", "ipc-b", l, r, layers=range(3))
        assert st.bytes == 3 * 5 * 64 * 2 and st.num_blocks == 5 and st.num_layers == 3
        assert all(torch.equal(ka[n][l], kb[n][r]) for n in ka)


def test_check_block_ids_large_arrays_numpy_path():
    import numpy as np

    from transfer.blocks import validate_block_ids as check_block_ids
    ids = np.random.default_rng(0).permutation(1000)[:300]
    assert check_block_ids(ids, 1000) is ids
    dup = ids.copy()
    dup[-1] = dup[0]
    with pytest.raises(BlockIdError, match="duplicate"):
        check_block_ids(dup, 1000)
    with pytest.raises(BlockIdError, match="out of range"):
        check_block_ids(ids, 999 if ids.max() == 999 else int(ids.max()))
