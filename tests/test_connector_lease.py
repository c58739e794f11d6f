"""The pull lease (issue 16): held on the prefill's monotonic clock, renewed by a
waiting decode, granted per read, refused once over. The scheduler's clock is
injected (``sched.clock``); the wall clock is moved by hours to show it plays no part.
The last tests run a real prefill scheduler (control server) and real NIXL workers."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from transfer.connector.metadata import PdConnectorMetadata, RecvJob
from transfer.errors import FailureReason, PeerRefused

from test_connector_unit import fake_request, good_params, sched

LEASE = 30.0


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Notes:
    """Stands in for the notifier: records what would go out."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, str, str]] = []

    def notify(self, host, port, receiver, message):
        self.sent.append((host, port, receiver, message))

    def release(self, host, port, receiver, request_id):
        self.notify(host, port, receiver, f"release:{request_id}")

    def shutdown(self):
        pass


def prefill_sched(clock: Clock):
    s = sched(kv_lease_s=LEASE)
    s.clock = clock
    delay, params = s.request_finished(
        fake_request("p1", 40, {"do_remote_decode": True}, "FINISHED_STOPPED"), [3, 4, 5])
    assert delay and params["pd_kv_lease_s"] == LEASE
    assert s.build_connector_meta(None).send == {"p1": 3}
    return s


def read(s, rid="p1"):
    s._on_notify("eng-x", "eng-d", f"read:{rid}".encode())


@pytest.mark.parametrize("wall_offset_s", [-3600.0, 0.0, 3600.0])
def test_lease_runs_on_the_prefill_monotonic_clock(monkeypatch, wall_offset_s):
    clock = Clock()
    s = prefill_sched(clock)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + wall_offset_s)
    clock.t += LEASE - 0.5
    assert s.build_connector_meta(None).expired == set()
    clock.t += 1.0  # past the lease, nothing renewed or read
    assert s.build_connector_meta(None).expired == {"p1"}
    assert s.build_connector_meta(None).expired == set()  # once
    with pytest.raises(PeerRefused) as e:
        read(s)
    assert e.value.reason == FailureReason.EXPIRED


def test_renewals_extend_and_a_read_grant_holds_a_full_lease():
    clock = Clock()
    s = prefill_sched(clock)
    for _ in range(12):  # the decode renews every lease/6 for 2 leases
        clock.t += LEASE / 6
        s._on_notify("eng-x", "eng-d", b"renew:p1,unknown")
        assert s.build_connector_meta(None).expired == set()
    assert s.get_stats().data["renewals"] == 12
    read(s)  # granted: held a whole lease from now
    clock.t += LEASE - 0.1
    assert s.build_connector_meta(None).expired == set()
    clock.t += 0.2
    assert s.build_connector_meta(None).expired == {"p1"}
    # once over, a renewal changes nothing
    s._on_notify("eng-x", "eng-d", b"renew:p1")
    with pytest.raises(PeerRefused):
        read(s)


def test_released_or_unknown_lease_refuses_reads():
    s = prefill_sched(Clock())
    s._on_notify("eng-x", "eng-d", b"release:p1")
    assert s.build_connector_meta(None).release == {"p1"}
    with pytest.raises(PeerRefused):
        read(s)
    with pytest.raises(PeerRefused):
        read(s, "never-was")
    # a finished send drops the lease; the gauge follows
    s.update_connector_output(SimpleNamespace(finished_sending={"p1"}, finished_recving=set(),
                                              kv_connector_worker_meta=None))
    assert s.get_stats().data["pending_reqs"] == 0


def test_decode_renews_while_queued_and_stops_once_allocated():
    clock = Clock()
    s = sched()
    s.clock, s.notifier = clock, Notes()
    req = fake_request("d1", 40, good_params(pd_kv_lease_s=6.0), computed=0)
    s.on_new_request(req)
    s.build_connector_meta(None)
    assert s.notifier.sent == []  # nothing due yet
    clock.t += 1.0  # lease/6
    s.build_connector_meta(None)
    assert s.notifier.sent == [("127.0.0.1", 5601, "eng-p", "renew:req-p-1")]
    clock.t += 0.5
    s.build_connector_meta(None)
    assert len(s.notifier.sent) == 1  # paced
    clock.t += 0.5
    s.build_connector_meta(None)
    assert len(s.notifier.sent) == 2
    # blocks allocated: the worker's read: takes over, renewals stop
    from test_connector_unit import FakeBlock
    s.update_state_after_alloc(req, SimpleNamespace(blocks=[[FakeBlock(i) for i in range(3)]]),
                               40)
    clock.t += 10.0
    s.build_connector_meta(None)
    assert len(s.notifier.sent) == 2


def test_decode_never_judges_expiry_by_its_clock():
    """A past (or absurd) wall-clock expiry in the params is no reason to recompute:
    only the prefill's answer to ``read:`` decides."""
    s = sched()
    req = fake_request("d2", 40, good_params(remote_blocks_expiry_time=1.0), computed=0)
    from test_connector_unit import FakeBlock
    s.update_state_after_alloc(req, SimpleNamespace(blocks=[[FakeBlock(i) for i in range(3)]]),
                               40)
    job = s.build_connector_meta(None).recv["d2"]
    assert job.error == "" and job.remote_ids == [5, 6, 7]


# ------------------------------------------------------------------ real control plane + NIXL

def _nixl_workers():
    pytest.importorskip("nixl._api")
    pytest.importorskip("torch")
    from test_connector_tp import make_worker
    return make_worker


@pytest.mark.parametrize("expired,early", [(False, False), (True, False), (False, True)])
def test_worker_reads_only_what_the_prefill_grants(expired, early):
    """Decode worker -> ``read:`` to a real prefill scheduler's control server -> READ
    over NIXL. A granted read is byte-exact; an expired lease is refused: the load fails
    (``expired``), no READ is posted and the decode blocks keep their content. ``early``:
    the scheduler already holds the grant (``granted_until``), the worker READs at once."""
    make_worker = _nixl_workers()
    from transfer.connector.metadata import RemoteSource
    from transfer.connector.scheduler import PdConnectorScheduler
    from transfer.connector.config import PdConfig
    p, pc = make_worker("P", 0, 1, seed=21)
    d, dc = make_worker("D", 0, 1, seed=22)
    clock = Clock()
    ps = PdConnectorScheduler(PdConfig.from_extra({"kv_lease_s": LEASE}, env={}), engine_id="P",
                              block_size=16, tp_size=1, dp_rank=0)
    try:
        ps.clock = clock
        ps.set_workers_metadata({0: p.desc})
        ps.request_finished(fake_request("req-p", 48, {"do_remote_decode": True},
                                         "FINISHED_STOPPED"), [7, 2, 3])
        p.start_load_kv(ps.build_connector_meta(None))
        if expired:
            clock.t += LEASE + 1
            p.start_load_kv(ps.build_connector_meta(None))
        before = {n: t.clone() for n, t in dc.items()}
        src = RemoteSource(engine_id="P", request_id="req-p", host="127.0.0.1", port=ps.port,
                           block_ids=(7, 2, 3), num_tokens=48, tp_size=1, dp_rank=0,
                           lease_s=LEASE, block_size=16)
        job = RecvJob("d", src, [0, 5, 6], [7, 2, 3])
        if early:
            from transfer.connector.control_client import send_read
            job.granted_until = time.monotonic() + LEASE
            send_read(src, "D", 5.0)
        d.start_load_kv(PdConnectorMetadata(recv={"d": job}))
        deadline = time.monotonic() + 30
        got = None
        while got is None and time.monotonic() < deadline:  # not a timed assertion: a bound
            _, r, f = d.get_transfer_results(set())
            if "d" in r:
                got = "failed" if "d" in f else "ok"
            p.get_transfer_results(set())
            time.sleep(0.002)
        res = d.take_worker_meta().results["d"]
        assert (d._grant_pool is None) == early  # granted on arrival: the worker never asked
        if expired:
            assert got == "failed" and res["error"] == FailureReason.EXPIRED, res
            assert res["bytes"] == 0
            assert all(t.equal(before[n]) for n, t in dc.items())
        else:
            assert got == "ok" and res["error"] == "", res
            for n in pc:
                for lb, rb in zip([0, 5, 6], [7, 2, 3]):
                    assert dc[n][lb].equal(pc[n][rb])
    finally:
        ps.shutdown()
        p.shutdown()
        d.shutdown()


# ------------------------------------------------------------------ read grant on arrival

def _prefill_with_server(clock: Clock):
    from transfer.connector.config import PdConfig
    from transfer.connector.scheduler import PdConnectorScheduler
    ps = PdConnectorScheduler(PdConfig.from_extra({"kv_lease_s": LEASE}, env={}), engine_id="P",
                              block_size=16, tp_size=1, dp_rank=0)
    ps.clock = clock
    _, params = ps.request_finished(fake_request("req-p", 48, {"do_remote_decode": True},
                                                 "FINISHED_STOPPED"), [7, 2, 3])
    ps.build_connector_meta(None)
    return ps, params


def _matched_when_answered(ds, req):
    """get_num_new_matched_tokens once the grant is answered (None until then)."""
    deadline = time.monotonic() + 30  # a bound, not a timed assertion
    got = ds.get_num_new_matched_tokens(req, 0)
    while got[0] is None and time.monotonic() < deadline:
        time.sleep(0.005)
        got = ds.get_num_new_matched_tokens(req, 0)
    return got


@pytest.mark.parametrize("expired", [False, True])
def test_decode_asks_for_the_read_when_the_request_arrives(expired):
    """The decode scheduler sends ``read:`` on arrival and holds the request back
    (``None``) until the prefill answered; granted, the job carries the grant's end
    (``time.monotonic()`` + the lease) so the workers READ in the step that allocates;
    refused, the load fails ``expired`` without any READ."""
    from test_connector_unit import FakeBlock
    clock = Clock()
    ps, params = _prefill_with_server(clock)
    ds = sched()
    try:
        if expired:
            clock.t += LEASE + 1
            ps.build_connector_meta(None)
        req = fake_request("d", 48, {**params, "remote_host": "127.0.0.1"}, computed=0)
        t0 = time.monotonic()
        ds.on_new_request(req)
        assert ds.get_num_new_matched_tokens(req, 0)[0] in (None, 48)
        assert _matched_when_answered(ds, req) == (48, True)
        ds.update_state_after_alloc(req, SimpleNamespace(blocks=[[FakeBlock(i) for i in range(3)]]), 48)
        job = ds.build_connector_meta(None).recv["d"]
        if expired:
            assert job.error == FailureReason.EXPIRED and job.remote_ids == []
        else:
            assert job.error == "" and job.remote_ids == [7, 2, 3]
            assert t0 + LEASE <= job.granted_until <= time.monotonic() + LEASE
            assert ps._pending["req-p"].deadline == clock.t + LEASE  # the grant held it
        assert ds._read_grants == {}
    finally:
        ps.shutdown()
        ds.shutdown()


def test_a_stale_grant_is_asked_again_and_an_unanswered_one_fails_the_load():
    from test_connector_unit import FakeBlock
    clock = Clock()
    ps, params = _prefill_with_server(clock)
    ds = sched(handshake_timeout_s=0.5)
    try:
        req = fake_request("d", 48, {**params, "remote_host": "127.0.0.1"}, computed=0)
        ds.on_new_request(req)
        assert _matched_when_answered(ds, req) == (48, True)
        first = ds._read_grants["d"]
        first.t_asked -= LEASE / 2  # the request then waited half a lease for blocks
        assert ds.get_num_new_matched_tokens(req, 0)[0] is None  # asked again
        assert ds._read_grants["d"] is not first
        assert _matched_when_answered(ds, req) == (48, True)
        # a prefill that never answers: the ask times out, the load fails (unreachable)
        gone = fake_request("g", 48, {**params, "remote_host": "127.0.0.1", "remote_port": 9},
                            computed=0)
        ds.on_new_request(gone)
        assert _matched_when_answered(ds, gone) == (48, True)
        ds.update_state_after_alloc(gone, SimpleNamespace(blocks=[[FakeBlock(i) for i in range(3)]]), 48)
        assert ds.build_connector_meta(None).recv["g"].error == FailureReason.UNREACHABLE
    finally:
        ps.shutdown()
        ds.shutdown()
