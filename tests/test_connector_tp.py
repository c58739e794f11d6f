"""PdConnector worker halves over real NIXL agents in one process (no vLLM engines).

Heterogeneous TP both ways (prefill TP 2 -> decode TP 1 and prefill TP 1 -> decode
TP 2): the decode workers READ head slices of the prefill blocks into the right
place, and every prefill rank frees its blocks after the expected notifications.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nixl._api")

from transfer.connector.config import PdConfig  # noqa: E402
from transfer.connector.metadata import PdConnectorMetadata, RecvJob, RemoteSource  # noqa: E402
from transfer.connector.worker import PdConnectorWorker  # noqa: E402
from transfer.errors import FailureReason  # noqa: E402

HEADS, N, HS, LAYERS, NB = 4, 16, 8, 3, 12
COMPAT = {"model": "TinyForTest", "dtype": "float16", "block_size": N, "num_kv_heads": HEADS,
          "head_size": HS, "is_mla": False, "kv_layout": "HND"}


def make_worker(engine_id: str, rank: int, tp: int, seed: int):
    cfg = PdConfig.from_extra({"protocol": "rdma", "spin_wait_us": 0}, env={})
    w = PdConnectorWorker(cfg, engine_id=engine_id, tp_rank=rank, tp_size=tp, compat=COMPAT)
    g = torch.Generator().manual_seed(seed)
    # CPU attention backend layout: [num_blocks, kv_heads_on_rank, block_size, 2*head_size]
    caches = {f"model.layers.{i}.attn": torch.randn(NB, HEADS // tp, N, 2 * HS, generator=g,
                                                      dtype=torch.float32).half()
              for i in range(LAYERS)}
    w.register_kv_caches(caches)
    return w, caches


def src_for(tp: int, rids) -> RemoteSource:
    return RemoteSource(engine_id="P", request_id="req-p", host="127.0.0.1", port=1,
                        block_ids=tuple(rids), num_tokens=len(rids) * N, tp_size=tp,
                        dp_rank=0, lease_s=60.0, block_size=N)


def drive(decoders, prefills, rid="d", timeout=20.0):
    """Step all workers until every decoder reported ``rid`` and every prefill freed."""
    deadline = time.monotonic() + timeout
    got = {id(w): None for w in decoders}
    freed = {id(w): False for w in prefills}
    while time.monotonic() < deadline:
        for w in decoders:
            s, r, f = w.get_transfer_results(set())
            if rid in r:
                got[id(w)] = "failed" if rid in f else "ok"
        for w in prefills:
            s, _, _ = w.get_transfer_results({"req-p"})
            if "req-p" in s:
                freed[id(w)] = True
        if all(got.values()) and all(freed.values()):
            return got, freed
        time.sleep(0.001)
    return got, freed


def setup_prefill(prefills):
    for w in prefills:
        w.start_load_kv(PdConnectorMetadata(send={"req-p": 3}))


@pytest.mark.parametrize("p_tp,d_tp", [(2, 1), (1, 2), (2, 2)])
def test_heterogeneous_tp_read(p_tp, d_tp):
    prefills = [make_worker("P", r, p_tp, seed=10 + r) for r in range(p_tp)]
    decoders = [make_worker("D", r, d_tp, seed=100 + r) for r in range(d_tp)]
    try:
        setup_prefill([w for w, _ in prefills])
        rids, lids = [7, 2, 3], [0, 5, 6]
        for w, _ in decoders:
            rem = w._add_remote(("127.0.0.1", 1), [pw.desc for pw, _ in prefills])
            w._submit(RecvJob("d", src_for(p_tp, rids), lids, rids), rem)
        got, freed = drive([w for w, _ in decoders], [w for w, _ in prefills])
        assert all(v == "ok" for v in got.values()), got
        assert all(freed.values()), "prefill ranks did not get all notifications"
        # full model view: concatenate heads over ranks
        for name in prefills[0][1]:
            p_full = torch.cat([c[name] for _, c in prefills], dim=1)
            d_full = torch.cat([c[name] for _, c in decoders], dim=1)
            for lb, rb in zip(lids, rids):
                assert torch.equal(d_full[lb], p_full[rb]), (name, lb, rb)
            assert not torch.equal(d_full[1], p_full[1])  # untouched blocks stay
        res = decoders[0][0].take_worker_meta().results["d"]
        assert res["bytes"] > 0 and res["error"] == ""
    finally:
        for w, _ in prefills + decoders:
            w.shutdown()


def test_block_ids_out_of_range_fail_cleanly():
    (p, _), (d, _) = make_worker("P", 0, 1, 1), make_worker("D", 0, 1, 2)
    try:
        rem = d._add_remote(("127.0.0.1", 1), [p.desc])
        d._submit(RecvJob("d", src_for(1, [NB + 5]), [0], [NB + 5]), rem)
        _, r, f = d.get_transfer_results(set())
        assert "d" in r and "d" in f
        assert d.take_worker_meta().results["d"]["error"] == FailureReason.BLOCK_RANGE
        assert d.take_stats().data["failures"] == {FailureReason.BLOCK_RANGE: 1}
    finally:
        p.shutdown()
        d.shutdown()


def test_prefill_lease_expiry_frees_and_counts():
    p, _ = make_worker("P", 0, 1, 3)
    try:
        p.start_load_kv(PdConnectorMetadata(send={"old": 4}))
        s, _, _ = p.get_transfer_results({"old"})
        assert s == set()  # held: only the scheduler's lease decides
        p.start_load_kv(PdConnectorMetadata(expired={"old"}))
        s, _, _ = p.get_transfer_results({"old"})
        assert s == {"old"}
        st = p.take_stats().data
        assert st["expired_blocks"] == 4 and st["expired_reqs"] == 1
    finally:
        p.shutdown()


def test_token_major_cache_refuses_heterogeneous_tp():
    """A cache where a head is not one byte range of a block (NHD) is never sliced:
    a peer with another TP size is refused at handshake with a clear reason."""
    from transfer.errors import PeerRefused
    cfg = PdConfig.from_extra({"protocol": "rdma"}, env={})
    d = PdConnectorWorker(cfg, engine_id="D", tp_rank=0, tp_size=2, compat=COMPAT)
    p, _ = make_worker("P", 0, 1, seed=5)
    try:
        # FLASH_ATTN-style K/V split, token-major: [2, blocks, tokens, heads, dim]
        d.register_kv_caches({f"model.layers.{i}.attn": torch.zeros(2, NB, N, HEADS // 2, HS)
                              for i in range(LAYERS)})
        assert d.bytes_per_head == 0
        with pytest.raises(PeerRefused, match="HND") as e:
            d._add_remote(("127.0.0.1", 1), [p.desc])
        assert e.value.reason == "mismatch"
    finally:
        p.shutdown()
        d.shutdown()


def test_prefill_lease_runs_on_the_monotonic_clock(monkeypatch):
    """A wall-clock step on the prefill host (NTP, an injected +1 h) does not end a
    lease early: the worker holds the blocks until the scheduler's (monotonic) lease
    says otherwise."""
    import transfer.connector.pull_worker as cw
    p, _ = make_worker("P", 0, 1, 6)
    try:
        p.start_load_kv(PdConnectorMetadata(send={"r": 2}))
        real = time.time
        monkeypatch.setattr(cw.time, "time", lambda: real() + 3600)
        s, _, _ = p.get_transfer_results({"r"})
        assert "r" not in s and "r" in p._sending
    finally:
        monkeypatch.undo()
        p.shutdown()
