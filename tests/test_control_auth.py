"""Control-plane authentication and the same-host proof, against a real gRPC server.

Attacks tried (each must be refused and counted, with no effect on the engine):
unsigned calls, a wrong token, a replayed signed call, a signed header moved onto
another body, a stale timestamp, malformed headers, a forged answer, and a claimed
``host_id`` without the host key.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest

from transfer import control_pb2 as pb
from transfer import hostproof
from transfer.connector.config import PdConfig
from transfer.connector.scheduler import PdConnectorScheduler
from transfer.control import SERVICE, ControlClient, ControlServer
from transfer.control_messages import PushTarget, RankDescriptor
from transfer.control_auth import AUTH_KEY, ControlAuth, NonceCache, load_token
from transfer.engine import PeerInfo
from transfer.errors import HandshakeError
from transfer.layout import Region
from transfer.select import peer_backend

TOKEN = "t" * 16 + "-control-test-token"
BS = 16


def _desc(name, host_id=None):
    peer = PeerInfo(name=name, backend="nixl", mem_type="VRAM",
                    regions=[Region("l0", 4096, 1024, 1024, 8, layer=0)],
                    agent_metadata=b"meta-" + name.encode(), ipc_handles=b"handles")
    if host_id is not None:
        peer.host_id = host_id
    return RankDescriptor(engine_id=f"eng-{name}", peer=peer, model_name="m", dtype="bf16",
                          block_size=BS, num_layers=1, num_kv_heads=2, head_size=64)


@pytest.fixture
def prefill_sched(monkeypatch):
    """A real prefill scheduler half with its control server, token configured."""
    s = PdConnectorScheduler(PdConfig.from_extra({}, env={"PDSIDECAR_AUTH_TOKEN": TOKEN}),
                             engine_id="eng-p", block_size=BS, tp_size=1, dp_rank=0)
    from test_connector_unit import fake_request
    s.request_finished(fake_request("p1", 40, {"do_remote_decode": True},
                                    "FINISHED_STOPPED"), [1, 2, 3])
    assert s.has_pending()
    yield s
    s.shutdown()


def raw_call(port, name, req, metadata=None):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        return ch.unary_unary(SERVICE + name)(req.SerializeToString(), timeout=5,
                                              metadata=metadata)
    finally:
        ch.close()


def _refused(sched):
    return dict(sched._server.refused.total)


RELEASE = pb.NotifyRequest(sender="x", receiver="eng-p", message=b"release:p1")


def test_unsigned_release_is_refused_and_blocks_stay(prefill_sched):
    with pytest.raises(grpc.RpcError) as ei:
        raw_call(prefill_sched.port, "Notify", RELEASE)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert prefill_sched.build_connector_meta(None).release == set()
    assert prefill_sched.has_pending()
    assert _refused(prefill_sched) == {"missing": 1}
    # counted into the connector's stats (pd_connector_control_refused_total)
    st = prefill_sched.get_stats()
    assert st.data["control_refused"] == {"missing": 1}


def test_wrong_token_release_is_refused(prefill_sched):
    from transfer.connector.control_client import configure_auth, send_release
    configure_auth("w" * 32)
    try:
        with pytest.raises(HandshakeError, match="refused"):
            send_release("127.0.0.1", prefill_sched.port, "eng-d", "eng-p", "p1", 5.0)
    finally:
        configure_auth(None)
    assert prefill_sched.build_connector_meta(None).release == set()
    assert _refused(prefill_sched) == {"bad_signature": 1}


def test_signed_release_works_and_replay_is_refused(prefill_sched):
    auth = ControlAuth(TOKEN)
    body = RELEASE.SerializeToString()
    value, _ = auth.sign(SERVICE + "Notify", body)
    raw_call(prefill_sched.port, "Notify", RELEASE, ((AUTH_KEY, value),))
    assert prefill_sched.build_connector_meta(None).release == {"p1"}
    # the same recorded call again (a replay) is refused
    with pytest.raises(grpc.RpcError) as ei:
        raw_call(prefill_sched.port, "Notify", RELEASE, ((AUTH_KEY, value),))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _refused(prefill_sched) == {"replayed": 1}


def test_signature_moved_to_another_body_is_refused(prefill_sched):
    auth = ControlAuth(TOKEN)
    harmless = pb.NotifyRequest(sender="x", receiver="eng-p", message=b"release:other")
    value, _ = auth.sign(SERVICE + "Notify", harmless.SerializeToString())
    with pytest.raises(grpc.RpcError):
        raw_call(prefill_sched.port, "Notify", RELEASE, ((AUTH_KEY, value),))
    # and onto another method
    value, _ = auth.sign(SERVICE + "TransferStatus", RELEASE.SerializeToString())
    with pytest.raises(grpc.RpcError):
        raw_call(prefill_sched.port, "Notify", RELEASE, ((AUTH_KEY, value),))
    assert prefill_sched.build_connector_meta(None).release == set()
    assert _refused(prefill_sched) == {"bad_signature": 2}


@pytest.mark.parametrize("value,reason", [
    ("v1:1:abc:def", "malformed"), ("garbage", "malformed"), ("v2:1:" + "n" * 24 + ":m", "malformed"),
    ("v1:" + "9" * 30 + ":" + "n" * 24 + ":" + "m" * 43, "bad_signature")])
def test_malformed_headers_refused(prefill_sched, value, reason):
    with pytest.raises(grpc.RpcError) as ei:
        raw_call(prefill_sched.port, "Notify", RELEASE, ((AUTH_KEY, value),))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _refused(prefill_sched) == {reason: 1}
    assert prefill_sched.has_pending()


def test_stale_signature_refused(prefill_sched):
    old = ControlAuth(TOKEN, clock=lambda: time.time() - 120)
    value, _ = old.sign(SERVICE + "Notify", RELEASE.SerializeToString())
    with pytest.raises(grpc.RpcError):
        raw_call(prefill_sched.port, "Notify", RELEASE, ((AUTH_KEY, value),))
    assert _refused(prefill_sched) == {"stale": 1}


def test_push_target_and_handshake_need_the_token():
    srv = ControlServer(auth=ControlAuth(TOKEN))
    srv.add_rank(_desc("p0"))
    srv.push_targets.register("push-1", PushTarget("eng-d", 0, 1, BS, 40, 0, [7, 8, 9],
                                                   10.0))
    srv.start()
    try:
        with ControlClient(srv.target, timeout_s=5) as c:  # no token
            with pytest.raises(HandshakeError, match="refused"):
                c.push_target("push-1")
            with pytest.raises(HandshakeError, match="refused"):
                c.handshake(_desc("d0"))
            with pytest.raises(HandshakeError, match="refused"):
                list(c.stats_stream(timeout_s=2))
        with ControlClient(srv.target, timeout_s=5, auth=ControlAuth("x" * 20)) as c:
            with pytest.raises(HandshakeError, match="refused"):
                c.push_target("push-1")
        assert srv.refused.total == {"missing": 3, "bad_signature": 1}
        with ControlClient(srv.target, timeout_s=5, auth=ControlAuth(TOKEN)) as c:
            t = c.push_target("push-1")
            assert t is not None and t.block_ids == [7, 8, 9]
            assert c.handshake(_desc("d0")).peer.name == "p0"
            assert c.transfer_status("nope")["state"] == "UNKNOWN"
    finally:
        srv.stop()


def test_client_refuses_unsigned_or_forged_answers():
    """A server without the token (or with another one) cannot answer a client that has it."""
    for server_auth in (None, ControlAuth("o" * 24)):
        srv = ControlServer(auth=server_auth)
        srv.push_targets.register("push-1", PushTarget("eng-evil", 0, 1, BS, 40, 0, [1],
                                                       10.0))
        srv.start()
        try:
            with ControlClient(srv.target, timeout_s=5, auth=ControlAuth(TOKEN)) as c:
                with pytest.raises(HandshakeError):
                    c.push_target("push-1")
        finally:
            srv.stop()


def test_nonce_cache_is_bounded_and_never_readmits():
    c = NonceCache(window_s=60, max_entries=3)
    now = 1000.0
    for i in range(5):
        assert c.add(f"n{i}", now + i, now)
    assert len(c) == 3
    assert not c.add("n0", now, now)  # evicted, but below the floor: still refused
    assert not c.add("n4", now + 4, now)  # remembered
    assert c.add("n9", now + 9, now)


def test_config_token_sources_and_strict(tmp_path):
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    assert PdConfig.from_extra({"control_token_file": str(f)}, env={}).control_token == TOKEN
    assert PdConfig.from_extra({}, env={"PDSIDECAR_AUTH_TOKEN_FILE": str(f)}).control_token == TOKEN
    assert PdConfig.from_extra({}, env={}).control_token is None
    with pytest.raises(ValueError, match="require_control_auth"):
        PdConfig.from_extra({"require_control_auth": True}, env={})
    with pytest.raises(ValueError, match="unknown"):  # the token itself is never a key
        PdConfig.from_extra({"control_token": TOKEN}, env={})
    with pytest.raises(ValueError, match="16"):
        load_token(env={"PDSIDECAR_AUTH_TOKEN": "short"})
    with pytest.raises(ValueError, match="control token file"):
        load_token(str(tmp_path / "missing"), env={})
    assert TOKEN not in repr(PdConfig.from_extra({}, env={"PDSIDECAR_AUTH_TOKEN": TOKEN}))


# ------------------------------------------------------------------ same host


def test_same_host_is_proven_not_claimed(tmp_path):
    """Both ends on this host prove it; a claimed host_id without the key proves nothing."""
    from transfer.control_messages import _content_digest, proves_same_host
    seen = []
    srv = ControlServer(on_handshake=seen.append)
    srv.add_rank(_desc("p0"))
    srv.start()
    try:
        with ControlClient(srv.target, timeout_s=5) as c:
            remote = c.handshake(_desc("d0"))
        assert remote.peer.same_host is True and seen[-1].peer.same_host is True
        local = _desc("x").peer
        assert peer_backend("auto", local, remote.peer) == "ipc"

        # a process on another host: same claimed host_id string, its own host key
        other_host = str(tmp_path)
        challenge = hostproof.new_challenge()
        info = _desc("d1", host_id=local.host_id).to_proto()
        info.host_proof = hostproof.prove(hostproof.ROLE_INITIATOR, challenge,
                                          _content_digest(info), directory=other_host)
        assert info.host_proof  # it did prove something, with the wrong key
        raw_call(srv.port, "Handshake", pb.HandshakeRequest(initiator=info,
                                                             host_challenge=challenge))
        assert seen[-1].peer.host_id == local.host_id  # the claim arrived...
        assert seen[-1].peer.same_host is False  # ...and was not believed
        assert peer_backend("auto", local, seen[-1].peer) == "nixl"
        with pytest.raises(Exception, match="ipc needs"):
            peer_backend("ipc", local, seen[-1].peer)
        # the client side: a target's answer proven with another host's key
        target = _desc("p9", host_id=local.host_id).to_proto()
        target.host_proof = hostproof.prove(hostproof.ROLE_TARGET, challenge,
                                            _content_digest(target), directory=other_host)
        assert not proves_same_host(target, hostproof.ROLE_TARGET, challenge)
        target.host_proof = hostproof.prove(hostproof.ROLE_TARGET, challenge,
                                            _content_digest(target))
        assert proves_same_host(target, hostproof.ROLE_TARGET, challenge)
    finally:
        srv.stop()


def test_forged_host_proof_on_the_wire_is_not_believed():
    seen = []
    srv = ControlServer(on_handshake=seen.append)
    srv.add_rank(_desc("p0"))
    srv.start()
    try:
        d = _desc("d0")
        challenge = hostproof.new_challenge()
        from transfer.control_messages import proven_info
        info = proven_info(d, hostproof.ROLE_INITIATOR, challenge)
        # proof copied onto other content (another agent blob): refused
        info.agent_metadata = b"attacker agent"
        req = pb.HandshakeRequest(initiator=info, host_challenge=challenge)
        raw_call(srv.port, "Handshake", req)
        assert seen[-1].peer.same_host is False
        # a target proof replayed as an initiator proof: refused (roles differ)
        info = proven_info(d, hostproof.ROLE_TARGET, challenge)
        raw_call(srv.port, "Handshake", pb.HandshakeRequest(initiator=info,
                                                             host_challenge=challenge))
        assert seen[-1].peer.same_host is False
        # random bytes
        info = d.to_proto()
        info.host_proof = os.urandom(32)
        raw_call(srv.port, "Handshake", pb.HandshakeRequest(initiator=info,
                                                             host_challenge=challenge))
        assert seen[-1].peer.same_host is False
        # the honest one
        info = proven_info(d, hostproof.ROLE_INITIATOR, challenge)
        raw_call(srv.port, "Handshake", pb.HandshakeRequest(initiator=info,
                                                             host_challenge=challenge))
        assert seen[-1].peer.same_host is True
    finally:
        srv.stop()


def test_host_key_file_is_private_and_shared(tmp_path):
    d = str(tmp_path)
    k1 = hostproof._load_or_create(os.path.join(d, "k"))
    k2 = hostproof._load_or_create(os.path.join(d, "k"))
    assert k1 and k1 == k2 and len(k1) == hostproof.KEY_LEN
    assert os.stat(os.path.join(d, "k")).st_mode & 0o077 == 0
    (tmp_path / "bad").write_bytes(b"short")
    assert hostproof._load_or_create(os.path.join(d, "bad")) is None


# ------------------------------------------------------------------ mutual TLS


@pytest.fixture(scope="module")
def tls_dirs(tmp_path_factory):
    from pdsidecar.k8s.certs import write_control_certs
    good, other = tmp_path_factory.mktemp("tls-good"), tmp_path_factory.mktemp("tls-other")
    write_control_certs(str(good))
    write_control_certs(str(other))  # another CA: a stranger's valid-looking certificate
    return str(good), str(other)


def test_mtls_refuses_plaintext_and_foreign_certificates(tls_dirs):
    from transfer.control_auth import TlsFiles
    good, other = (TlsFiles.from_dir(d) for d in tls_dirs)
    srv = ControlServer(tls=good, auth=ControlAuth(TOKEN))
    srv.add_rank(_desc("p0"))
    srv.push_targets.register("push-1", PushTarget("eng-d", 0, 1, BS, 40, 0, [4],
                                                   10.0))
    srv.start()
    try:
        for tls in (None, other):  # plaintext / a certificate from another CA
            with ControlClient(srv.target, timeout_s=3, tls=tls, auth=ControlAuth(TOKEN)) as c:
                with pytest.raises(HandshakeError):
                    c.push_target("push-1")
        no_cert = TlsFiles(good.ca, b"", b"")  # trusts the server, presents nothing
        ch = grpc.secure_channel(srv.target, grpc.ssl_channel_credentials(no_cert.ca),
                                 options=[("grpc.ssl_target_name_override", "pd-engine")])
        with pytest.raises(grpc.RpcError):
            ch.unary_unary(SERVICE + "PushTarget")(
                pb.PushTargetRequest(push_id="push-1").SerializeToString(), timeout=3)
        ch.close()
        with ControlClient(srv.target, timeout_s=5, tls=good, auth=ControlAuth(TOKEN)) as c:
            assert c.push_target("push-1").block_ids == [4]
            assert c.handshake(_desc("d0")).peer.name == "p0"
        # a certificate alone is not enough while the token check is on
        with ControlClient(srv.target, timeout_s=5, tls=good) as c:
            with pytest.raises(HandshakeError, match="refused"):
                c.push_target("push-1")
    finally:
        srv.stop()


def test_tls_config(tls_dirs, tmp_path):
    good, _ = tls_dirs
    cfg = PdConfig.from_extra({"control_tls_dir": good, "require_control_auth": True}, env={})
    assert cfg.control_tls is not None and cfg.control_token is None
    assert PdConfig.from_extra({}, env={"PD_CONTROL_TLS_DIR": good}).control_tls is not None
    with pytest.raises(ValueError, match="ca.crt: No such file"):
        PdConfig.from_extra({"control_tls_dir": str(tmp_path)}, env={})
    with pytest.raises(ValueError, match="unknown"):
        PdConfig.from_extra({"control_tls": "x"}, env={})


def test_control_certs_cli(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "pdsidecar", "control-certs", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "create secret generic pdsidecar-control-tls" in out.stdout
    assert os.stat(tmp_path / "tls.key").st_mode & 0o077 == 0
    from transfer.control_auth import TlsFiles
    assert TlsFiles.from_dir(str(tmp_path)).cert.startswith(b"-----BEGIN CERTIFICATE")


def test_connector_keys_documented_and_read():
    """Every kv_connector_extra_config key in README/docs is a PdConfig key and vice versa."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    keys = set(PdConfig.__dataclass_fields__) - {"control_token", "control_tls"}
    for doc, heading in (("README.md", "### Connector (`kv_connector_extra_config`"),
                         ("docs/connector.md", "### `kv_connector_extra_config` keys")):
        text = (root / doc).read_text()
        table = text[text.index(heading):].split("\n\n", 2)[1]
        documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
        assert documented == keys, (doc, documented ^ keys)


def test_flood_of_unsigned_calls_leaves_no_state(caplog):
    srv = ControlServer(auth=ControlAuth(TOKEN))
    srv.start()
    try:
        ch = grpc.insecure_channel(srv.target)
        call = ch.unary_unary(SERVICE + "PushTarget")
        for i in range(200):
            with pytest.raises(grpc.RpcError):
                call(pb.PushTargetRequest(push_id=f"p{i}", wait_ms=60_000).SerializeToString(),
                     timeout=5, metadata=((AUTH_KEY, f"v1:{i}:{'n' * 24}:{'m' * 43}"),))
        ch.close()
        assert srv.refused.total == {"bad_signature": 200}
        assert len(srv.auth.nonces) == 0 and len(srv.push_targets) == 0
        # the log is rate-limited: the first few refusals, then every 1000th
        assert sum("refused control call" in r.getMessage() for r in caplog.records) <= 5
    finally:
        srv.stop()


def test_unauthenticated_server_warns(caplog):
    import logging
    from transfer.connector.control_client import configure_auth, start_control_server
    configure_auth(None)
    with caplog.at_level(logging.WARNING, logger="vllm.pdsidecar.connector"):
        srv = start_control_server("127.0.0.1", 0)
    srv.stop()
    assert any("UNAUTHENTICATED" in r.getMessage() for r in caplog.records)
