"""Pod harness pieces without engines: namespaces and their cleanup (root), the rendered
dev-cpu pod specs (command mapping, env resolution), prefill injection defaults."""

from __future__ import annotations

import os
import shutil

import pytest

from pdsidecar.dev import netns

needs_root = pytest.mark.skipif(netns.can_create() is not None, reason=f"needs netns: {netns.can_create()}")
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")


@needs_root
def test_namespaces_cleaned_up_after_sigkill(tmp_path):
    """A harness killed with SIGKILL leaves nothing behind: its reaper deletes the
    namespaces (and the processes in them)."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time\n"
            "from pdsidecar.dev.netns import PodNetwork\n"
            "n = PodNetwork(); n.add_pod('a'); n.add_pod('b')\n"
            "import subprocess; subprocess.Popen(n.exec_prefix('a') + ['sleep', '600'])\n"
            "print(n.tag, flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    tag = proc.stdout.readline().strip()
    assert tag and any(n.startswith(tag) for n in netns.list_namespaces())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 30  # the reaper's cleanup; a bound, not a speed claim
    while time.monotonic() < deadline and any(n.startswith(tag) for n in netns.list_namespaces()):
        time.sleep(0.2)
    assert not [n for n in netns.list_namespaces() if n.startswith(tag)]
    assert not (netns.ETC_NETNS / tag).exists()


@needs_root
def test_sweep_removes_namespaces_of_dead_harnesses():
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{netns.PREFIX}-{dead.pid}-1-x"  # a pid that is gone (or reused: start time differs)
    netns.ip("netns", "add", name)
    try:
        assert not netns.owner_alive(name)
        assert name in netns.sweep_stale()
        assert name not in netns.list_namespaces()
    finally:
        netns.ip("netns", "del", name, check=False)
    me = f"{netns.PREFIX}-{os.getpid()}-{netns._start_time(os.getpid())}"
    assert netns.owner_alive(me) and netns.owner_alive("someone-elses-namespace")


@pytest.fixture(scope="module")
def rendered():
    from pdsidecar.dev.podspec import render_overlay

    return {o: render_overlay(f"deploy/overlays/{o}") for o in ("dev-cpu", "single-node", "production")}


@needs_kubectl
@pytest.mark.parametrize("overlay", ["dev-cpu", "single-node", "production"])
def test_every_engine_gets_its_pod_ip(rendered, overlay):
    from pdsidecar.k8s import validate as kv
    from pdsidecar.dev.podspec import lws

    for role in ("prefill", "decode"):
        for _, spec in kv.pod_templates(lws(rendered[overlay], f"pd-{role}")):
            env = {e["name"]: e for e in kv.vllm_container(spec)["env"]}
            for var in ("PD_CONTROL_HOST", "VLLM_NIXL_SIDE_CHANNEL_HOST"):
                assert env[var]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


@needs_kubectl
def test_dev_cpu_pod_specs_resolve_like_the_kubelet(rendered):
    from pdsidecar.dev.podspec import pod_spec

    docs = rendered["dev-cpu"]
    p = pod_spec(docs, "prefill", "10.77.0.2", secrets={"pdsidecar-auth": {"token": "t" * 32}},
                 volume_dirs={"models": "/cache/m"})
    d = pod_spec(docs, "decode", "10.77.0.3", secrets={"pdsidecar-auth": {"token": "t" * 32}},
                 volume_dirs={"models": "/cache/m"})
    assert [(c.name, c.kind) for c in p.containers] == [("tiny-model", "init"), ("pdsidecar", "sidecar"),
                                                        ("vllm", "main")]
    eng = p.container("vllm")
    assert eng.is_engine and eng.env["PD_CONTROL_HOST"] == "10.77.0.2"
    assert eng.argv[1:4] == ["-m", "pdsidecar.dev.vllm_cli", "serve"] and eng.argv[4] == "/cache/m/tiny-mixtral"
    assert not [a for a in eng.argv if a.startswith("--data-parallel")]  # one pod per group: not DP
    assert eng.argv[eng.argv.index("--dtype") + 1] == "float32"
    assert "$(" not in " ".join(eng.argv)
    assert eng.ports == {"vllm-http": 8200, "dp-rpc": 5555, "kv-control": 14600}
    assert "HF_TOKEN" not in eng.env  # optional secret that does not exist
    ps, ds = p.container("pdsidecar"), d.container("pdsidecar")
    assert ps.env["PDSIDECAR_AUTH_TOKEN"] == "t" * 32 and ps.env["POD_IP"] == "10.77.0.2"
    assert ps.env["KV_TRANSFER_TARGET"] == "pd-decode:8000"  # inject --role prefill default
    assert ds.env["KV_TRANSFER_TARGET"] == "pd-prefill-sidecar:8000"
    assert ps.probe.path == "/ready" and ps.startup.path == "/health"
    init = p.container("tiny-model")
    assert init.argv[1:] == ["-m", "pdsidecar", "models", "make", "--arch", "mixtral", "--out",
                             "/cache/m/tiny-mixtral", "--if-missing"]


def test_command_mapping_refuses_unknown_images_and_commands():
    from pdsidecar.dev.podspec import PodSpecError, map_command

    with pytest.raises(PodSpecError, match="unknown image"):
        map_command({"name": "x", "image": "busybox"})
    with pytest.raises(PodSpecError, match="no local mapping"):
        map_command({"name": "x", "image": "busybox", "command": ["sh", "-c", "true"]})


def test_inject_prefill_targets_the_decode_service():
    from pdsidecar.k8s.inject_options import InjectOptions

    assert InjectOptions().target_for("prefill") == "pd-decode:8000"
    assert InjectOptions(decode_service="dec", sidecar_port=9).target_for("prefill") == "dec:9"
    assert InjectOptions(kv_target="x:1").target_for("prefill") == "x:1"


@pytest.mark.parametrize("extra,env,role,refused", [
    ({}, {}, "kv_both", True),
    ({}, {}, "kv_producer", True),
    ({}, {}, "kv_consumer", False),  # nothing is read from a consumer
    ({}, {"PD_CONTROL_HOST": "10.1.2.3"}, "kv_both", False),
    ({"control_host": "::1"}, {}, "kv_both", True),
    ({"control_host": "localhost"}, {}, "kv_both", True),
    ({"allow_loopback": True}, {}, "kv_both", False),
    ({}, {"PD_ALLOW_LOOPBACK": "1"}, "kv_both", False),
    ({}, {}, None, False),  # role unknown (unit use)
])
def test_connector_refuses_loopback_when_peers_read(extra, env, role, refused):
    from transfer.connector.config import PdConfig

    if refused:
        with pytest.raises(ValueError, match="refusing to advertise loopback"):
            PdConfig.from_extra(extra, env=env, kv_role=role)
    else:
        PdConfig.from_extra(extra, env=env, kv_role=role)


def test_local_pods_without_root_says_what_to_do(monkeypatch, capsys):
    from pdsidecar.dev import engines
    from pdsidecar.cli import main

    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    monkeypatch.setattr("pdsidecar.dev.local.vllm_available", lambda: True)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["local", "--pods", "--short"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdsidecar: error: pods need root") and "sudo" in err and "drop --pods" in err
    assert len(err.splitlines()) == 1


@needs_root
def test_pods_are_different_hosts_for_the_same_host_check():
    """Two pods on one machine: separate UTS/IPC/PID namespaces and /dev/shm, so the
    transfer layer's host id differs (as between Kubernetes pods) and protocol auto keeps
    NIXL between them, even for CUDA caches."""
    import subprocess
    import sys

    from transfer.engine import PeerInfo
    from transfer.select import peer_backend

    code = "import os; from transfer.engine import host_id; print(host_id()); print(sorted(os.listdir('/dev/shm')))"
    with netns.PodNetwork() as net:
        out = {}
        for name in ("pd-prefill-0", "pd-decode-0"):
            net.add_pod(name.split("-")[1])
            r = subprocess.run(net.exec_prefix(name.split("-")[1], hostname=name) + [sys.executable, "-c", code],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
            assert r.returncode == 0, r.stderr
            out[name] = r.stdout.splitlines()
    (hp, shm_p), (hd, shm_d) = out["pd-prefill-0"], out["pd-decode-0"]
    assert hp.startswith("pd-prefill-0/") and hd.startswith("pd-decode-0/") and hp != hd
    assert shm_p == shm_d == "[]"  # a private, empty /dev/shm each
    local = PeerInfo("d", "multi", "VRAM", [], host_id=hd)
    remote = PeerInfo("p", "multi", "VRAM", [], host_id=hp, ipc_handles=b"handles")
    assert peer_backend("auto", local, remote) == "nixl"
