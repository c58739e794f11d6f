"""GPU-only: CUDA IPC path (Triton and torch), VRAM registration with NIXL, auto routing."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from transfer.peerproc import CacheConfig, PeerProcess, make_cache  # noqa: E402

L, NB, BL = 4, 128, 64 * 1024


def _remote(peer, ids):
    return np.frombuffer(peer.call("blocks", list(ids)), dtype=np.uint8).reshape(L, len(ids), BL)


@pytest.fixture(scope="module")
def ipc_peer():
    p = PeerProcess("ipc", "gpu-target-ipc", CacheConfig(L, NB, BL, mem="VRAM", seed=5))
    yield p
    p.close()


@pytest.mark.parametrize("use_triton", [True, False])
def test_ipc_read_write(ipc_peer, use_triton):
    from transfer.ipc import IpcTransferEngine
    buf, caches = make_cache(CacheConfig(L, NB, BL, mem="VRAM", seed=9))
    eng = IpcTransferEngine(f"gpu-init-{use_triton}", use_triton=use_triton)
    eng.register_kv_caches(caches)
    eng.add_peer(ipc_peer.info)
    rng = np.random.default_rng(1)
    lids, rids = rng.choice(NB, 40, replace=False), rng.choice(NB, 40, replace=False)
    st = eng.transfer("READ", ipc_peer.name, lids, rids, timeout_s=20)
    assert st.state == "DONE" and st.bytes == L * 40 * BL
    assert np.array_equal(buf[:, lids].cpu().numpy(), _remote(ipc_peer, rids))
    # write a subset of layers into other remote blocks
    w_l, w_r = rng.choice(NB, 8, replace=False), rng.choice(NB, 8, replace=False)
    eng.transfer("WRITE", ipc_peer.name, w_l, w_r, layers=[0, 2], timeout_s=20)
    got = _remote(ipc_peer, w_r)
    assert np.array_equal(got[[0, 2]], buf[[0, 2]][:, w_l].cpu().numpy())
    eng.close()


def test_ipc_kernel_slices_in_process():
    from transfer.ipc import IpcTransferEngine
    a_buf, a = make_cache(CacheConfig(2, 16, 4096, mem="VRAM", seed=1))
    b_buf, b = make_cache(CacheConfig(2, 16, 4096, mem="VRAM", seed=2))
    ea, eb = IpcTransferEngine("sa", use_triton=True), IpcTransferEngine("sb", use_triton=True)
    ea.register_kv_caches(a)
    eb.register_kv_caches(b)
    ea.add_peer(_local_info_without_handles(eb))
    ea.transfer("READ", "sb", [3], [7], local_slice=(0, 1024), remote_slice=(2048, 1024))
    torch.cuda.synchronize()
    assert torch.equal(a_buf[:, 3, :1024], b_buf[:, 7, 2048:3072])


def _local_info_without_handles(e):
    info = e.local_info()
    info.ipc_handles = b""  # same process: mapped directly
    return info


def test_nixl_vram_and_auto_routing():
    pytest.importorskip("nixl")
    from transfer.nixl_engine import NixlTransferEngine
    from transfer.select import RoutingTransferEngine
    peer = PeerProcess("auto", "gpu-target-auto", CacheConfig(L, NB, BL, mem="VRAM", seed=6))
    try:
        buf, caches = make_cache(CacheConfig(L, NB, BL, mem="VRAM", seed=7))
        n = NixlTransferEngine("gpu-nixl-vram")
        n.register_kv_caches(caches)
        assert n.mem_type == "VRAM"
        n.add_peer(peer.info)
        st = n.transfer("READ", peer.name, [1, 2, 3], [10, 20, 30], timeout_s=60)
        assert st.state == "DONE"
        assert np.array_equal(buf[:, [1, 2, 3]].cpu().numpy(), _remote(peer, [10, 20, 30]))
        n.close()
        buf2, caches2 = make_cache(CacheConfig(L, NB, BL, mem="VRAM", seed=8))
        r = RoutingTransferEngine("gpu-auto-init", protocol="auto")
        r.register_kv_caches(caches2)
        r.add_peer(peer.info)
        assert r.backend_for(peer.name) == "ipc"
        st = r.transfer("READ", peer.name, [4, 5], [50, 60], notif=b"req-g:1", timeout_s=20)
        assert st.backend.startswith("ipc")
        assert np.array_equal(buf2[:, [4, 5]].cpu().numpy(), _remote(peer, [50, 60]))
        notifs = peer.call("notifs", 1, 20.0)
        assert notifs == {"gpu-auto-init": [b"req-g:1"]}
        r.close()
    finally:
        peer.close()


def test_ipc_handles_are_plain_and_forged_ones_fall_back(ipc_peer):
    """Handles travel as raw CUipcMemHandle bytes (no pickle); a forged message or one
    whose handle does not open on our GPU is refused, and ``auto`` then routes NIXL."""
    from transfer import ipc_handles
    from transfer.errors import TransferError
    from transfer.ipc import IpcTransferEngine
    uuid_, exports = ipc_handles.decode(ipc_peer.info.ipc_handles)
    assert exports and all(len(e.handle) == 64 for e in exports)
    _, caches = make_cache(CacheConfig(L, NB, BL, mem="VRAM", seed=3))
    eng = IpcTransferEngine("gpu-forged")
    eng.register_kv_caches(caches)
    forged = ipc_handles.encode(uuid_, [ipc_handles.IpcExport(e.ptr, e.nbytes, e.offset,
                                                              bytes(64)) for e in exports])
    bad = [forged, b"\x80\x04pickle", ipc_handles.encode(b"\x01" * 16, exports)]
    import dataclasses
    for raw in bad:
        with pytest.raises(TransferError):
            eng.add_peer(dataclasses.replace(ipc_peer.info, ipc_handles=raw))
    eng.close()


def test_copy_waits_for_work_queued_on_the_compute_stream(ipc_peer):
    """A WRITE posted right after a (slow) kernel that fills the block on the caller's
    stream carries the filled bytes, not the stale ones: the copy stream waits for the
    caller's stream on the device (the push path posts from ``save_kv_layer``).

    Each round fills its own source block: like the engine, which never rewrites a
    block while a push of it is in flight (blocks are held until the WRITE is done).
    Rewriting one source block every round is a write-after-read race of the test, not
    of the engine: measured on the H100, the copy then also sees the next round's poison.
    """
    from transfer.ipc import IpcTransferEngine
    buf, caches = make_cache(CacheConfig(L, NB, BL, mem="VRAM", seed=12))
    eng = IpcTransferEngine("gpu-order", use_triton=True)
    eng.register_kv_caches(caches)
    eng.add_peer(ipc_peer.info)
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        for rnd in range(3):
            src = 7 + rnd
            buf[:, src].fill_(0x11)  # poison, then a long kernel, then the real KV
            torch.cuda._sleep(200_000_000)  # ~0.1 s of device time on the compute stream
            buf[:, src].fill_(0x60 + rnd)
            h = eng.write_blocks(ipc_peer.name, [src], [90 + rnd])
    deadline = __import__("time").monotonic() + 30
    while not eng.poll(h) and __import__("time").monotonic() < deadline:
        pass
    torch.cuda.synchronize()
    for rnd in range(3):
        got = _remote(ipc_peer, [90 + rnd])
        assert (got == 0x60 + rnd).all(), f"round {rnd}: stale bytes pushed"
    eng.close()


def test_nixl_vram_write_posts_after_the_compute_stream():
    """Over NIXL (cross-host push) a WRITE out of a CUDA cache is posted only once the
    work queued before it on the caller's stream is done; the forward never blocks."""
    pytest.importorskip("nixl")
    import time

    from transfer.nixl_engine import NixlTransferEngine
    peer = PeerProcess("auto", "gpu-target-order", CacheConfig(L, NB, BL, mem="VRAM", seed=13))
    try:
        buf, caches = make_cache(CacheConfig(L, NB, BL, mem="VRAM", seed=14))
        n = NixlTransferEngine("gpu-nixl-order")
        n.register_kv_caches(caches)
        n.add_peer(peer.info)
        compute = torch.cuda.Stream()
        with torch.cuda.stream(compute):
            buf[:, 3].fill_(0x11)
            torch.cuda._sleep(400_000_000)
            buf[:, 3].fill_(0x5A)
            h = n.write_blocks(peer.name, [3], [77])
        assert h.post_after is not None  # the kernel was still running: post deferred
        deadline = time.monotonic() + 60
        while not n.poll(h) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert h.done and (_remote(peer, [77]) == 0x5A).all()
        n.close()
    finally:
        peer.close()
