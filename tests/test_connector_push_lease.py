"""Push-mode write grants (issue 16): no wall-clock time crosses hosts.

The decode scheduler holds a registered push's blocks on its monotonic clock and
grants ``write:`` only while it still waits; the prefill WRITEs only within "time it
asked + write lease" on its own clock and renews at half. Clocks are injected
(``sched.clock``, ``worker.clock``); the wall clock is moved by hours to show it plays
no part. The last tests run real schedulers (control plane) and NIXL workers.
"""

from __future__ import annotations

import ast
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest

from transfer.errors import FailureReason, PeerRefused

from test_connector_lease import Clock, Notes
from test_connector_push_defer import push_outcome
from test_connector_unit import BS, FakeBlock, _step, fake_request, sched

WAIT, LEASE, GRACE = 30.0, 10.0, 4.0
PUSH = {"do_remote_prefill": True, "transfer_mode": "push", "remote_request_id": "push-1"}


class SyncPool:
    """An executor that runs each call at once (deterministic tests)."""

    def submit(self, fn, *args):
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - handed to the caller, as a pool would
            f.set_exception(e)
        return f


class SyncNotes(Notes):
    def executor(self):
        return SyncPool()


def decode_sched(clock: Clock, **extra):
    """A decode scheduler in push mode with push-1 registered (3 blocks, 40 tokens)."""
    from transfer.control import ControlServer
    s = sched(transfer_mode="push", push_wait_s=WAIT, push_write_lease_s=LEASE,
              transfer_timeout_s=GRACE, **extra)
    s.clock = clock
    s._server = ControlServer("127.0.0.1:0")  # registry only; not started
    req = fake_request("d1", 40, dict(PUSH), computed=0)
    s.update_state_after_alloc(req, SimpleNamespace(blocks=[[FakeBlock(i) for i in (4, 5, 6)]]),
                               40)
    assert s.build_connector_meta(None).push_recv["d1"].local_ids == [4, 5, 6]
    return s, req


def write(s, push_id="push-1"):
    s._on_notify("eng-p", "eng-d", f"write:{push_id}".encode())


def push_fail(s):
    return s.build_connector_meta(None).push_fail


def reported(s, rid="d1"):
    s.update_connector_output(SimpleNamespace(finished_sending=set(), finished_recving={rid},
                                              kv_connector_worker_meta=None))


@pytest.mark.parametrize("wall_offset_s", [-3600.0, 0.0, 3600.0])
def test_grants_run_on_the_decode_monotonic_clock(monkeypatch, wall_offset_s):
    """Granted while the decode waits; refused after push_wait_s; a granted WRITE keeps
    the blocks from vLLM until grant + lease + grace, whatever the wall clock says."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + wall_offset_s)
    clock = Clock()
    s, _ = decode_sched(clock)
    write(s)
    clock.t += WAIT - 1.0
    write(s)  # the last grant: held until now + LEASE + GRACE
    last = clock.t
    clock.t += 1.5  # the wait is over
    with pytest.raises(PeerRefused) as e:
        write(s)
    assert e.value.reason == FailureReason.EXPIRED
    assert push_fail(s) == {}  # quarantined: a granted WRITE may still land
    clock.t = last + LEASE + GRACE - 0.1
    assert push_fail(s) == {}
    clock.t = last + LEASE + GRACE + 0.1
    assert push_fail(s) == {"push-1": FailureReason.TIMEOUT}
    assert push_fail(s) == {}  # once
    stats = s.get_stats().data["push_grants"]
    assert stats == {"granted": 2, "refused": 1}


def test_ungranted_push_fails_at_push_wait_s_and_late_asks_are_refused():
    clock = Clock()
    s, _ = decode_sched(clock)
    clock.t += WAIT - 0.1
    assert push_fail(s) == {}
    clock.t += 0.2
    assert push_fail(s) == {"push-1": FailureReason.TIMEOUT}
    with pytest.raises(PeerRefused):
        write(s)
    # the workers reported the failed load: a late prefill still finds the
    # registration (no block ids) and is refused at once, until it is forgotten
    reported(s)
    assert s._server.push_targets.get("push-1").block_ids == []
    with pytest.raises(PeerRefused):
        write(s)
    clock.t += WAIT + 1
    assert push_fail(s) == {}
    assert s._server.push_targets.get("push-1") is None and len(s._holds) == 0


def test_peer_failure_ends_the_push_at_once_and_unknown_pushes_are_refused():
    clock = Clock()
    s, _ = decode_sched(clock)
    write(s)
    # the prefill says the push failed (it sends that only once its WRITEs are over)
    s._on_notify("eng-p", "eng-d", b"push-fail:push-1:mismatch")
    assert push_fail(s) == {"push-1": "mismatch"}
    clock.t += WAIT + LEASE + GRACE + 1
    assert push_fail(s) == {}  # not failed twice
    with pytest.raises(PeerRefused):
        write(s, "never-registered")
    s._on_notify("eng-p", "", b"push-fail:never-registered:timeout")  # ignored
    assert push_fail(s) == {}


@pytest.mark.parametrize("granted", [False, True])
def test_abort_fails_the_load_once_no_granted_write_can_land(granted):
    """vLLM keeps an aborted request's blocks until its load is reported; it is
    reported at once without a grant, else once the granted WRITEs can no longer land."""
    clock = Clock()
    s, req = decode_sched(clock)
    if granted:
        write(s)
    req.status = SimpleNamespace(name="FINISHED_ABORTED")
    s.request_finished(req, [4, 5, 6])
    with pytest.raises(PeerRefused):
        write(s)
    if granted:
        assert push_fail(s) == {}
        clock.t += LEASE + GRACE + 0.1
    assert push_fail(s) == {"push-1": FailureReason.ABORTED}


# ------------------------------------------------------------------ prefill side


def prefill_sched(clock: Clock, ask, lease: float = LEASE):
    """A prefill scheduler whose lookup finds a 40-token registration at once."""
    from transfer.control_messages import PushTarget
    s = sched(transfer_mode="push")
    s.clock, s.notifier = clock, SyncNotes()
    s._lookups = lambda: SyncPool()
    s._lookup = lambda host, port, push_id: PushTarget(
        engine_id="eng-d", dp_rank=0, tp_size=1, block_size=BS, num_tokens=40, first_block=0,
        block_ids=[71, 72, 73], write_lease_s=lease)
    s._ask_write = ask
    params = {"do_remote_decode": True, "transfer_mode": "push", "remote_request_id": "push-1",
              "push_target": "127.0.0.1:6000"}
    req = fake_request("p1", 40, params, computed=0)
    # looked up and granted in the background (here at once), before any WRITE is planned
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    return s, params


def test_prefill_writes_within_asked_plus_lease_and_renews_at_half():
    clock = Clock()
    asks: list[float] = []
    s, params = prefill_sched(clock, lambda *a: asks.append(clock.t))
    assert asks == [1000.0]
    st = s.build_connector_meta(_step(new=[("p1", [1, 2, 3], 0)], sched_tokens={"p1": 16})
                                ).push_send["p1"]
    assert st.valid_until == 1000.0 + LEASE and st.local_ids == [1]
    clock.t += LEASE / 2 + 0.1  # less than half left: renewed (answered at once here)
    s.build_connector_meta(_step(cached=[("p1", [], 16)], sched_tokens={}))
    assert asks == [1000.0, clock.t]
    st = s.build_connector_meta(_step(cached=[("p1", [], 16)], sched_tokens={"p1": 24})
                                ).push_send["p1"]
    assert st.valid_until == asks[1] + LEASE and st.final
    delay, info = s.request_finished(fake_request("p1", 40, params, "FINISHED_LENGTH_CAPPED"),
                                     [1, 2, 3])
    assert delay and info["pd_push"] == "sent"


def test_refused_renewal_stops_the_push_and_the_worker_reports_it():
    clock = Clock()
    refuse = {"now": False}

    def ask(*a):
        if refuse["now"]:
            raise PeerRefused(FailureReason.EXPIRED, "not awaited any more")
    s, params = prefill_sched(clock, ask)
    assert s.build_connector_meta(_step(new=[("p1", [1, 2, 3], 0)], sched_tokens={"p1": 16})
                                  ).push_send
    refuse["now"] = True
    clock.t += LEASE / 2 + 0.1
    s.build_connector_meta(_step(cached=[("p1", [], 16)], sched_tokens={}))  # renewal asked
    assert s.build_connector_meta(_step(cached=[("p1", [], 16)], sched_tokens={"p1": 24})
                                  ).push_send == {}
    # WRITEs were planned: the worker, not the scheduler, tells the decode (once they are over)
    assert s.notifier.sent == []
    delay, info = s.request_finished(fake_request("p1", 40, params, "FINISHED_LENGTH_CAPPED"),
                                     [1, 2, 3])
    assert delay and info["pd_push"] == FailureReason.EXPIRED


def test_refused_first_grant_pushes_nothing_and_the_window_closes_without_renewal():
    def refused(*a):
        raise PeerRefused(FailureReason.EXPIRED, "not awaited any more")
    s, params = prefill_sched(Clock(), refused)
    assert s.build_connector_meta(_step(new=[("p1", [1, 2, 3], 0)], sched_tokens={"p1": 40})
                                  ).push_send == {}
    assert s.notifier.sent == [("127.0.0.1", 6000, "", "push-fail:push-1:expired")]
    _, info = s.request_finished(fake_request("p1", 40, params, "FINISHED_LENGTH_CAPPED"),
                                 [1, 2, 3])
    assert info["pd_push"] == FailureReason.EXPIRED
    # a renewal that never comes back: nothing is planned once the window is over
    clock = Clock()
    pending: list[Future] = []
    s, _ = prefill_sched(clock, lambda *a: None)
    s.notifier.executor = lambda: SimpleNamespace(
        submit=lambda *a: pending.append(Future()) or pending[-1])
    clock.t += LEASE / 2 + 0.1
    s.build_connector_meta(_step(new=[("p1", [1, 2, 3], 0)], sched_tokens={}))
    assert len(pending) == 1  # asked, never answered
    clock.t += LEASE / 2
    assert s.build_connector_meta(_step(cached=[("p1", [], 0)], sched_tokens={"p1": 40})
                                  ).push_send == {}
    assert s._push_out["p1"].error == FailureReason.EXPIRED


@pytest.mark.parametrize("exc, reason", [
    (PeerRefused(FailureReason.UNKNOWN_ENGINE, "no engine eng-x here"), FailureReason.UNKNOWN_ENGINE),
    (ConnectionError("connection refused"), FailureReason.UNREACHABLE),
])
def test_a_refused_write_grant_names_the_decode_reason(exc, reason):
    """A first grant that fails ends the push with the decode's refusal reason, as pull's
    read grant does, else ``unreachable`` (``expired``: the test above); the decode is
    told (push-fail) and the prefill's answer says the same."""
    def ask(*a):
        raise exc
    s, params = prefill_sched(Clock(), ask)
    assert s.build_connector_meta(_step(new=[("p1", [1, 2, 3], 0)], sched_tokens={"p1": 40})
                                  ).push_send == {}
    assert s.notifier.sent == [("127.0.0.1", 6000, "", f"push-fail:push-1:{reason.value}")]
    _, info = s.request_finished(fake_request("p1", 40, params, "FINISHED_LENGTH_CAPPED"),
                                 [1, 2, 3])
    assert info["pd_push"] == reason


def test_a_decode_without_write_leases_gets_no_push():
    s, params = prefill_sched(Clock(), lambda *a: None, lease=0.0)
    assert s.build_connector_meta(_step(new=[("p1", [1, 2, 3], 0)], sched_tokens={"p1": 40})
                                  ).push_send == {}
    assert s._push_out["p1"].error == FailureReason.MISMATCH


# ------------------------------------------------------------------ real control plane + NIXL


def _forward(w, meta) -> None:
    """What vLLM does with a prefill step's metadata: start, save each layer, end."""
    w.start_load_kv(meta)
    for name in w._layer_index:
        w.save_layer(name, meta)
    w.end_step(meta)


@pytest.mark.parametrize("late", [False, True])
def test_prefill_writes_only_what_the_decode_grants(late):
    """Prefill scheduler -> lookup + ``write:`` at a real decode scheduler's control
    server -> WRITEs over NIXL from the prefill worker. Granted: byte-exact, the load
    completes. Late (the decode gave up and reported its load failed): the grant is
    refused, nothing is planned or written, the decode blocks keep their content."""
    pytest.importorskip("nixl._api")
    pytest.importorskip("torch")
    from test_connector_tp import make_worker
    from transfer.connector.config import PdConfig
    from transfer.connector.scheduler import PdConnectorScheduler
    (p, pc), (d, dc) = make_worker("P", 0, 1, seed=31), make_worker("D", 0, 1, seed=32)
    clock = Clock()
    ds = PdConnectorScheduler(PdConfig.from_extra({"transfer_mode": "push", "push_wait_s": WAIT},
                                                  env={}),
                              engine_id="D", block_size=16, tp_size=1, dp_rank=0)
    ps = PdConnectorScheduler(PdConfig.from_extra({"transfer_mode": "push", "push_lookup_s": 2},
                                                  env={}),
                              engine_id="P", block_size=16, tp_size=1, dp_rank=0,
                              start_server=False)
    try:
        ds.clock = clock
        ds.set_workers_metadata({0: d.desc})
        lids, plids = [0, 5, 6], [7, 2, 3]
        dreq = fake_request("d", 48, dict(PUSH, remote_request_id="pid"), computed=0)
        ds.update_state_after_alloc(dreq, SimpleNamespace(blocks=[[FakeBlock(i) for i in lids]]),
                                    48)
        d.start_load_kv(ds.build_connector_meta(None))
        before = {n: t.clone() for n, t in dc.items()}
        if late:  # the decode gives up: its load fails and is reported
            clock.t += WAIT + 1
            d.start_load_kv(ds.build_connector_meta(None))
            _, r, f = d.get_transfer_results(set())
            assert "d" in r and "d" in f
            ds.update_connector_output(SimpleNamespace(
                finished_sending=set(), finished_recving=r, kv_connector_worker_meta=None))
        params = {"do_remote_decode": True, "transfer_mode": "push", "remote_request_id": "pid",
                  "push_target": f"127.0.0.1:{ds.port}"}
        preq = fake_request("p", 48, params, computed=0)
        deadline = time.monotonic() + 30  # a bound, not a timed assertion
        while ps.get_num_new_matched_tokens(preq, 0) == (None, False) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        meta = ps.build_connector_meta(_step(new=[("p", plids, 0)], sched_tokens={"p": 48}))
        assert bool(meta.push_send) is not late
        _forward(p, meta)
        wrote, info = ps.request_finished(fake_request("p", 48, params, "FINISHED_LENGTH_CAPPED"),
                                          plids)
        assert info["pd_push"] == (FailureReason.EXPIRED if late else "sent")
        p.start_load_kv(ps.build_connector_meta(_step()))
        got, freed = (None, not wrote) if late else push_outcome(p, d, 30, freed=not wrote)
        granted, refused = ds._holds.take_counts()
        if late:
            assert (granted, refused) == (0, 1) and not wrote
            assert all(t.equal(before[n]) for n, t in dc.items())
        else:
            assert got == "ok" and freed and (granted, refused) == (1, 0)
            for n in pc:
                for lb, rb in zip(lids, plids):
                    assert dc[n][lb].equal(pc[n][rb])
    finally:
        for x in (ds, ps, p, d):
            x.shutdown()


def test_connector_reads_the_wall_clock_only_through_now_wall():
    """The engine tests shift ``now_wall`` per engine; any other wall-clock read in the
    connector would escape them."""
    root = Path(__file__).resolve().parent.parent / "transfer" / "connector"
    calls = []
    for f in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("time", "time_ns") and \
                    getattr(node.func.value, "id", "") == "time":
                calls.append(f"{f.name}:{node.lineno}")
    assert calls == ["metadata.py:" + str(_now_wall_line(root / "metadata.py"))], calls


def _now_wall_line(path: Path) -> int:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == "now_wall":
            return node.body[-1].lineno
    raise AssertionError("now_wall not found")
