"""PdConnector unit tests: no vLLM engines (params, bookkeeping, stats, TP mapping)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from transfer.connector.config import PdConfig
from transfer.connector.metadata import (PD_PROTOCOL_VERSION, PdWorkerMeta, RecvJob,
                                         parse_remote_params, plan_block_read)
from transfer.connector.scheduler import PdConnectorScheduler
from transfer.connector.stats import PdConnectorStats
from transfer.errors import FailureReason, ParamsError, PeerRefused

BS = 16


def good_params(**kw):
    p = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[5, 6, 7]],
         "remote_engine_id": "eng-p", "remote_request_id": "req-p-1",
         "remote_host": "127.0.0.1", "remote_port": 5601, "tp_size": 1,
         "remote_num_tokens": 40, "remote_blocks_expiry_time": time.time() + 30,
         "transfer_mode": "pull", "pd_protocol_version": PD_PROTOCOL_VERSION,
         "remote_dp_rank": 0, "remote_block_size": BS}
    p.update(kw)
    return p


# ------------------------------------------------------------------ params


def test_parse_good_params():
    src = parse_remote_params(good_params())
    assert src.block_ids == (5, 6, 7) and src.port == 5601 and src.engine_id == "eng-p"
    # stock NixlConnector form (no pd_* fields, null expiry) is accepted too
    p = good_params(remote_blocks_expiry_time=None)
    for k in ("pd_protocol_version", "remote_dp_rank", "remote_block_size"):
        p.pop(k)
    assert parse_remote_params(p).lease_s is None
    assert parse_remote_params(good_params(pd_kv_lease_s=30)).lease_s == 30.0


@pytest.mark.parametrize("override,reason", [
    ({"remote_block_ids": "1,2"}, FailureReason.BAD_PARAMS),
    ({"remote_block_ids": [[1, "x"]]}, FailureReason.BAD_PARAMS),
    ({"remote_block_ids": [[1, -3]]}, FailureReason.BAD_PARAMS),
    ({"remote_block_ids": [[1], [2]]}, FailureReason.BAD_PARAMS),
    ({"remote_port": "5601"}, FailureReason.BAD_PARAMS),
    ({"remote_port": 70000}, FailureReason.BAD_PARAMS),
    ({"remote_port": True}, FailureReason.BAD_PARAMS),
    ({"remote_engine_id": 7}, FailureReason.BAD_PARAMS),
    ({"remote_host": None}, FailureReason.BAD_PARAMS),
    ({"remote_num_tokens": 1.5}, FailureReason.BAD_PARAMS),
    ({"remote_blocks_expiry_time": "soon"}, FailureReason.BAD_PARAMS),
    ({"pd_kv_lease_s": -1}, FailureReason.BAD_PARAMS),
    ({"pd_kv_lease_s": True}, FailureReason.BAD_PARAMS),
    ({"transfer_mode": "teleport"}, FailureReason.BAD_PARAMS),
    ({"pd_protocol_version": 99}, FailureReason.MISMATCH),
    ({"remote_host": "10.9.9.9"}, FailureReason.FOREIGN_HOST),
])
def test_parse_bad_params(override, reason):
    with pytest.raises(ParamsError) as e:
        parse_remote_params(good_params(**override), allowed_hosts=["127.0.0.1"])
    assert e.value.reason == reason


def test_parse_not_a_dict():
    with pytest.raises(ParamsError):
        parse_remote_params(["x"])  # type: ignore[arg-type]


def test_plan_skips_local_prefix_hit_and_partial_block():
    src = parse_remote_params(good_params())  # 40 tokens = 2 full blocks + 8 tokens
    lids, rids = plan_block_read(src, 40, BS, [11, 12, 13], 0)
    assert (lids, rids) == ([11, 12, 13], [5, 6, 7])
    lids, rids = plan_block_read(src, 40, BS, [11, 12, 13], 2)
    assert (lids, rids) == ([13], [7])


@pytest.mark.parametrize("kw,ntok,reason", [
    ({"remote_num_tokens": 39}, 40, FailureReason.MISMATCH),
    ({"remote_block_size": 32}, 40, FailureReason.MISMATCH),
    ({"remote_block_ids": [[5, 6]]}, 40, FailureReason.BLOCK_RANGE),
])
def test_plan_mismatch(kw, ntok, reason):
    src = parse_remote_params(good_params(**kw))
    with pytest.raises(ParamsError) as e:
        plan_block_read(src, ntok, BS, [1, 2, 3], 0)
    assert e.value.reason == reason


def test_config_validation():
    cfg = PdConfig.from_extra({"control_port": 5700, "kv_lease_s": 5}, env={})
    assert cfg.control_port == 5700 and cfg.protocol == "auto" and cfg.control_host == "127.0.0.1"
    assert PdConfig.from_extra({}, env={"KV_TRANSFER_PROTOCOL": "tcp"}).protocol == "tcp"
    with pytest.raises(ValueError, match="unknown kv_connector_extra_config"):
        PdConfig.from_extra({"contol_port": 1}, env={})
    assert PdConfig.from_extra({"transfer_mode": "push"}, env={}).transfer_mode == "push"
    with pytest.raises(ValueError, match="transfer_mode"):
        PdConfig.from_extra({"transfer_mode": "teleport"}, env={})
    with pytest.raises(ValueError, match="push_wait_s"):
        PdConfig.from_extra({"push_wait_s": 0}, env={})
    with pytest.raises(ValueError, match="protocol"):
        PdConfig.from_extra({"protocol": "carrier-pigeon"}, env={})


# ------------------------------------------------------------------ scheduler bookkeeping


class FakeBlock:
    def __init__(self, bid, hashed=False):
        self.block_id = bid
        self.block_hash = b"h" if hashed else None
        self.is_null = False


def fake_request(rid, ntok, params, status="RUNNING", computed=None):
    return SimpleNamespace(request_id=rid, num_prompt_tokens=ntok, kv_transfer_params=params,
                           status=SimpleNamespace(name=status),
                           num_computed_tokens=ntok if computed is None else computed)


def sched(**extra):
    cfg = PdConfig.from_extra({"allowed_remote_hosts": ["127.0.0.1"], **extra}, env={})
    s = PdConnectorScheduler(cfg, engine_id="eng-d", block_size=BS, tp_size=1, dp_rank=0,
                             start_server=False)
    s.released = []
    s._release_remote = lambda h, p, rid, eid="": s.released.append((h, p, rid, eid))
    return s


def test_prefill_side_finish_holds_blocks_and_returns_params():
    s = sched(kv_lease_s=30)
    s.port, s.dp_rank = 7000, 0
    req = fake_request("p1", 40, {"do_remote_decode": True}, status="FINISHED_LENGTH_CAPPED")
    delay, params = s.request_finished(req, [3, 4, 5, 9])
    assert delay is True
    assert params["remote_block_ids"] == [[3, 4, 5]]  # trimmed to the prompt's blocks
    assert params["do_remote_prefill"] is True and params["remote_num_tokens"] == 40
    assert params["remote_port"] == 7000 and params["remote_engine_id"] == "eng-d"
    # no wall-clock expiry leaves the prefill host: the lease duration does
    assert params["remote_blocks_expiry_time"] is None and params["pd_kv_lease_s"] == 30
    assert {"tp_size", "remote_dp_rank", "pd_protocol_version", "transfer_mode"} <= set(params)
    meta = s.build_connector_meta(None)
    assert meta.send["p1"] == 3
    assert s.build_connector_meta(None).send == {}  # per-step state was reset
    st = s.get_stats()
    assert st.data["pending_blocks"] == 3 and st.data["pending_reqs"] == 1
    # the worker reports it sent -> gauge back to 0
    s.update_connector_output(SimpleNamespace(finished_sending={"p1"}, finished_recving=set(),
                                              kv_connector_worker_meta=None))
    assert s.get_stats().data["pending_blocks"] == 0


def test_prefill_side_abort_frees_now():
    s = sched()
    req = fake_request("p2", 40, {"do_remote_decode": True}, status="FINISHED_ABORTED")
    assert s.request_finished(req, [1, 2, 3]) == (False, None)
    assert s.build_connector_meta(None).send == {}


def test_decode_side_plans_only_missing_blocks():
    s = sched()
    req = fake_request("d1", 40, good_params(), computed=0)
    assert s.get_num_new_matched_tokens(req, 16) == (24, True)
    assert s.get_num_new_matched_tokens(req, 16) == (24, True)  # side-effect free
    blocks = SimpleNamespace(blocks=[[FakeBlock(20, hashed=True), FakeBlock(21), FakeBlock(22)]])
    s.update_state_after_alloc(req, blocks, 24)
    assert req.kv_transfer_params["do_remote_prefill"] is False
    job = s.build_connector_meta(None).recv["d1"]
    assert (job.local_ids, job.remote_ids, job.error) == ([21, 22], [6, 7], "")
    # a second alloc call for the same request plans nothing
    s.update_state_after_alloc(req, blocks, 24)
    assert s.build_connector_meta(None).recv == {}
    # transfer result comes back -> reported in the decode response
    res = {"bytes": 100, "descriptors": 8, "blocks": 2, "ms": 0.5, "backend": "nixl",
           "error": ""}
    s.update_connector_output(SimpleNamespace(
        finished_sending=set(), finished_recving={"d1"},
        kv_connector_worker_meta=PdWorkerMeta({"d1": res})))
    _, out = s.request_finished(fake_request("d1", 40, req.kv_transfer_params, "FINISHED_STOPPED"), [])
    assert out["pd_transfer"] == res


def test_decode_side_full_local_hit_releases_prefill():
    s = sched()
    req = fake_request("d2", 40, good_params(), computed=0)
    s.update_state_after_alloc(req, SimpleNamespace(blocks=[[]]), 0)
    assert s.build_connector_meta(None).recv == {}
    assert s.released == [("127.0.0.1", 5601, "req-p-1", "eng-p")]


@pytest.mark.parametrize("override,reason", [
    ({"remote_block_ids": "nope"}, FailureReason.BAD_PARAMS),
    ({"remote_host": "203.0.113.9"}, FailureReason.FOREIGN_HOST),
    ({"pd_kv_lease_s": "long"}, FailureReason.BAD_PARAMS),
    ({"remote_num_tokens": 7}, FailureReason.MISMATCH),
])
def test_decode_side_bad_params_become_failed_loads(override, reason):
    s = sched()
    req = fake_request("d3", 40, good_params(**override), computed=0)
    count, is_async = s.get_num_new_matched_tokens(req, 0)
    assert (count, is_async) == (40, True)
    s.update_state_after_alloc(req, SimpleNamespace(blocks=[[FakeBlock(i) for i in range(3)]]), 40)
    job: RecvJob = s.build_connector_meta(None).recv["d3"]
    # the rejected load still names the blocks it was to fill (vLLM 0.26 recomputes them)
    assert job.error == reason and job.local_ids == [0, 1, 2] and job.remote_ids == []


def test_decode_abort_before_schedule_releases_prefill():
    s = sched()
    req = fake_request("d4", 40, good_params(), status="FINISHED_ABORTED")
    delay, out = s.request_finished(req, [])
    assert delay is False and out["pd_transfer"]["error"] == "aborted"
    assert s.released and s.released[0][2] == "req-p-1"


def test_release_notification_only_for_known_requests():
    s = sched()
    s.request_finished(fake_request("p9", 20, {"do_remote_decode": True},
                                    "FINISHED_STOPPED"), [1, 2])
    s._on_notify("eng-x", "eng-d", b"release:p9")
    s._on_notify("eng-x", "eng-d", b"release:unknown")
    with pytest.raises(PeerRefused) as e:  # a refusal the caller names (gRPC trailer)
        s._on_notify("eng-x", "someone-else", b"release:p9")
    assert e.value.reason == FailureReason.UNKNOWN_ENGINE
    assert s.build_connector_meta(None).release == {"p9"}


# ------------------------------------------------------------------ stats


def test_stats_aggregate_and_reduce():
    a = PdConnectorStats()
    a.record_transfer(1_000_000, 0.001, 8)
    a.record_failure("expired")
    b = PdConnectorStats()
    b.record_transfer(3_000_000, 0.003, 8)
    b.record_expired(4)
    b.set_gauge("pending_blocks", 2)
    c = PdConnectorStats(data=a.aggregate(b).data)  # round trip through the data dict
    assert c.data["bytes"] == [1_000_000, 3_000_000] and c.data["expired_blocks"] == 4
    assert c.data["failures"] == {"expired": 1} and c.data["pending_blocks"] == 2
    r = c.reduce()
    assert r["Num transfers"] == 2 and r["Throughput (GB/s)"] == 1.0
    assert PdConnectorStats().is_empty() and not c.is_empty()


def test_worker_meta_aggregate_over_tp_ranks():
    a = PdWorkerMeta({"r": {"bytes": 10, "descriptors": 2, "blocks": 1, "ms": 0.2,
                            "backend": "nixl", "error": ""}})
    b = PdWorkerMeta({"r": {"bytes": 10, "descriptors": 2, "blocks": 1, "ms": 0.5,
                            "backend": "nixl", "error": ""}})
    m = a.aggregate(b).results["r"]
    assert m["bytes"] == 20 and m["ms"] == 0.5 and m["ranks"] == 2


def test_control_port_is_exclusive_per_host():
    """Two engines given the same control_port must not share it (gRPC SO_REUSEPORT)."""
    from transfer.connector.control_client import start_control_server
    a = start_control_server("127.0.0.1", 0)
    try:
        b = start_control_server("127.0.0.1", a.port)
        try:
            assert b.port != a.port and b.port > 0
        finally:
            b.stop()
    finally:
        a.stop()


def test_release_over_control_plane_round_trip():
    s = PdConnectorScheduler(PdConfig.from_extra({}, env={}), engine_id="eng-p", block_size=BS,
                             tp_size=1, dp_rank=0)
    try:
        s.request_finished(fake_request("p1", 20, {"do_remote_decode": True},
                                        "FINISHED_STOPPED"), [1, 2])
        from transfer.connector.control_client import send_release
        send_release("127.0.0.1", s.port, "eng-d", "eng-p", "p1", 5.0)
        assert s.build_connector_meta(None).release == {"p1"}
        with pytest.raises(Exception):  # wrong receiver: rejected, not silently applied
            send_release("127.0.0.1", s.port, "eng-d", "eng-other", "p1", 5.0)
    finally:
        s.shutdown()


# ------------------------------------------------------------------ push mode planning


def test_push_decode_registers_blocks_past_local_hit():
    from transfer.control import ControlServer
    s = sched(transfer_mode="push", push_wait_s=7)
    s._server = ControlServer("127.0.0.1:0")  # registry only; not started
    req = fake_request("d9", 40, {"do_remote_prefill": True, "transfer_mode": "push",
                                  "remote_request_id": "push-1"}, computed=0)
    assert s.get_num_new_matched_tokens(req, 16) == (24, True)
    blocks = SimpleNamespace(blocks=[[FakeBlock(20, hashed=True), FakeBlock(21), FakeBlock(22)]])
    s.update_state_after_alloc(req, blocks, 24)
    t = s._server.push_targets.get("push-1")
    assert (t.first_block, t.block_ids, t.num_tokens, t.engine_id) == (1, [21, 22], 40, "eng-d")
    assert t.write_lease_s == s.cfg.push_write_lease_s  # a duration, no wall-clock time
    job = s.build_connector_meta(None).push_recv["d9"]
    assert (job.push_id, job.num_blocks) == ("push-1", 2)
    # KV arrived -> the registration keeps no block ids, then is forgotten
    s.update_connector_output(SimpleNamespace(finished_sending=set(), finished_recving={"d9"},
                                              kv_connector_worker_meta=None))
    assert s._server.push_targets.get("push-1").block_ids == []
    s.clock = lambda: time.monotonic() + 8  # push_wait_s later
    s.build_connector_meta(None)
    assert s._server.push_targets.get("push-1") is None


def test_push_refused_when_not_enabled():
    s = sched()  # transfer_mode pull
    req = fake_request("d10", 40, {"do_remote_prefill": True, "transfer_mode": "push",
                                   "remote_request_id": "push-2"}, computed=0)
    s.update_state_after_alloc(req, SimpleNamespace(blocks=[[FakeBlock(1), FakeBlock(2)]]), 40)
    job = s.build_connector_meta(None).recv["d10"]
    assert job.error == FailureReason.BAD_PARAMS
    p = fake_request("p10", 40, {"do_remote_decode": True, "transfer_mode": "push",
                                 "remote_request_id": "push-2", "push_target": "127.0.0.1:1"})
    assert s.get_num_new_matched_tokens(p, 0) == (0, False)
    assert p.kv_transfer_params["do_remote_decode"] is False


def _step(new=(), cached=(), sched_tokens=None):
    """A minimal SchedulerOutput: new reqs (rid, block_ids, computed), cached reqs."""
    new_reqs = [SimpleNamespace(req_id=r, block_ids=([*b],), num_computed_tokens=c)
                for r, b, c in new]
    cr = SimpleNamespace(req_ids=[r for r, _, _ in cached], resumed_req_ids=set(),
                         new_block_ids=[([*b],) if b else None for _, b, _ in cached],
                         num_computed_tokens=[c for _, _, c in cached])
    return SimpleNamespace(scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cr,
                           num_scheduled_tokens=sched_tokens or {})


def test_push_prefill_waits_for_registration_then_plans_chunks():
    from concurrent.futures import Future
    from transfer.control_messages import PushTarget
    s = sched(transfer_mode="push")
    params = {"do_remote_decode": True, "transfer_mode": "push", "remote_request_id": "push-3",
              "push_target": "127.0.0.1:6000"}
    req = fake_request("p3", 40, params, computed=0)
    pending: Future = Future()
    s._lookup = lambda host, port, push_id: pending.result()  # blocks until set
    s._ask_write = lambda *a: None  # granted
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)  # not found yet
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    pending.set_result(PushTarget(engine_id="eng-x", dp_rank=0, tp_size=1, block_size=BS,
                                  num_tokens=40, first_block=1, block_ids=[71, 72],
                                  write_lease_s=30.0))
    deadline = time.time() + 10
    while (r := s.get_num_new_matched_tokens(req, 0)) == (None, False) and time.time() < deadline:
        time.sleep(0.01)
    assert r == (0, False)
    # chunk 1: 20 of 40 tokens -> block 0 full (but it is the decode's local hit), block 1 not
    step = s.build_connector_meta(_step(new=[("p3", [5, 6], 0)], sched_tokens={"p3": 20}))
    assert step.push_send == {}
    # chunk 2: the rest -> blocks 1 (full) and 2 (partial, last) go to 71, 72
    step = s.build_connector_meta(_step(cached=[("p3", [7], 20)], sched_tokens={"p3": 20}))
    st = step.push_send["p3"]
    assert (st.local_ids, st.remote_ids, st.final, st.push_id) == ([6, 7], [71, 72], True, "push-3")
    delay, info = s.request_finished(fake_request("p3", 40, params, "FINISHED_LENGTH_CAPPED"), [5, 6, 7])
    assert delay is True and info["pd_push"] == "sent"
    assert s.build_connector_meta(_step()).push_finished == {"p3"}


def test_push_prefill_lookup_miss_prefills_plainly():
    s = sched(transfer_mode="push")
    params = {"do_remote_decode": True, "transfer_mode": "push", "remote_request_id": "push-4",
              "push_target": "127.0.0.1:6000"}
    req = fake_request("p4", 40, params, computed=0)
    s._lookup = lambda host, port, push_id: None
    deadline = time.time() + 10
    while (r := s.get_num_new_matched_tokens(req, 0)) == (None, False) and time.time() < deadline:
        time.sleep(0.01)
    assert r == (0, False)
    assert s.build_connector_meta(_step(new=[("p4", [1, 2, 3], 0)], sched_tokens={"p4": 40})).push_send == {}
    delay, info = s.request_finished(fake_request("p4", 40, params, "FINISHED_LENGTH_CAPPED"), [1, 2, 3])
    assert delay is False and info["pd_push"] == "timeout"


@pytest.mark.parametrize("target", ["nohost", "h:0", "h:x", "10.0.0.1:80"])
def test_push_target_validation(target):
    from transfer.connector.metadata import parse_push_target
    with pytest.raises(ParamsError):
        parse_push_target({"push_target": target}, allowed_hosts=["127.0.0.1", "h"])


def test_push_lookup_asks_in_short_calls_on_its_own_executor():
    """The lookup never holds a decode control-server thread for long: each
    PushTarget call waits at most PUSH_TARGET_MAX_WAIT_MS (the server caps what a
    client asks), the prefill re-asks until push_lookup_s; it runs on its own pool,
    apart from notifications and releases."""
    import threading
    from transfer import control
    from transfer.control import ControlServer
    from transfer.control_messages import PushTarget
    srv = ControlServer("127.0.0.1:0")
    port = srv.start()
    waits: list[float] = []
    real_wait = srv.push_targets.wait_for
    srv.push_targets.wait_for = lambda pid, t: (waits.append(t), real_wait(pid, t))[1]
    try:
        s = sched(transfer_mode="push", push_lookup_s=5)
        target = PushTarget(engine_id="eng-x", dp_rank=0, tp_size=1, block_size=BS,
                            num_tokens=40, first_block=0, block_ids=[1, 2, 3],
                            write_lease_s=30.0)
        threading.Timer(1.2, srv.push_targets.register, ("push-9", target)).start()
        assert s._lookup("127.0.0.1", port, "push-9").block_ids == [1, 2, 3]
        assert len(waits) >= 2 and max(waits) <= control.PUSH_TARGET_MAX_WAIT_MS / 1e3
        waits.clear()
        from transfer.connector.control_client import control_client
        assert control_client("127.0.0.1", port, 5).push_target("nope", wait_s=30) is None
        assert waits == [control.PUSH_TARGET_MAX_WAIT_MS / 1e3]
        assert s._lookups() is not s.notifier.executor()
    finally:
        srv.stop()


def test_progress_delay_comes_from_the_key_else_the_environment():
    """The documented env var sets the connector's NIXL poll delay; the key wins over it."""
    from transfer.connector.config import PdConfig
    from transfer.nixl_agent import PROGRESS_DELAY_US

    env = {"PDSIDECAR_NIXL_PROGRESS_DELAY_US": "5000"}
    assert PdConfig.from_extra({}, env={}).nixl_progress_delay_us == PROGRESS_DELAY_US
    assert PdConfig.from_extra({}, env=env).nixl_progress_delay_us == 5000
    assert PdConfig.from_extra({"nixl_progress_delay_us": 0}, env=env).nixl_progress_delay_us == 0
    with pytest.raises(ValueError, match="PDSIDECAR_NIXL_PROGRESS_DELAY_US"):
        PdConfig.from_extra({}, env={"PDSIDECAR_NIXL_PROGRESS_DELAY_US": "fast"})
