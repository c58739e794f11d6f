"""Real two-process transfers on CPU with real NIXL agents (UCX)."""

import asyncio
import importlib.util
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("nixl")

from transfer.errors import (BlockIdError, TransferFailedError, TransferTimeoutError,
                             UnknownPeerError, UnregisteredMemoryError)
from transfer.layout import Region
from transfer.nixl_engine import NixlTransferEngine
from transfer.peerproc import CacheConfig, PeerProcess, make_cache

L, NB, BL = 3, 64, 2048


@pytest.fixture(scope="module")
def pair():
    peer = PeerProcess("nixl", "target-a", CacheConfig(L, NB, BL, seed=7))
    buf, caches = make_cache(CacheConfig(L, NB, BL, seed=1))
    eng = NixlTransferEngine("init-a")
    eng.register_kv_caches(caches)
    eng.add_peer(peer.info)
    peer.call("add_peer", eng.local_info())
    yield eng, buf, peer
    eng.close()
    peer.close()


def _remote_blocks(peer, ids):
    raw = peer.call("blocks", list(ids))
    return np.frombuffer(raw, dtype=np.uint8).reshape(L, len(ids), BL)


def test_read_random_noncontiguous(pair):
    eng, buf, peer = pair
    rng = np.random.default_rng(0)
    rids = rng.choice(NB, 20, replace=False)
    lids = rng.choice(NB, 20, replace=False)
    st = eng.transfer("READ", peer.name, lids, rids, timeout_s=10, request_id="r1")
    assert st.state == "DONE" and st.bytes == L * 20 * BL and st.descriptors == L * 20
    assert np.array_equal(buf[:, lids].numpy(), _remote_blocks(peer, rids))


def test_write_subset_of_layers_with_notification(pair):
    eng, buf, peer = pair
    lids, rids = [5, 6, 7, 30], [40, 41, 2, 3]
    before = _remote_blocks(peer, rids)
    h = eng.write_blocks(peer.name, lids, rids, layers=[1], notif=b"req-w:1")
    eng.wait(h, timeout_s=10)
    after = _remote_blocks(peer, rids)
    assert np.array_equal(after[1], buf[1, lids].numpy())
    assert np.array_equal(after[0], before[0]) and np.array_equal(after[2], before[2])
    notifs = peer.call("notifs", 1, 10.0)
    assert notifs == {eng.name: [b"req-w:1"]}


def test_many_concurrent_reads_and_notifs(pair):
    eng, buf, peer = pair
    handles = []
    for i in range(32):
        lid, rid = i, (i * 7) % NB
        handles.append((lid, rid, eng.read_blocks(peer.name, [lid], [rid], notif=f"c{i}")))
    for _, _, h in handles:
        eng.wait(h, timeout_s=10)
    remote = _remote_blocks(peer, [rid for _, rid, _ in handles])
    assert np.array_equal(buf[:, [lid for lid, _, _ in handles]].numpy(), remote)
    got = peer.call("notifs", 32, 10.0)[eng.name]
    assert sorted(got) == sorted(f"c{i}".encode() for i in range(32))


def _lane_clean(eng, timeout_s=10.0):
    """Wait (explicit timeout) until the flush READs the engine posted are over."""
    deadline = time.monotonic() + timeout_s
    while eng._lane.pending and time.monotonic() < deadline:
        eng._lane.reap()
        time.sleep(0.001)
    assert eng._lane.pending == 0


def test_a_read_after_a_notification_completes_inside_its_post(pair):
    """A notification leaves UCX's TCP endpoint owing a flush, which NIXL would make
    the next READ wait for (a round trip to the peer); the engine pays it with a flush
    READ right after the notification (transfer.nixl_lane), so the next READ over CMA
    completes inside its post, as one with no notification before it does."""
    eng, buf, peer = pair
    inside = 0
    for i in range(10):
        eng.send_notif(peer.name, f"lane-{i}")
        _lane_clean(eng)
        h = eng.read_blocks(peer.name, [i], [i + 20])
        inside += h.done
        eng.wait(h, timeout_s=10)
    assert np.array_equal(buf[:, :10].numpy(), _remote_blocks(peer, range(20, 30)))
    assert inside >= 8, f"{inside}/10 READs completed inside their post"
    got = peer.call("notifs", 10, 10.0)[eng.name]
    assert sorted(got) == sorted(f"lane-{i}".encode() for i in range(10))


@pytest.mark.skipif(importlib.util.find_spec("pytest_asyncio") is None,
                    reason="needs pytest-asyncio (the GPU host's image has none)")
async def test_async_wait_does_not_block_loop(pair):
    eng, buf, peer = pair
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    hs = [eng.read_blocks(peer.name, [40 + i], [i]) for i in range(8)]
    stats = await asyncio.gather(*(eng.wait_async(h, timeout_s=10) for h in hs))
    t.cancel()
    assert all(s.state == "DONE" for s in stats) and ticks > 0
    assert np.array_equal(buf[:, 40:48].numpy(), _remote_blocks(peer, range(8)))


def test_plans_per_layer_subset_and_slice(pair, monkeypatch):
    """Cached per-(layers, slices) plans give the right bytes, descriptors and data."""
    eng, buf, peer = pair
    monkeypatch.setattr("transfer.engine.MAX_PLANS_PER_PEER", 3)  # exercise the reset
    lids, rids = [9, 4, 11], [20, 2, 13]
    for layers in (None, [1], [0, 2], [1], range(3), (2, 0), None):
        st = eng.transfer("READ", peer.name, lids, rids, layers=layers, timeout_s=10)
        n = L if layers is None else len(set(layers))
        assert (st.bytes, st.descriptors, st.num_layers, st.num_blocks) == \
            (n * 3 * BL, n * 3, n, 3), layers
        assert np.array_equal(buf[:, lids].numpy(), _remote_blocks(peer, rids))
    assert len(eng._peers[peer.name].plans) <= 3
    # a byte slice inside each block: only that slice moves, on both sides
    buf[:, lids] = 0
    st = eng.transfer("READ", peer.name, lids, rids, layers=[2], local_slice=(512, 256),
                      remote_slice=(1024, 256), timeout_s=10)
    assert (st.bytes, st.descriptors, st.num_layers) == (3 * 256, 3, 1)
    got, want = buf[2, lids].numpy(), _remote_blocks(peer, rids)[2]
    assert np.array_equal(got[:, 512:768], want[:, 1024:1280])
    assert not got[:, :512].any() and not got[:, 768:].any()
    assert not buf[:2, lids].numpy().any()


def test_prepare_only_builds_and_releases_without_moving(pair):
    """`pdbench transfer --prepare-only`: every transfer is prepared, then released unposted."""
    _, _, peer = pair
    buf, caches = make_cache(CacheConfig(L, NB, BL, seed=3))
    eng = NixlTransferEngine("init-prepare-only")
    try:
        eng.register_kv_caches(caches)
        eng.add_peer(peer.info)
        eng.prepare_only()
        local0, remote0 = buf.clone(), _remote_blocks(peer, [4, 5, 6])
        h = eng.read_blocks(peer.name, [1, 2, 3], [4, 5, 6])
        assert h.done and h.stats.state == "DONE" and h.stats.descriptors == L * 3
        assert h.stats.prepare_us > 0
        eng.wait(eng.write_blocks(peer.name, [1, 2, 3], [4, 5, 6]), timeout_s=10)
        assert torch.equal(buf, local0)  # nothing was read into the local cache ...
        assert np.array_equal(_remote_blocks(peer, [4, 5, 6]), remote0)  # ... or written out
    finally:
        eng.close()


def test_bad_block_ids_and_unknown_peer(pair):
    eng, _, peer = pair
    with pytest.raises(BlockIdError, match="out of range"):
        eng.read_blocks(peer.name, [0], [NB])
    with pytest.raises(BlockIdError, match="duplicate block id 3"):
        eng.read_blocks(peer.name, [3, 3], [1, 2])
    with pytest.raises(BlockIdError, match="local"):
        eng.read_blocks(peer.name, [1, 2], [1])
    with pytest.raises(UnknownPeerError, match="nobody"):
        eng.read_blocks("nobody", [0], [0])
    with pytest.raises(ValueError, match="layers"):
        eng.read_blocks(peer.name, [0], [0], layers=[9])


def test_unregistered_memory(pair):
    eng, _, peer = pair
    fresh = NixlTransferEngine("unregistered")
    with pytest.raises(UnregisteredMemoryError):
        fresh.local_info()
    # a peer claiming regions it never registered
    info = fresh_info = eng.local_info()
    bogus = type(info)(name="liar", backend="nixl", mem_type="DRAM",
                       regions=[Region("x", 0x10, 4096, 4096, 4)],
                       agent_metadata=peer.info.agent_metadata)
    with pytest.raises(UnregisteredMemoryError, match="not registered"):
        eng.add_peer(bogus)
    with pytest.raises(UnregisteredMemoryError):
        eng.check_registered(0x10, 16)
    del fresh_info
    fresh.close()


def test_tp2_to_tp1_slices_from_two_peer_processes():
    """Heterogeneous TP across processes: one decode-side engine READs each of two
    prefill ranks' half blocks (their KV heads) into its halves of the same blocks, with
    the slices `tp_read_plan` makes; byte-exact and each rank notified."""
    from transfer.connector.tp_mapping import tp_read_plan

    heads, bph, layers, nb = 4, 512, 2, 16  # decode block = 4 heads x 512 B; 2 per rank
    plan = tp_read_plan(0, 1, 2, heads, False, bytes_per_head=bph)
    ranks = [PeerProcess("nixl", f"tp-rank{r}", CacheConfig(layers, nb, heads // 2 * bph, seed=20 + r))
             for r in range(2)]
    try:
        buf, caches = make_cache(CacheConfig(layers, nb, heads * bph, seed=9))
        eng = NixlTransferEngine("tp1-decode")
        eng.register_kv_caches(caches)
        names = {r: eng.add_peer(p.info) for r, p in enumerate(ranks)}
        for p in ranks:
            p.call("add_peer", eng.local_info())
        lids, rids = [3, 9, 4], [7, 1, 12]
        hs = [eng.read_blocks(names[s.remote_rank], lids, rids, local_slice=(s.local_offset, s.length),
                              remote_slice=(s.remote_offset, s.length), notif=f"req:{s.remote_rank}")
              for s in plan.slices]
        assert {s.remote_rank for s in plan.slices} == {0, 1}
        for h in hs:
            assert eng.wait(h, timeout_s=20).state == "DONE"
        for s in plan.slices:
            want = np.frombuffer(ranks[s.remote_rank].call("blocks", rids), dtype=np.uint8)
            want = want.reshape(layers, len(rids), -1)[:, :, s.remote_offset:s.remote_offset + s.length]
            got = buf[:, lids, s.local_offset:s.local_offset + s.length].numpy()
            assert np.array_equal(got, want)
            assert ranks[s.remote_rank].call("notifs", 1, 10.0)
        eng.close()
    finally:
        for p in ranks:
            p.close()


def test_peer_gone_mid_transfer():
    cfg = CacheConfig(4, 256, 64 * 1024, seed=3)
    peer = PeerProcess("nixl", "doomed", cfg)
    _, caches = make_cache(CacheConfig(4, 256, 64 * 1024, seed=4))
    eng = NixlTransferEngine("survivor")
    eng.register_kv_caches(caches)
    eng.add_peer(peer.info)
    eng.transfer("READ", "doomed", [0], [0], timeout_s=10)
    hs = [eng.read_blocks("doomed", list(range(256)), list(range(256))) for _ in range(4)]
    peer.kill()
    t0 = time.monotonic()
    outcomes = []
    for h in hs:
        try:
            eng.wait(h, timeout_s=5)
            outcomes.append("done")  # finished before the kill
        except (TransferFailedError, TransferTimeoutError) as e:
            outcomes.append(type(e).__name__)
    # new transfers to the dead peer fail fast or time out; nothing hangs
    try:
        eng.transfer("READ", "doomed", [1], [1], timeout_s=5)
        outcomes.append("done-after")
    except (TransferFailedError, TransferTimeoutError) as e:
        outcomes.append(type(e).__name__)
    assert time.monotonic() - t0 < 30
    assert outcomes[-1] != "done-after", outcomes
    eng.remove_peer("doomed")
    eng.close()


def test_idle_agent_does_not_busy_poll():
    """NIXL's Python API busy-polls a core per agent (pthrDelay=0); ours must not."""
    code = ("import time\n"
            "from transfer.nixl_engine import NixlTransferEngine\n"
            "e = NixlTransferEngine('idle-probe')\n"
            "t0 = time.process_time(); time.sleep(1.5)\n"
            "print(time.process_time() - t0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cpu_s = float(out.stdout.strip().splitlines()[-1])
    assert cpu_s < 0.75, f"idle NIXL agent used {cpu_s:.2f} CPU-s in 1.5 s"


def test_negative_progress_delay_is_rejected():
    with pytest.raises(ValueError, match="progress_delay_us"):
        NixlTransferEngine("bad-delay", progress_delay_us=-1)
