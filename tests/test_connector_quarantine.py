"""A READ that may still write is never forgotten (issue 16).

Worker halves over real NIXL agents in one process (as in test_connector_tp.py). The
"delayed peer" (transfer.late_peer.LateReads, the engines' test hook) holds the
decode worker's READ back for LATE_S: the real NIXL READ is posted only then, long
after the worker's ``transfer_timeout_s``, so its bytes land in the decode blocks
late. The worker must not report the load (failed or finished) to vLLM before the
engine confirms the READ is over: vLLM would hand those blocks to another request (or
recompute into them) while the late copy still writes.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nixl._api")

from transfer.connector.config import PdConfig  # noqa: E402
from transfer.connector.metadata import RecvJob  # noqa: E402
from transfer.connector.worker import PdConnectorWorker  # noqa: E402
from transfer.errors import FailureReason  # noqa: E402
from transfer.late_peer import LateReads  # noqa: E402

from test_connector_tp import COMPAT, HEADS, LAYERS, NB, N, HS, src_for  # noqa: E402


LATE_S = 3.0  # far past the workers' 0.2 s transfer timeout


def make_worker(engine_id: str, seed: int, **extra):
    cfg = PdConfig.from_extra({"protocol": "rdma", **extra}, env={})
    w = PdConnectorWorker(cfg, engine_id=engine_id, tp_rank=0, tp_size=1, compat=COMPAT)
    g = torch.Generator().manual_seed(seed)
    caches = {f"model.layers.{i}.attn": torch.randn(NB, HEADS, N, 2 * HS, generator=g,
                                                      dtype=torch.float32).half()
              for i in range(LAYERS)}
    w.register_kv_caches(caches)
    return w, caches


def test_timed_out_read_is_reported_only_after_it_ended():
    (p, pc), (d, dc) = make_worker("P", 1), make_worker("D", 2, transfer_timeout_s=0.2)
    slow = d.engine = LateReads(d.engine, LATE_S)
    try:
        rem = d._add_remote(("127.0.0.1", 1), [p.desc])
        rids, lids = [4, 5], [1, 2]
        d._submit(RecvJob("d", src_for(1, rids), lids, rids), rem)
        # past the timeout, the peer still holding the READ: quarantined, not reported
        deadline = time.monotonic() + 20
        while "d" not in d._quarantine and time.monotonic() < deadline:
            _, r, f = d.get_transfer_results(set())
            assert "d" not in r and "d" not in f
            time.sleep(0.01)
        assert "d" in d._quarantine and "d" not in d._inflight
        for _ in range(20):
            _, r, f = d.get_transfer_results(set())
            assert "d" not in r and "d" not in f
        name = next(iter(pc))
        assert not torch.equal(dc[name][1], pc[name][4])
        got = None  # the peer answers after LATE_S: the late copy lands
        deadline = time.monotonic() + 20
        while got is None and time.monotonic() < deadline:
            _, r, f = d.get_transfer_results(set())
            if "d" in r:
                got = "failed" if "d" in f else "ok"
            time.sleep(0.005)
        assert got == "failed"
        assert d.take_worker_meta().results["d"]["error"] == FailureReason.TIMEOUT
        for name in pc:  # it did write late: reporting earlier would have been unsafe
            assert torch.equal(dc[name][1], pc[name][4]) and torch.equal(dc[name][2], pc[name][5])
        assert not d._quarantine
    finally:
        d.engine = slow.real
        p.shutdown()
        d.shutdown()


def test_nixl_read_counts_as_released_only_once_it_ended(monkeypatch):
    """NIXL accepts releasing an active transfer while UCX goes on writing (measured
    over TCP: blocks kept landing after the release). A timed-out READ is therefore
    "released" only once NIXL reports it over, and by then every byte has landed."""
    from transfer.errors import TransferFailedError
    from transfer.nixl_engine import NixlTransferEngine
    from transfer.peerproc import CacheConfig, make_cache, start_peer
    monkeypatch.setenv("UCX_TLS", "tcp,self")  # a READ outlives its post (restored after)
    cfg = CacheConfig(layers=2, num_blocks=160, block_len=256 * 1024, seed=1)
    peer = start_peer("nixl", "peer-late", cfg, protocol="tcp")
    eng = NixlTransferEngine("local-late")
    try:
        buf, caches = make_cache(CacheConfig(layers=2, num_blocks=160, block_len=256 * 1024,
                                             seed=2))
        eng.register_kv_caches(caches)
        name = eng.add_peer(peer.info)
        ref, _ = make_cache(cfg)
        ids = list(range(160))
        h = eng.read_blocks(name, ids, ids)
        eng._on_timeout(h)  # the caller gave up at once, while the READ runs
        with pytest.raises(TransferFailedError):
            eng.poll(h)
        deadline = time.monotonic() + 60
        while not eng.released(h) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert h.native is None
        assert torch.equal(buf, ref)  # nothing was still to land once released said so
    finally:
        eng.close()
        peer.close()


def test_rehandshake_keeps_a_peer_with_transfers_until_they_end():
    """A re-handshake (e.g. another engine id at that address) retires the old peer, but
    removes it only once no READ of a (quarantined) load uses it any more."""
    (p, _), (d, _) = make_worker("P", 5), make_worker("D", 6, transfer_timeout_s=0.2)
    slow = d.engine = LateReads(d.engine, LATE_S)
    try:
        rem = d._add_remote(("127.0.0.1", 1), [p.desc])
        d._submit(RecvJob("d", src_for(1, [2]), [2], [2]), rem)
        rem.peers = {0: "an-older-agent"}  # as if the address had served another engine
        slow.real.peers = lambda: [p.desc.peer.name]  # (that agent was never added)
        d._inflight["d"].handles[0].stats.peer = "an-older-agent"
        d._add_remote(("127.0.0.1", 1), [p.desc])  # handshake again
        assert d._retired == {"an-older-agent"}
        deadline = time.monotonic() + 20
        while "d" not in d._quarantine and time.monotonic() < deadline:
            d.get_transfer_results(set())
            time.sleep(0.01)
        assert "d" in d._quarantine and d._retired == {"an-older-agent"}
        got = None  # until the READ ends after LATE_S
        while got is None and time.monotonic() < deadline + 20:
            _, r, f = d.get_transfer_results(set())
            got = ("failed" if "d" in f else "ok") if "d" in r else None
            time.sleep(0.005)
        assert got == "failed" and not d._retired  # removed once no READ used it
    finally:
        d.engine = slow.real
        p.shutdown()
        d.shutdown()
