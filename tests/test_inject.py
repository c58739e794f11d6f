"""Sidecar injection: goldens, idempotence, CLI errors, vLLM argument parsing.

Regenerate the goldens after an intended change with
``PDSIDECAR_UPDATE_GOLDEN=1 pytest tests/test_inject.py`` and review the diff.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pdsidecar.k8s import validate as kv
from pdsidecar.k8s.inject import inject, inject_documents, run_inject
from pdsidecar.k8s.inject_options import InjectError, InjectOptions
from pdsidecar.k8s.vllm_args import kv_transfer_config

GOLDEN = Path(__file__).parent / "golden"
INPUTS = ["pod", "deployment", "lws"]
ROLES = ["prefill", "decode"]
UPDATE = os.environ.get("PDSIDECAR_UPDATE_GOLDEN") == "1"

CONNECTOR = {
    "kv_connector": "PdConnector",
    "kv_connector_module_path": "transfer.connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
    "kv_connector_extra_config": {"control_port": 14600, "protocol": "auto",
                                  "require_control_auth": True},
}


def _load(name: str) -> dict:
    return yaml.safe_load((GOLDEN / f"{name}.input.yaml").read_text())


def _flag(args, flag):
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("role", ROLES)
def test_golden(name, role):
    out = inject_documents((GOLDEN / f"{name}.input.yaml").read_text(), role, InjectOptions())
    path = GOLDEN / f"{name}.{role}.yaml"
    if UPDATE:
        path.write_text(out)
    assert out == path.read_text(), f"{path.name} differs (PDSIDECAR_UPDATE_GOLDEN=1 to regenerate)"


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("role", ROLES)
def test_idempotent_and_input_untouched(name, role):
    doc = _load(name)
    before = copy.deepcopy(doc)
    once = inject(doc, role)
    assert doc == before
    assert inject(once, role) == once
    # and through YAML text, as the CLI does
    text = inject_documents(yaml.safe_dump(doc), role, InjectOptions())
    assert inject_documents(text, role, InjectOptions()) == text


@pytest.mark.parametrize("role", ROLES)
def test_pod_contract(role):
    out = inject(_load("pod"), role)
    spec = out["spec"]
    vllm = spec["containers"][0]
    args = vllm["args"]
    # connector replaced in place, not duplicated; port moved behind the sidecar
    assert args.count("--kv-transfer-config") == 1 and not any(a.startswith("--port=") for a in args)
    assert json.loads(_flag(args, "--kv-transfer-config")) == CONNECTOR
    assert _flag(args, "--port") == "8200"
    # vLLM listens on 127.0.0.1 only (the sidecar is its only client); kubelet probes
    # come from the node, so they run inside the container
    assert _flag(args, "--host") == "127.0.0.1"
    assert "httpGet" not in vllm["readinessProbe"]
    assert "http://127.0.0.1:8200/health" in vllm["readinessProbe"]["exec"]["command"][-1]
    venv = {e["name"]: e.get("value", e.get("valueFrom")) for e in vllm["env"]}
    assert venv["PDSIDECAR_AUTH_TOKEN"] == {"secretKeyRef": {"name": "pdsidecar-auth", "key": "token"}}
    assert venv["UCX_TCP_PORT_RANGE"] == "14700-14799"
    assert {p["containerPort"] for p in vllm["ports"]} == {8200, 14600}
    assert "IPC_LOCK" in vllm["securityContext"]["capabilities"]["add"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in vllm["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in spec["volumes"]
    assert spec["shareProcessNamespace"] is True and "hostIPC" not in spec
    [sc] = spec["initContainers"]
    assert sc["name"] == "pdsidecar" and sc["restartPolicy"] == "Always"
    assert sc["args"] == ["run", "--role", role]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in sc["env"]}
    assert env["PREFILL_MODE"] == ("true" if role == "prefill" else "false")
    assert env["PDSIDECAR_VLLM_URL"] == "http://127.0.0.1:8200"
    assert env["PDSIDECAR_PORT"] == "8000" and env["PDSIDECAR_METRICS_PORT"] == "9090"
    assert env["KV_TRANSFER_PROTOCOL"] == "auto"
    assert env["PDSIDECAR_AUTH_TOKEN"] == {"secretKeyRef": {"name": "pdsidecar-auth", "key": "token"}}
    # seed contract: each role names the other's service (prefill: its allowlist)
    assert env["KV_TRANSFER_TARGET"] == ("pd-prefill-sidecar:8000" if role == "decode" else "pd-decode:8000")
    assert sc["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert sc["livenessProbe"]["httpGet"]["path"] == "/health"
    assert sc["resources"]["limits"] and sc["resources"]["requests"]
    assert out["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    assert out["metadata"]["labels"]["pdsidecar.io/role"] == role


def test_options_rdma_hostipc_ucx():
    o = InjectOptions(protocol="rdma", rdma_resource="rdma/ib", rdma_count=2, host_ipc=True,
                      ucx_net_devices="mlx5_0:1,mlx5_1:1", kv_target="10.0.0.1:8000,10.0.0.2:8000",
                      allowed_peers="10.0.0.0/8", control_port=15000)
    out = inject(_load("deployment"), "decode", o)
    spec = out["spec"]["template"]["spec"]
    assert spec["hostIPC"] is True
    eng = next(c for c in spec["containers"] if c["name"] == "engine")
    assert eng["resources"]["limits"]["rdma/ib"] == 2 and eng["resources"]["requests"]["rdma/ib"] == 2
    assert eng["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in eng["env"]}
    assert env["UCX_NET_DEVICES"] == "mlx5_0:1,mlx5_1:1" and "rc" in env["UCX_TLS"]
    cfg = json.loads(_flag(eng["args"], "--kv-transfer-config"))
    assert cfg["kv_connector_extra_config"] == {"control_port": 15000, "protocol": "rdma",
                                                 "require_control_auth": True}
    # command-form vLLM: flags go to args, command untouched
    assert eng["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(eng["args"], "--port") == "8200"
    # the log shipper is untouched, the model-download init container stays first
    assert next(c for c in spec["containers"] if c["name"] == "log-shipper") == {"name": "log-shipper", "image": "fluent/fluent-bit:3.0"}
    assert [c["name"] for c in spec["initContainers"]] == ["fetch-model", "pdsidecar"]
    sc_env = {e["name"]: e.get("value") for e in spec["initContainers"][1]["env"]}
    assert sc_env["KV_TRANSFER_TARGET"] == "10.0.0.1:8000,10.0.0.2:8000"
    assert sc_env["KV_TRANSFER_PROTOCOL"] == "rdma" and sc_env["PDSIDECAR_ALLOWED_PEERS"] == "10.0.0.0/8"
    assert inject(out, "decode", o) == out


def test_lws_sidecar_on_leader_only():
    out = inject(_load("lws"), "prefill")
    lwt = out["spec"]["leaderWorkerTemplate"]
    leader, worker = lwt["leaderTemplate"]["spec"], lwt["workerTemplate"]["spec"]
    assert [c["name"] for c in leader["initContainers"]] == ["pdsidecar"]
    assert "initContainers" not in worker
    for spec in (leader, worker):
        args = spec["containers"][0]["args"]
        assert json.loads(_flag(args, "--kv-transfer-config")) == CONNECTOR
        assert spec["shareProcessNamespace"] is True
    assert _flag(leader["containers"][0]["args"], "--port") == "8200"
    assert "--port" not in worker["containers"][0]["args"] and "--headless" in worker["containers"][0]["args"]
    assert lwt["size"] == 16 and out["spec"]["replicas"] == 8


def test_lws_without_leader_template_is_split():
    doc = _load("lws")
    lwt = doc["spec"]["leaderWorkerTemplate"]
    del lwt["leaderTemplate"]
    out = inject(doc, "decode")
    lwt2 = out["spec"]["leaderWorkerTemplate"]
    assert "initContainers" in lwt2["leaderTemplate"]["spec"]
    assert "initContainers" not in lwt2["workerTemplate"]["spec"]
    assert inject(out, "decode") == out


def test_existing_dotted_kv_flags_and_shm_are_respected():
    pod = _load("pod")
    c = pod["spec"]["containers"][0]
    c["args"] = ["m", "--kv-transfer-config.kv_connector", "X", "--kv-transfer-config.kv_role=kv_producer"]
    c["volumeMounts"] = [{"name": "myshm", "mountPath": "/dev/shm"}]
    pod["spec"]["volumes"] = [{"name": "myshm", "emptyDir": {"medium": "Memory"}}]
    out = inject(pod, "prefill")
    args = out["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--kv-transfer-config.") for a in args)
    assert json.loads(_flag(args, "--kv-transfer-config")) == CONNECTOR
    assert out["spec"]["volumes"] == [{"name": "myshm", "emptyDir": {"medium": "Memory"}}]


@pytest.mark.parametrize(
    "doc,role,msg",
    [
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}, "decode", "unsupported kind"),
        ({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "a", "image": "nginx"}]}}, "decode", "no vLLM container"),
        ({"apiVersion": "v1", "kind": "Pod", "spec": {}}, "decode", "no containers"),
        ({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "v", "image": "vllm/vllm-openai", "command": ["sh", "-c", "vllm serve m"]}]}}, "decode", "shell"),
        ({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {}}, "decode", "spec.template"),
        ({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "v", "image": "vllm/x"}]}}, "both", "unknown role"),
    ],
)
def test_inject_errors(doc, role, msg):
    with pytest.raises(InjectError, match=msg):
        inject(doc, role)


def _cli(argv, stdin: str = "", capsys=None, monkeypatch=None):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = run_inject(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "argv,stdin,msg",
    [
        (["--role", "decode"], "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n", "unsupported kind"),
        (["--role", "decode"], "kind: Pod\nspec: [unclosed\n", "not valid YAML"),
        (["--role", "decode"], "just a string\n", "not a Kubernetes object"),
        (["--role", "decode"], "", "no YAML documents"),
        (["--role", "middle"], "kind: Pod\n", "unknown role"),
        (["--role", "decode"], "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: nginx}]\n", "no vLLM container"),
        (["--role", "decode", "/nonexistent/file.yaml"], "", "cannot read"),
        (["--role", "decode", "--protocol", "carrier-pigeon"], "", "invalid choice"),
    ],
)
def test_cli_errors_are_one_line(argv, stdin, msg, capsys, monkeypatch):
    rc, out, err = _cli(argv, stdin, capsys, monkeypatch)
    assert rc != 0 and out == ""
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_multidoc_stdin_and_file(tmp_path, capsys, monkeypatch):
    text = (GOLDEN / "pod.input.yaml").read_text() + "---\n" + (GOLDEN / "deployment.input.yaml").read_text()
    rc, out, err = _cli(["--role", "decode"], text, capsys, monkeypatch)
    assert rc == 0 and err == ""
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Pod", "Deployment"]
    f = tmp_path / "in.yaml"
    f.write_text(text + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
    rc, out2, _ = _cli(["--role", "decode", str(f), "--skip-unknown"], "", capsys, monkeypatch)
    assert rc == 0 and out2.startswith(out) and "kind: Service" in out2
    # idempotent through the CLI
    rc, out3, _ = _cli(["--role", "decode"], out, capsys, monkeypatch)
    assert rc == 0 and out3 == out


def test_module_entry_no_traceback():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    p = subprocess.run([sys.executable, "-m", "pdsidecar.k8s.inject", "--role", "decode"], input="kind: Nope\n",
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().startswith("pdsidecar inject: error:") and "Traceback" not in p.stderr


def test_kv_transfer_config_is_the_contract():
    assert json.loads(kv_transfer_config(InjectOptions())) == CONNECTOR


# --------------------------------------------------------------------------- #
# vLLM's own argument parser accepts what we render


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("role", ROLES)
def test_rendered_args_parse_with_vllm(vllm_parse, name, role):
    out = inject(_load(name), role, InjectOptions(protocol="rdma"))
    for label, spec in kv.pod_templates(out):
        c = kv.vllm_container(spec)
        worker = label == "worker"
        args = kv.expand_vars(kv.vllm_serve_args(c), kv.lws_env(worker_index=3 if worker else 0))
        ns = vllm_parse(args)
        cfg = ns.kv_transfer_config
        assert cfg.kv_connector == "PdConnector"
        assert cfg.kv_connector_module_path == "transfer.connector"
        assert cfg.kv_role == "kv_both" and cfg.kv_load_failure_policy == "recompute"
        assert cfg.kv_connector_extra_config == {"control_port": 14600, "protocol": "rdma",
                                                   "require_control_auth": True}
        if worker:
            assert ns.headless is True and ns.data_parallel_start_rank == 3
        else:
            assert ns.port == 8200 and ns.headless is False
        if name == "lws":
            assert ns.data_parallel_size == 16 and ns.enable_expert_parallel is True
            assert ns.data_parallel_address == "pd-0.pd.default"


def test_vllm_parser_rejects_invented_flags(vllm_parse):
    # the seed's invented flags must not be accepted (guards the parser check itself)
    with pytest.raises(SystemExit):
        vllm_parse(["m", "--kv-transfer-mode=rdma"])


def test_wired_through_pdsidecar_cli(capsys, monkeypatch):
    cli = pytest.importorskip("pdsidecar.cli")
    monkeypatch.setattr(sys, "stdin", io.StringIO((GOLDEN / "pod.input.yaml").read_text()))
    rc = cli.main(["inject", "--role", "decode"])
    out, _ = capsys.readouterr()
    assert rc == 0 and out == (GOLDEN / "pod.decode.yaml").read_text()


def test_control_tls_secret_mounts_and_configures_mtls():
    out = inject(_load("lws"), "prefill", InjectOptions(control_tls_secret="pd-tls"))
    assert inject(out, "prefill", InjectOptions(control_tls_secret="pd-tls")) == out
    for label, spec in kv.pod_templates(out):
        c = kv.vllm_container(spec)
        cfg = json.loads(_flag(kv.vllm_serve_args(c), "--kv-transfer-config"))["kv_connector_extra_config"]
        assert cfg["control_tls_dir"] == "/etc/pdsidecar/control-tls" and cfg["require_control_auth"] is True
        [m] = [m for m in c["volumeMounts"] if m["mountPath"] == cfg["control_tls_dir"]]
        [v] = [v for v in spec["volumes"] if v["name"] == m["name"]]
        assert v["secret"]["secretName"] == "pd-tls" and m["readOnly"] is True
    # no Secret at all: no auth flag, no token env (a dev setup; the engine warns)
    bare = inject(_load("pod"), "decode", InjectOptions(auth_secret=None))
    c = bare["spec"]["containers"][0]
    assert "require_control_auth" not in _flag(c["args"], "--kv-transfer-config")
    assert all(e["name"] != "PDSIDECAR_AUTH_TOKEN" for e in c.get("env", []))
