"""deploy/: kustomize overlays render, validate offline, and are consistent.

* core kinds: kubernetes-validate (strict); LeaderWorkerSet, InferencePool,
  ServiceMonitor: jsonschema against deploy/crds/ (unknown fields rejected);
* the generated LWS files are up to date and a fixpoint of ``inject``;
* vLLM's own parser accepts leader and worker command lines;
* names and ports line up across objects.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from pdsidecar.k8s import validate as kv
from pdsidecar.k8s.inject import inject
from pdsidecar.k8s.manifests import PROFILES, overlay_documents

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ["production", "single-node", "dev-cpu"]

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {o: kv.render(ROOT / "deploy" / "overlays" / o) for o in OVERLAYS}


def _by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _get(docs, kind, name):
    [d] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(rendered, overlay):
    docs = rendered[overlay]
    errors = {f"{d['kind']}/{d['metadata']['name']}": kv.validate_object(d) for d in docs}
    assert {k: v for k, v in errors.items() if v} == {}
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Service", "Deployment", "PodDisruptionBudget",
            "MutatingWebhookConfiguration", "InferencePool", "ServiceMonitor", "LeaderWorkerSet"} <= kinds
    # everything namespaced lands in the overlay's namespace
    for d in docs:
        if d["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            assert d["metadata"].get("namespace") == "pdsidecar", d["metadata"]["name"]


def _lws_doc():
    return copy.deepcopy(overlay_documents_obj("single-node", "prefill"))


def overlay_documents_obj(overlay, role):
    import yaml

    return yaml.safe_load(overlay_documents(overlay)[f"lws-{role}.yaml"])


@pytest.mark.parametrize(
    "mutate,where",
    [
        (lambda d: d["spec"]["leaderWorkerTemplate"].__setitem__("size", "16"), "size"),
        (lambda d: d["spec"].__setitem__("replica", 8), "replica"),
        (lambda d: d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0].__setitem__("imagePulPolicy", "Always"), "imagePulPolicy"),
        (lambda d: d["spec"]["leaderWorkerTemplate"].__delitem__("workerTemplate"), "workerTemplate"),
        (lambda d: d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["initContainers"][0].__setitem__("restartPolicy", 3), "restartPolicy"),
    ],
)
def test_lws_schema_rejects_broken_objects(mutate, where):
    doc = _lws_doc()
    assert kv.validate_object(doc) == []
    mutate(doc)
    errs = kv.validate_object(doc)
    assert errs and any(where in e for e in errs), errs


def test_other_schemas_reject_broken_objects(rendered):
    docs = rendered["production"]
    pool = copy.deepcopy(_get(docs, "InferencePool", "pd-decode"))
    pool["spec"]["targetPorts"] = []
    assert kv.validate_object(pool)
    pool["spec"]["targetPorts"] = [{"number": 8000}]
    pool["spec"]["targetPortNumber"] = 8000  # the seed's v1alpha2 field: gone in v1
    assert kv.validate_object(pool)
    sm = copy.deepcopy(_get(docs, "ServiceMonitor", "pdsidecar"))
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert kv.validate_object(sm)
    svc = copy.deepcopy(_get(docs, "Service", "pd-decode-sidecar"))
    svc["spec"]["ports"][0]["port"] = "eight thousand"
    assert kv.validate_object(svc)
    assert kv.validate_object({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_generated_lws_files_up_to_date(overlay):
    for fname, text in overlay_documents(overlay).items():
        path = ROOT / "deploy" / "overlays" / overlay / fname
        assert path.read_text() == text, f"{path} is stale: run python -m pdsidecar.k8s.manifests"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_lws_shape_and_injection_fixpoint(rendered, overlay):
    prof = PROFILES[overlay]
    lws = {d["metadata"]["name"]: d for d in _by_kind(rendered[overlay], "LeaderWorkerSet")}
    assert set(lws) == {"pd-prefill", "pd-decode"}
    for role in ("prefill", "decode"):
        d = lws[f"pd-{role}"]
        assert d["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
        assert d["spec"]["replicas"] == prof.replicas
        assert d["spec"]["leaderWorkerTemplate"]["size"] == prof.size
        # the rendered manifest is exactly what `pdsidecar inject` produces
        assert inject(d, role, prof.inject) == d
        for label, spec in kv.pod_templates(d):
            c = kv.vllm_container(spec)
            assert c["resources"]["limits"].get("nvidia.com/gpu") == (prof.gpus_per_pod or None)
            if prof.inject.rdma_resource:
                assert c["resources"]["limits"][prof.inject.rdma_resource] == 1
            # the sidecar is the one restartable init container (dev-cpu also runs a model maker first)
            has_sidecar = [i["name"] for i in spec.get("initContainers", []) if i.get("restartPolicy") == "Always"] == ["pdsidecar"]
            assert has_sidecar == (label == "leader")
    if overlay == "production":
        assert prof.replicas * prof.size * 2 == 256  # seed: 256 GPUs for Pattern 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_vllm_args_parse(rendered, vllm_parse, overlay):
    prof = PROFILES[overlay]
    for d in _by_kind(rendered[overlay], "LeaderWorkerSet"):
        name = d["metadata"]["name"]
        for label, spec in kv.pod_templates(d):
            idx = 0 if label == "leader" else prof.size - 1
            env = kv.lws_env(worker_index=idx, size=prof.size, name=name, ns="pdsidecar")
            ns = vllm_parse(kv.expand_vars(kv.vllm_serve_args(kv.vllm_container(spec)), env))
            assert ns.data_parallel_size == prof.size
            if prof.size > 1:
                assert ns.data_parallel_size_local == 1
                assert ns.data_parallel_start_rank == idx and ns.data_parallel_rpc_port == 5555
                assert ns.data_parallel_address == f"{name}-0.{name}.pdsidecar"
            else:  # vLLM refuses --data-parallel-start-rank with DP size 1
                assert ns.data_parallel_start_rank is None and ns.data_parallel_address is None
            assert ns.enable_expert_parallel and ns.tensor_parallel_size == 1
            assert ns.headless == (label == "worker")
            if label == "leader":
                assert ns.port == 8200
            cfg = ns.kv_transfer_config
            assert (cfg.kv_connector, cfg.kv_connector_module_path, cfg.kv_role) == ("PdConnector", "transfer.connector", "kv_both")
            want = {"control_port": 14600, "protocol": prof.inject.protocol, "require_control_auth": True}
            if prof.inject.control_tls_secret:  # mutual TLS from the mounted Secret
                want["control_tls_dir"] = "/etc/pdsidecar/control-tls"
                vols = {v["name"]: v for v in spec["volumes"]}
                [m] = [m for m in kv.vllm_container(spec)["volumeMounts"]
                       if m["mountPath"] == want["control_tls_dir"]]
                assert vols[m["name"]]["secret"]["secretName"] == prof.inject.control_tls_secret
            assert cfg.kv_connector_extra_config == want


def _pod_specs_selected(docs, selector: dict):
    """Pod specs (with their labels) of workloads whose pods match selector."""
    out = []
    for d in docs:
        if d["kind"] == "LeaderWorkerSet":
            name = d["metadata"]["name"]
            lwt = d["spec"]["leaderWorkerTemplate"]
            for idx, tpl in (("0", lwt["leaderTemplate"]), ("1", lwt["workerTemplate"])):
                labels = dict(tpl["metadata"].get("labels", {}), **{
                    "leaderworkerset.sigs.k8s.io/name": name, "leaderworkerset.sigs.k8s.io/worker-index": idx})
                out.append((labels, tpl["spec"]))
        elif d["kind"] == "Deployment":
            out.append((d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"]))
    return [spec for labels, spec in out if all(labels.get(k) == v for k, v in selector.items())]


def _sidecar(spec):
    [sc] = [c for c in spec.get("initContainers", []) if c["name"] == "pdsidecar"]
    return sc


def _ports(spec):
    return {(p.get("name"), p["containerPort"]) for c in spec.get("containers", []) + spec.get("initContainers", []) for p in c.get("ports", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cross_references(rendered, overlay):
    docs = rendered[overlay]
    services = {d["metadata"]["name"]: d for d in _by_kind(docs, "Service")}
    # every Service selects pods that expose its target ports
    for name, svc in services.items():
        specs = _pod_specs_selected(docs, svc["spec"]["selector"])
        assert specs, f"Service {name} selects nothing"
        for p in svc["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            for spec in specs:
                assert any((t == n) or (t == num) for n, num in _ports(spec)), f"{name}: target {t} not exposed"
    # InferencePool targets the decode sidecar's port on decode leaders
    pool = _get(docs, "InferencePool", "pd-decode")
    specs = _pod_specs_selected(docs, pool["spec"]["selector"]["matchLabels"])
    assert specs and all(("http", pool["spec"]["targetPorts"][0]["number"]) in _ports(s) for s in specs)
    assert all(_sidecar(s)["args"] == ["run", "--role", "decode"] for s in specs)
    # ServiceMonitor finds both sidecar services and their metrics port
    sm = _get(docs, "ServiceMonitor", "pdsidecar")
    sel = sm["spec"]["selector"]["matchLabels"]
    monitored = [n for n, s in services.items() if all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
    assert sorted(monitored) == ["pd-decode-sidecar", "pd-prefill-sidecar"]
    assert all(any(p["name"] == sm["spec"]["endpoints"][0]["port"] for p in services[n]["spec"]["ports"]) for n in monitored)
    # the webhook configuration points at the webhook Service
    mwc = _get(docs, "MutatingWebhookConfiguration", "pdsidecar")
    ref = mwc["webhooks"][0]["clientConfig"]["service"]
    wsvc = services[ref["name"]]
    assert ref["namespace"] == wsvc["metadata"]["namespace"] and ref["port"] == wsvc["spec"]["ports"][0]["port"]
    # decode sidecars' KV_TRANSFER_TARGET is the prefill sidecar service
    dec = _get(docs, "LeaderWorkerSet", "pd-decode")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    env = {e["name"]: e.get("value") for e in _sidecar(dec)["env"]}
    host, port = env["KV_TRANSFER_TARGET"].split(":")
    assert host in services and int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    # prefill sidecars' KV_TRANSFER_TARGET (= their allowlist) is a headless Service of the
    # decode pods, so it resolves to the decode pod IPs their requests come from
    pre = _get(docs, "LeaderWorkerSet", "pd-prefill")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    env = {e["name"]: e.get("value") for e in _sidecar(pre)["env"]}
    host, port = env["KV_TRANSFER_TARGET"].split(":")
    assert services[host]["spec"]["clusterIP"] == "None" and int(port) == 8000
    assert services[host]["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": "pd-decode"}
    # service accounts referenced exist
    sas = {d["metadata"]["name"] for d in _by_kind(docs, "ServiceAccount")}
    for d in _by_kind(docs, "LeaderWorkerSet"):
        for _, spec in kv.pod_templates(d):
            assert spec["serviceAccountName"] in sas
    # scrape annotations on the sidecar pods
    for d in _by_kind(docs, "LeaderWorkerSet"):
        ann = d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9090"


def test_single_node_has_dev_secret_production_does_not(rendered):
    assert [s["metadata"]["name"] for s in _by_kind(rendered["single-node"], "Secret")] == ["pdsidecar-auth"]
    assert _by_kind(rendered["production"], "Secret") == []


def test_crd_readme_names_sources():
    text = (ROOT / "deploy" / "crds" / "README.md").read_text()
    for f in (ROOT / "deploy" / "crds").glob("*.schema.json"):
        src = json.loads(f.read_text())["source"]
        assert src["repo"] in text and src["tag"] in text and src["path"] in text


def _allows(policy: dict, from_labels: dict, port: int) -> bool:
    """Whether one of `policy`'s ingress rules lets a same-namespace pod labelled
    `from_labels` reach TCP `port`."""
    for rule in policy["spec"].get("ingress") or []:
        peers = rule.get("from")
        if peers is not None and not any(
                set(p.get("podSelector", {}).get("matchLabels", {}).items()) <= set(from_labels.items())
                and "namespaceSelector" not in p and "ipBlock" not in p for p in peers):
            continue
        ports = rule.get("ports")
        if ports is None or any(p["port"] <= port <= p.get("endPort", p["port"]) for p in ports):
            return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_match_the_pods(rendered, overlay):
    """vLLM on 127.0.0.1; control plane and UCX ports reachable only from the other role."""
    docs = rendered[overlay]
    pols = {d["spec"]["podSelector"]["matchLabels"]["pdsidecar.io/role"]: d
            for d in _by_kind(docs, "NetworkPolicy")}
    assert sorted(pols) == ["decode", "prefill"]
    # the LWS controller adds leaderworkerset.sigs.k8s.io/name to every pod
    labels = {r: {"pdsidecar.io/role": r, "leaderworkerset.sigs.k8s.io/name": f"pd-{r}"}
              for r in ("prefill", "decode")}
    stranger = {"app": "something-else"}
    for role, other in (("prefill", "decode"), ("decode", "prefill")):
        pol = pols[role]
        assert pol["spec"]["policyTypes"] == ["Ingress"]
        lws = _get(docs, "LeaderWorkerSet", f"pd-{role}")
        for label, spec in kv.pod_templates(lws):
            c = kv.vllm_container(spec)
            args = kv.vllm_serve_args(c)
            cfg = json.loads(args[args.index("--kv-transfer-config") + 1])
            ctrl = cfg["kv_connector_extra_config"]["control_port"]
            env = {e["name"]: e.get("value") for e in c["env"]}
            lo, hi = (int(x) for x in env["UCX_TCP_PORT_RANGE"].split("-"))
            for port in (ctrl, ctrl + 15, lo, hi):  # control_port + DP rank (16 ranks), UCX range
                assert _allows(pol, labels[other], port), (role, port)
                assert not _allows(pol, stranger, port), (role, port)
            assert not _allows(pol, stranger, hi + 1)
            if label != "worker":
                assert args[args.index("--host") + 1] == "127.0.0.1"  # vLLM: sidecar only
                vport = int(args[args.index("--port") + 1])
                assert not _allows(pol, labels[other], vport) and not _allows(pol, stranger, vport)
                assert all("httpGet" not in c.get(p, {}) for p in ("readinessProbe", "livenessProbe", "startupProbe"))
            # same-LWS traffic (DP RPC, NCCL bootstrap) stays open
            assert _allows(pol, labels[role], 5555)
    # the prefill sidecar answers decode pods only; the decode sidecar answers everyone
    assert _allows(pols["prefill"], labels["decode"], 8000) and not _allows(pols["prefill"], stranger, 8000)
    assert _allows(pols["decode"], stranger, 8000)
    assert _allows(pols["decode"], stranger, 9090) and _allows(pols["prefill"], stranger, 9090)


def test_network_policy_schema_rejects_broken_objects(rendered):
    import copy
    pol = _by_kind(rendered["production"], "NetworkPolicy")[0]
    assert kv.validate_object(pol) == []
    bad = copy.deepcopy(pol)
    bad["spec"]["ingress"][0]["ports"][1]["endPort"] = "14663"
    assert kv.validate_object(bad)
    bad = copy.deepcopy(pol)
    bad["spec"]["ingress"][0]["fromm"] = bad["spec"]["ingress"][0].pop("from")
    assert kv.validate_object(bad)
