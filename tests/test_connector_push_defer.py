"""Push mode never waits inside the forward pass (issue 16).

Worker halves over real NIXL agents in one process. The prefill worker's handshake
with the decode engine is still in flight when ``save_kv_layer`` runs: the layers'
WRITEs are deferred (no wait), posted by a later step once the handshake completed,
and the decode side gets every byte; a handshake that fails ends the push cleanly
(the prefill frees its blocks, nothing is written). No WRITE starts once the step's
write-grant window (issue 16, push_grant.py) is over, deferred layers included.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nixl._api")

from transfer.connector.metadata import PdConnectorMetadata, PushRecvJob, PushSendStep  # noqa: E402

from test_connector_tp import make_worker  # noqa: E402

KEY = ("127.0.0.1", 1)


def push_outcome(p, d, timeout_s: float, freed: bool = False) -> tuple[str | None, bool]:
    """Step prefill worker ``p`` (request "p") and decode worker ``d`` (request "d") until
    the decode's load ended ("ok"/"failed") and the prefill freed its blocks, or timeout."""
    got = None
    deadline = time.monotonic() + timeout_s
    while not (got and freed) and time.monotonic() < deadline:
        s, _, _ = p.get_transfer_results({"p"})
        freed = freed or "p" in s
        _, r, f = d.get_transfer_results(set())
        if "d" in r:
            got = "failed" if "d" in f else "ok"
        time.sleep(0.002)
    return got, freed


def push_step(lids, rids) -> PushSendStep:
    return PushSendStep(req_id="p", push_id="pid", host=KEY[0], port=KEY[1], engine_id="D",
                        dp_rank=0, tp_size=1, local_ids=lids, remote_ids=rids, final=True,
                        valid_until=time.monotonic() + 60)


def forward(p, meta) -> None:
    """What vLLM does with a prefill step's metadata: start, save each layer, end."""
    p.start_load_kv(meta)
    for name in p._layer_index:
        p.save_layer(name, meta)
    p.end_step(meta)


def test_writes_deferred_until_the_handshake_completes():
    (p, pc), (d, dc) = make_worker("P", 0, 1, seed=1), make_worker("D", 0, 1, seed=2)
    try:
        d.start_load_kv(PdConnectorMetadata(push_recv={"d": PushRecvJob(
            "d", "pid", 2)}))
        fut: Future = Future()
        p._hs_futures[KEY] = fut  # the handshake is in flight
        lids, rids = [3, 4], [7, 8]
        forward(p, PdConnectorMetadata(push_send={"p": push_step(lids, rids)}))
        w = p._push_writes["p"]
        assert len(w.deferred) == len(p._layer_index) and not w.handles and not w.error
        for _ in range(5):  # later steps: still no peer, nothing posted, nothing freed
            s, _, _ = p.get_transfer_results(set())
            assert not w.handles and "p" not in s and not w.notified
        fut.set_result([d.desc])
        p.start_load_kv(PdConnectorMetadata(push_finished={"p"}))
        got, freed = push_outcome(p, d, 20)
        assert got == "ok" and freed
        for name in pc:
            for lb, rb in zip(lids, rids):
                assert torch.equal(dc[name][rb], pc[name][lb])
        assert d.take_worker_meta().results["d"]["bytes"] > 0
    finally:
        p.shutdown()
        d.shutdown()


def test_failed_handshake_ends_the_push_without_writing():
    (p, pc), (d, dc) = make_worker("P", 0, 1, seed=3), make_worker("D", 0, 1, seed=4)
    try:
        before = {n: t.clone() for n, t in dc.items()}
        fut: Future = Future()
        p._hs_futures[KEY] = fut
        forward(p, PdConnectorMetadata(push_send={"p": push_step([1], [2])}))
        fut.set_exception(ConnectionError("decode control plane unreachable"))
        p.start_load_kv(PdConnectorMetadata(push_finished={"p"}))
        freed = False
        deadline = time.monotonic() + 20
        while not freed and time.monotonic() < deadline:
            s, _, _ = p.get_transfer_results({"p"})
            freed = "p" in s
            time.sleep(0.002)
        assert freed and "p" not in p._push_writes
        assert all(torch.equal(before[n], dc[n]) for n in dc)
    finally:
        p.shutdown()
        d.shutdown()


@pytest.mark.parametrize("deferred", [False, True])
def test_no_write_starts_after_the_write_grant_window(deferred):
    """A step whose window (time the grant was asked + write lease, the prefill's
    monotonic clock) is over posts nothing, also for layers deferred behind a handshake
    that completes too late; the decode is told (``expired``) and its blocks keep
    their content."""
    (p, pc), (d, dc) = make_worker("P", 0, 1, seed=5), make_worker("D", 0, 1, seed=6)
    try:
        before = {n: t.clone() for n, t in dc.items()}
        d.start_load_kv(PdConnectorMetadata(push_recv={"d": PushRecvJob("d", "pid", 2)}))
        now = [1000.0]
        p.clock = lambda: now[0]
        step = push_step([3, 4], [7, 8])
        step.valid_until = 1010.0
        fut: Future = Future()
        if deferred:
            p._hs_futures[KEY] = fut
        else:
            p._add_remote(KEY, [d.desc])
            now[0] = 1010.5
        forward(p, PdConnectorMetadata(push_send={"p": step}))
        if deferred:
            assert len(p._push_writes["p"].deferred) == len(p._layer_index)
            now[0] = 1010.5
            fut.set_result([d.desc])
        p.start_load_kv(PdConnectorMetadata(push_finished={"p"}))
        got, freed = push_outcome(p, d, 20)
        assert got == "failed" and freed and not p._push_writes
        assert d.take_worker_meta().results["d"]["error"] == "expired"
        assert all(torch.equal(before[n], dc[n]) for n in dc)
    finally:
        p.shutdown()
        d.shutdown()
