"""gRPC control plane: handshake, mismatches, status, stats stream, notify."""

import threading
import time

import pytest

from transfer.control import ControlClient, ControlServer
from transfer.control_messages import RankDescriptor
from transfer.engine import PeerInfo, TransferStats
from transfer.errors import HandshakeError, HandshakeMismatchError
from transfer.layout import Region


def _desc(name, tp_rank=0, **kw):
    peer = PeerInfo(name=name, backend="nixl", mem_type="DRAM",
                    regions=[Region("l0", 4096, 1024, 1024, 8, layer=0)],
                    agent_metadata=b"meta-" + name.encode(), ipc_handles=b"")
    base = dict(engine_id=f"eng-{name}", peer=peer, model_name="tiny-llama", dtype="bfloat16",
                block_size=16, kv_layout="HND", num_layers=1, num_kv_heads=2, head_size=64,
                tp_rank=tp_rank, tp_size=2)
    base.update(kw)
    return RankDescriptor(**base)


@pytest.fixture
def server():
    seen = []
    notes = []
    srv = ControlServer(on_handshake=seen.append,
                        on_notify=lambda s, r, m: notes.append((s, r, m)))
    srv.add_rank(_desc("p0", tp_rank=0))
    srv.add_rank(_desc("p1", tp_rank=1))
    srv.start()
    srv.seen, srv.notes = seen, notes
    yield srv
    srv.stop()


def test_handshake_roundtrip(server):
    with ControlClient(server.target, timeout_s=5) as c:
        remote = c.handshake(_desc("d0"), target_tp_rank=1)
    assert remote.peer.name == "p1" and remote.peer.agent_metadata == b"meta-p1"
    assert remote.peer.regions[0] == Region("l0", 4096, 1024, 1024, 8, layer=0)
    assert remote.tp_rank == 1 and remote.peer.host_id
    assert server.seen[0].peer.name == "d0"


@pytest.mark.parametrize("field,value", [("dtype", "float16"), ("block_size", 32),
                                         ("model_name", "other"), ("kv_layout", "NHD"),
                                         ("protocol_version", 99)])
def test_handshake_mismatch_names_field(server, field, value):
    with ControlClient(server.target, timeout_s=5) as c:
        with pytest.raises(HandshakeMismatchError) as ei:
            c.handshake(_desc("d0", **{field: value}))
    assert ei.value.field == field and field in str(ei.value)
    assert not server.seen


def test_handshake_unknown_rank_and_unreachable(server):
    with ControlClient(server.target, timeout_s=5) as c:
        with pytest.raises(HandshakeError, match="no rank"):
            c.handshake(_desc("d0"), target_tp_rank=5)
    t0 = time.monotonic()
    with ControlClient("127.0.0.1:1", timeout_s=1) as c:
        with pytest.raises(HandshakeError, match="unreachable"):
            c.handshake(_desc("d0"))
    assert time.monotonic() - t0 < 10


def test_status_stats_stream_and_notify(server):
    st = TransferStats(1, "req-9", "p0", "READ", "nixl", 4096, 4, 4, 1, 1.0, 2.0, 10.0, "DONE")
    got = []
    with ControlClient(server.target, timeout_s=5) as c:
        def reader():
            for m in c.stats_stream(timeout_s=5):
                got.append(m)
                return
        t = threading.Thread(target=reader)
        t.start()
        deadline = time.monotonic() + 5
        while not server._subs and time.monotonic() < deadline:
            time.sleep(0.01)
        server.publish(st)
        t.join(10)
        assert got and got[0]["request_id"] == "req-9" and got[0]["bytes"] == 4096
        assert c.transfer_status("req-9")["state"] == "DONE"
        assert c.transfer_status("nope")["state"] == "UNKNOWN"
        c.notify("d0", "p0", b"req-9:1")
    assert server.notes == [("d0", "p0", b"req-9:1")]


def test_transfer_status_history_is_bounded(monkeypatch):
    from transfer import control
    monkeypatch.setattr(control, "MAX_STATUSES", 3)
    srv = control.ControlServer("127.0.0.1:0")
    for i in range(5):
        srv.set_status(f"r{i}", "DONE", 10)
    srv.note_notification("r5")
    assert len(srv._statuses) == 3
    assert srv.status("r0").state == "UNKNOWN" and srv.status("r4").state == "DONE"
    assert srv.status("r5").notifications == 1
