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
