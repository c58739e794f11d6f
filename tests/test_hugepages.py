"""Registered host memory on transparent huge pages (transfer.hugepages): bytes kept,
pages really collapsed, READs and WRITEs through such a cache byte-exact."""

import mmap

import numpy as np
import pytest

from transfer.connector.config import PdConfig
from transfer.hugepages import anon_huge_bytes, collapse, huge_page_size

MIB = 1 << 20


def _populated(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """Private anonymous memory touched as small pages first, as an allocator leaves it."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(mm, dtype=np.uint8)
    arr[:] = np.random.default_rng(3).integers(0, 256, nbytes, dtype=np.uint8)
    return mm, arr


def _supported(res) -> None:
    """Skip where the kernel has no MADV_COLLAPSE or could collapse nothing at all (no
    free 2 MiB pages on this host): what is left to check is that claims are true."""
    if res.error and ("not supported" in res.error or res.collapsed == 0):
        pytest.skip(res.error)


def test_collapse_keeps_the_bytes_and_backs_the_range_with_huge_pages():
    mm, arr = _populated(16 * MIB)
    want = arr.copy()
    res = collapse([(arr.ctypes.data, arr.nbytes)])
    _supported(res)
    huge = huge_page_size()
    assert res.requested >= 16 * MIB - 2 * huge and res.requested % huge == 0
    assert res.collapsed > 0, res.describe()
    assert anon_huge_bytes(arr.ctypes.data, arr.nbytes) >= res.collapsed
    assert np.array_equal(arr, want)
    del arr
    mm.close()


def test_a_range_smaller_than_a_huge_page_asks_nothing():
    mm, arr = _populated(1 * MIB)
    res = collapse([(arr.ctypes.data + 4096, 64 * 1024)])
    assert res.requested == 0 and res.collapsed == 0 and res.error is None
    del arr
    mm.close()


def test_kv_huge_pages_key_defaults_on_takes_only_booleans_and_the_environment():
    assert PdConfig.from_extra({}, env={}).kv_huge_pages is True
    assert PdConfig.from_extra({"kv_huge_pages": False}, env={}).kv_huge_pages is False
    with pytest.raises(ValueError, match="kv_huge_pages"):
        PdConfig.from_extra({"kv_huge_pages": "yes"}, env={})
    off = {"PDSIDECAR_KV_HUGE_PAGES": "0"}
    assert PdConfig.from_extra({}, env=off).kv_huge_pages is False
    assert PdConfig.from_extra({"kv_huge_pages": True}, env=off).kv_huge_pages is True  # the key wins
    with pytest.raises(ValueError, match="PDSIDECAR_KV_HUGE_PAGES"):
        PdConfig.from_extra({}, env={"PDSIDECAR_KV_HUGE_PAGES": "maybe"})


def test_transfers_through_a_collapsed_cache_are_byte_exact():
    """A NIXL engine with huge_pages=True: its cache collapsed before registration,
    READs from and WRITEs to a peer (whose cache stays on small pages) byte-exact."""
    pytest.importorskip("nixl")
    from transfer.nixl_engine import NixlTransferEngine
    from transfer.peerproc import CacheConfig, PeerProcess, make_cache

    layers, nb, bl = 2, 64, 64 * 1024  # 8 MiB per cache
    peer = PeerProcess("nixl", "huge-target", CacheConfig(layers, nb, bl, seed=5))
    buf, caches = make_cache(CacheConfig(layers, nb, bl, seed=6))
    eng = NixlTransferEngine("huge-init", huge_pages=True)
    try:
        eng.register_kv_caches(caches)
        res = eng.huge_pages_result
        assert res is not None
        _supported(res)
        assert res.collapsed > 0, res.describe()
        assert anon_huge_bytes(buf.data_ptr(), buf.numel()) >= res.collapsed
        eng.add_peer(peer.info)
        peer.call("add_peer", eng.local_info())
        lids, rids = list(range(10, 42)), list(range(30, 62))
        eng.transfer("READ", peer.name, lids, rids, timeout_s=10)
        raw = np.frombuffer(peer.call("blocks", rids), dtype=np.uint8).reshape(layers, len(rids), bl)
        assert np.array_equal(buf[:, lids].numpy(), raw)
        buf[:, 0:8] = 17
        eng.transfer("WRITE", peer.name, list(range(8)), list(range(8)), timeout_s=10)
        raw = np.frombuffer(peer.call("blocks", list(range(8))), dtype=np.uint8)
        assert (raw == 17).all()
    finally:
        eng.close()
        peer.close()
