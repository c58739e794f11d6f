"""Sidecar injection for prefill/decode vLLM workloads.

``inject(doc, role, options)`` takes a Kubernetes object (Pod, Deployment,
StatefulSet or LeaderWorkerSet, as a dict) and returns a new dict where

* the pdsidecar proxy runs as a *native sidecar* (an initContainer with
  ``restartPolicy: Always``) listening on ``sidecar_port`` (8000) in front of
  vLLM, which is moved to ``vllm_port`` (8200) and bound to ``127.0.0.1`` (the
  sidecar is its only client; its probes become ``exec`` probes inside the pod);
* the vLLM container gets ``--kv-transfer-config`` for our ``PdConnector``
  (added, or replacing an existing one), the ``/dev/shm`` memory volume, the
  ``IPC_LOCK`` capability, UCX environment (TCP ports pinned to
  ``ucx_tcp_port_range`` so a NetworkPolicy can name them) and optionally an RDMA
  device; with an ``auth_secret``, the shared token (``PDSIDECAR_AUTH_TOKEN``) for
  the connector's control plane, which then refuses to start without it;
* the pod gets ``shareProcessNamespace`` (CUDA IPC between containers),
  optionally ``hostIPC``, the role label/annotation and Prometheus scrape
  annotations.

For a LeaderWorkerSet, the sidecar and the API-server port move go to the
leader template only (the leader runs vLLM's API server, workers run
``--headless``); the connector, shm, IPC and RDMA settings go to both.

Injection is idempotent: ``inject(inject(x)) == inject(x)``.

``run_inject(argv)`` is the ``pdsidecar inject`` command line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import yaml

__all__ = [
    "ROLES",
    "InjectError",
    "InjectOptions",
    "inject",
    "inject_pod_spec",
    "inject_documents",
    "kv_transfer_config",
    "add_inject_arguments",
    "options_from_args",
    "run_inject",
]

ROLES = ("prefill", "decode")

ROLE_KEY = "pdsidecar.io/role"
INJECTED_KEY = "pdsidecar.io/injected"
INJECTED_VALUE = "v1"
SIDECAR_NAME = "pdsidecar"
SHM_VOLUME = "dshm"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"

DEFAULT_IMAGE = "ghcr.io/pdsidecar/pdsidecar:0.1.0"
DEFAULT_UCX_TLS = "rc,ud,sm,self,cuda_copy,cuda_ipc,tcp"
# UCX's TCP transport listens on random ports unless pinned; deploy/base's
# NetworkPolicies open exactly this range between the prefill and decode pods.
DEFAULT_UCX_TCP_PORT_RANGE = "14700-14799"
CONTROL_TLS_DIR = "/etc/pdsidecar/control-tls"
CONTROL_TLS_VOLUME = "pd-control-tls"


class InjectError(Exception):
    """Input cannot be injected; the message is meant for the user (one line)."""


@dataclass
class InjectOptions:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    vllm_container: str | None = None  # name; None = auto-detect
    protocol: str = "auto"  # rdma|ipc|tcp|auto
    kv_target: str | None = None  # KV_TRANSFER_TARGET; decode default below
    sidecar_port: int = 8000
    metrics_port: int = 9090
    vllm_port: int = 8200
    control_port: int = 14600
    auth_secret: str | None = "pdsidecar-auth"  # Secret name, key `auth_secret_key`
    auth_secret_key: str = "token"
    control_tls_secret: str | None = None  # Secret with ca.crt/tls.crt/tls.key: control-plane mTLS
    allowed_peers: str | None = None
    host_ipc: bool = False
    share_process_namespace: bool = True
    shm_size: str | None = "16Gi"
    rdma_resource: str | None = None  # e.g. "rdma/ib"
    rdma_count: int = 1
    ucx_tls: str | None = DEFAULT_UCX_TLS
    ucx_net_devices: str | None = None  # e.g. "mlx5_0:1,mlx5_1:1"
    ucx_tcp_port_range: str | None = DEFAULT_UCX_TCP_PORT_RANGE  # UCX_TCP_PORT_RANGE
    ipc_lock: bool = True
    sidecar_cpu_request: str = "500m"
    sidecar_memory_request: str = "512Mi"
    sidecar_cpu_limit: str = "2"
    sidecar_memory_limit: str = "2Gi"
    prefill_service: str = "pd-prefill-sidecar"  # decode default target host
    # prefill default target host (= its allowlist of decode sidecars). Headless, so the
    # name resolves to the decode pods' IPs, which the prefill sidecar matches against
    # the signed x-pd-peer and the connection's source address.
    decode_service: str = "pd-decode"
    extra: dict = field(default_factory=dict)

    def target_for(self, role: str) -> str | None:
        if self.kv_target:
            return self.kv_target
        if role == "decode":
            return f"{self.prefill_service}:{self.sidecar_port}"
        if role == "prefill":
            return f"{self.decode_service}:{self.sidecar_port}"
        return None


# --------------------------------------------------------------------------- #
# vLLM arguments


def kv_transfer_config(options: InjectOptions) -> str:
    """The ``--kv-transfer-config`` JSON (the connector contract)."""
    cfg = {
        "kv_connector": "PdConnector",
        "kv_connector_module_path": "transfer.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "control_port": options.control_port,
            "protocol": options.protocol,
        },
    }
    if options.control_tls_secret:
        cfg["kv_connector_extra_config"]["control_tls_dir"] = CONTROL_TLS_DIR
    if options.auth_secret or options.control_tls_secret:  # refuse to run without them
        cfg["kv_connector_extra_config"]["require_control_auth"] = True
    return json.dumps(cfg, separators=(",", ":"))


def _strip_flag(args: list[str], flag: str, *, prefix_dotted: bool = False) -> tuple[list[str], int | None]:
    """Remove ``flag VALUE`` / ``flag=VALUE`` (and ``flag.x VALUE`` when
    prefix_dotted); return the new list and the index of the first removal."""
    out: list[str] = []
    first: int | None = None
    i = 0
    while i < len(args):
        a = args[i]
        dotted = prefix_dotted and a.startswith(flag + ".")
        if a == flag or (dotted and "=" not in a):
            first = len(out) if first is None else first
            i += 2
            continue
        if a.startswith(flag + "=") or (dotted and "=" in a):
            first = len(out) if first is None else first
            i += 1
            continue
        out.append(a)
        i += 1
    return out, first


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _set_flag(args: list[str], flag: str, value: str, *, prefix_dotted: bool = False) -> list[str]:
    args, pos = _strip_flag(args, flag, prefix_dotted=prefix_dotted)
    if pos is None:
        return args + [flag, value]
    return args[:pos] + [flag, value] + args[pos:]


_SHELLS = {"sh", "bash", "dash", "ash", "zsh", "/bin/sh", "/bin/bash", "/usr/bin/bash", "/usr/bin/env"}


def _arg_list(c: dict) -> tuple[str, list[str]]:
    """Which list carries vLLM's flags: ``args`` (official image: entrypoint
    is ``vllm serve``) unless only ``command`` is set."""
    cmd = list(c.get("command") or [])
    args = list(c.get("args") or [])
    if cmd and cmd[0].rsplit("/", 1)[-1] in {s.rsplit("/", 1)[-1] for s in _SHELLS} and "-c" in (cmd + args):
        raise InjectError(
            f"container {c.get('name')!r} runs vLLM through a shell script; "
            "use exec-form command/args so flags can be injected"
        )
    if args or not cmd:
        return "args", args
    return "command", cmd


# --------------------------------------------------------------------------- #
# container helpers


def _is_vllm(c: dict) -> bool:
    if c.get("name") == SIDECAR_NAME:
        return False
    hay = " ".join([str(c.get("image", ""))] + [str(x) for x in (c.get("command") or [])] + [str(x) for x in (c.get("args") or [])][:3])
    return "vllm" in hay.lower()


def _find_vllm(spec: dict, options: InjectOptions) -> dict:
    containers = spec.get("containers") or []
    if not isinstance(containers, list) or not containers:
        raise InjectError("pod spec has no containers")
    if options.vllm_container:
        for c in containers:
            if isinstance(c, dict) and c.get("name") == options.vllm_container:
                return c
        raise InjectError(f"no container named {options.vllm_container!r}")
    for c in containers:
        if isinstance(c, dict) and _is_vllm(c):
            return c
    names = ", ".join(str(c.get("name")) for c in containers if isinstance(c, dict))
    raise InjectError(f"no vLLM container found (containers: {names}); pass --container NAME")


def _sd(d: dict, key: str, default):
    """setdefault that also replaces a null (``env:`` with no value)."""
    v = d.get(key)
    if not isinstance(v, type(default)):
        d[key] = v = default
    return v


def _upsert(items: list[dict], new: dict, key: str = "name") -> list[dict]:
    for i, it in enumerate(items):
        if isinstance(it, dict) and it.get(key) == new.get(key):
            items[i] = new
            return items
    items.append(new)
    return items


def _set_env(c: dict, name: str, value: str | None = None, value_from: dict | None = None) -> None:
    env = _sd(c, "env", [])
    entry: dict[str, Any] = {"name": name}
    if value_from is not None:
        entry["valueFrom"] = value_from
    else:
        entry["value"] = value
    _upsert(env, entry)


def _fix_probe_ports(c: dict, old_ports: set, new_port: int) -> None:
    for probe_key in ("livenessProbe", "readinessProbe", "startupProbe"):
        p = c.get(probe_key)
        if not isinstance(p, dict):
            continue
        for kind in ("httpGet", "tcpSocket", "grpc"):
            h = p.get(kind)
            if isinstance(h, dict) and h.get("port") in old_ports:
                h["port"] = new_port


def _connector_settings(c: dict, spec: dict, options: InjectOptions) -> None:
    """Connector flag, shm, IPC_LOCK, UCX, RDMA: for every vLLM pod (leader
    and workers)."""
    which, args = _arg_list(c)
    args = _set_flag(args, "--kv-transfer-config", kv_transfer_config(options), prefix_dotted=True)
    c[which] = args

    # The connector's gRPC control plane (control_port + local DP rank 0).
    ports = _sd(c, "ports", [])
    ports[:] = [p for p in ports if not (isinstance(p, dict) and p.get("name") == "kv-control")]
    ports.append({"name": "kv-control", "containerPort": options.control_port, "protocol": "TCP"})

    if options.ucx_tls:
        _set_env(c, "UCX_TLS", options.ucx_tls)
    if options.ucx_net_devices:
        _set_env(c, "UCX_NET_DEVICES", options.ucx_net_devices)
    if options.ucx_tcp_port_range:
        _set_env(c, "UCX_TCP_PORT_RANGE", options.ucx_tcp_port_range)
    if options.auth_secret:  # control-plane authentication (transfer.control_auth)
        _set_env(c, "PDSIDECAR_AUTH_TOKEN", value_from={
            "secretKeyRef": {"name": options.auth_secret, "key": options.auth_secret_key}})
    if options.control_tls_secret:  # control-plane mutual TLS
        _upsert(_sd(c, "volumeMounts", []),
                {"name": CONTROL_TLS_VOLUME, "mountPath": CONTROL_TLS_DIR, "readOnly": True})
        _upsert(_sd(spec, "volumes", []), {"name": CONTROL_TLS_VOLUME, "secret": {
            "secretName": options.control_tls_secret, "defaultMode": 0o400}})

    if options.ipc_lock:
        sc = _sd(c, "securityContext", {})
        caps = _sd(sc, "capabilities", {})
        add = _sd(caps, "add", [])
        if "IPC_LOCK" not in add:
            add.append("IPC_LOCK")

    if options.rdma_resource:
        res = _sd(c, "resources", {})
        for k in ("requests", "limits"):
            _sd(res, k, {})[options.rdma_resource] = options.rdma_count

    if options.shm_size is not None:
        mounts = _sd(c, "volumeMounts", [])
        if not any(isinstance(m, dict) and m.get("mountPath") == "/dev/shm" for m in mounts):
            mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        shm_names = {m.get("name") for m in mounts if isinstance(m, dict) and m.get("mountPath") == "/dev/shm"}
        vols = _sd(spec, "volumes", [])
        if SHM_VOLUME in shm_names and not any(isinstance(v, dict) and v.get("name") == SHM_VOLUME for v in vols):
            vols.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}})

    if options.share_process_namespace:
        spec["shareProcessNamespace"] = True
    if options.host_ipc:
        spec["hostIPC"] = True


def _move_vllm_port(c: dict, options: InjectOptions) -> None:
    which, args = _arg_list(c)
    old = _flag_value(args, "--port")
    old_port = int(old) if old and old.isdigit() else 8000
    args = _set_flag(args, "--port", str(options.vllm_port))
    # the sidecar is vLLM's only client: nothing outside the pod reaches vLLM directly
    args = _set_flag(args, "--host", "127.0.0.1")
    c[which] = args
    old_refs: set = {old_port}
    ports = c.get("ports") or []
    new_ports = []
    for p in ports:
        if isinstance(p, dict) and p.get("containerPort") in (old_port, options.vllm_port):
            if p.get("name"):
                old_refs.add(p["name"])
            continue
        new_ports.append(p)
    old_refs.add("vllm-http")
    new_ports.insert(0, {"name": "vllm-http", "containerPort": options.vllm_port, "protocol": "TCP"})
    c["ports"] = new_ports
    _fix_probe_ports(c, old_refs, options.vllm_port)
    _exec_probes(c, options.vllm_port)


def _exec_probes(c: dict, port: int) -> None:
    """kubelet's httpGet probes come from the node, not from 127.0.0.1: probe vLLM
    from inside its container instead (its image has python3)."""
    for probe_key in ("livenessProbe", "readinessProbe", "startupProbe"):
        p = c.get(probe_key)
        if not isinstance(p, dict) or not isinstance(p.get("httpGet"), dict):
            continue
        h = p["httpGet"]
        if h.get("port") != port:
            continue
        path = str(h.get("path") or "/")
        if not path.startswith("/") or "'" in path or "\\" in path:
            raise InjectError(f"{probe_key} path {path!r} cannot be turned into an exec probe")
        del p["httpGet"]
        p["exec"] = {"command": ["python3", "-c", (
            "import urllib.request; urllib.request.urlopen("
            f"'http://127.0.0.1:{port}{path}', timeout=5)")]}
        p.setdefault("timeoutSeconds", 10)


def _sidecar(role: str, options: InjectOptions) -> dict:
    env: list[dict] = [
        {"name": "PREFILL_MODE", "value": "true" if role == "prefill" else "false"},
    ]
    target = options.target_for(role)
    if target:
        env.append({"name": "KV_TRANSFER_TARGET", "value": target})
    env += [
        {"name": "KV_TRANSFER_PROTOCOL", "value": options.protocol},
        {"name": "PDSIDECAR_VLLM_URL", "value": f"http://127.0.0.1:{options.vllm_port}"},
        {"name": "PDSIDECAR_PORT", "value": str(options.sidecar_port)},
        {"name": "PDSIDECAR_METRICS_PORT", "value": str(options.metrics_port)},
    ]
    if options.auth_secret:
        env.append({
            "name": "PDSIDECAR_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": options.auth_secret, "key": options.auth_secret_key}},
        })
    if options.allowed_peers:
        env.append({"name": "PDSIDECAR_ALLOWED_PEERS", "value": options.allowed_peers})
    env += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    return {
        "name": SIDECAR_NAME,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["pdsidecar"],
        "args": ["run", "--role", role],
        "env": env,
        "ports": [
            {"name": "http", "containerPort": options.sidecar_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": options.metrics_port, "protocol": "TCP"},
        ],
        "startupProbe": {
            "httpGet": {"path": "/health", "port": options.sidecar_port},
            "periodSeconds": 1,
            "failureThreshold": 30,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": options.sidecar_port},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": options.sidecar_port},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": options.sidecar_cpu_request, "memory": options.sidecar_memory_request},
            "limits": {"cpu": options.sidecar_cpu_limit, "memory": options.sidecar_memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def _annotate(meta: dict, role: str, options: InjectOptions, *, with_sidecar: bool) -> None:
    for k in ("labels", "annotations"):
        if not isinstance(meta.get(k), dict):
            meta[k] = {}
    labels = meta["labels"]
    labels[ROLE_KEY] = role
    # A label, so the MutatingWebhookConfiguration can skip pre-injected pods.
    labels[INJECTED_KEY] = INJECTED_VALUE
    ann = meta["annotations"]
    ann[ROLE_KEY] = role
    ann[INJECTED_KEY] = INJECTED_VALUE
    if with_sidecar:
        ann["prometheus.io/scrape"] = "true"
        ann["prometheus.io/port"] = str(options.metrics_port)
        ann["prometheus.io/path"] = "/metrics"


def inject_pod_spec(spec: dict, role: str, options: InjectOptions, *, with_sidecar: bool = True) -> dict:
    """Inject into a PodSpec in place (and return it)."""
    if not isinstance(spec, dict):
        raise InjectError("pod spec is not a mapping")
    c = _find_vllm(spec, options)
    _connector_settings(c, spec, options)
    if with_sidecar:
        _move_vllm_port(c, options)
        inits = [x for x in (spec.get("initContainers") or []) if not (isinstance(x, dict) and x.get("name") == SIDECAR_NAME)]
        # Native sidecars start in order: ours goes last so that regular init
        # containers (model download etc.) finish first.
        inits.append(_sidecar(role, options))
        spec["initContainers"] = inits
        # No other container may claim the sidecar's ports.
        for other in spec.get("containers") or []:
            if other is c or not isinstance(other, dict):
                continue
            for p in other.get("ports") or []:
                if isinstance(p, dict) and p.get("containerPort") in (options.sidecar_port, options.metrics_port):
                    raise InjectError(
                        f"container {other.get('name')!r} already uses port {p.get('containerPort')}, "
                        "which the sidecar needs"
                    )
    return spec


def _template(doc: dict, *path: str) -> dict:
    cur: Any = doc
    for p in path:
        if not isinstance(cur, dict) or not isinstance(cur.get(p), dict):
            raise InjectError(f"{doc.get('kind')} has no {'.'.join(path)}")
        cur = cur[p]
    return cur


def _inject_template(tpl: dict, role: str, options: InjectOptions, with_sidecar: bool) -> None:
    spec = tpl.get("spec")
    if not isinstance(spec, dict):
        raise InjectError("pod template has no spec")
    inject_pod_spec(spec, role, options, with_sidecar=with_sidecar)
    if not isinstance(tpl.get("metadata"), dict):
        tpl["metadata"] = {}
    _annotate(tpl["metadata"], role, options, with_sidecar=with_sidecar)


SUPPORTED_KINDS = ("Pod", "Deployment", "StatefulSet", "LeaderWorkerSet")


def inject(doc: dict, role: str, options: InjectOptions | None = None) -> dict:
    """Return an injected deep copy of ``doc`` (Pod, Deployment, StatefulSet,
    LeaderWorkerSet). Raises :class:`InjectError` on bad input."""
    options = options or InjectOptions()
    if role not in ROLES:
        raise InjectError(f"unknown role {role!r} (expected prefill or decode)")
    if options.protocol not in ("rdma", "ipc", "tcp", "auto"):
        raise InjectError(f"unknown protocol {options.protocol!r} (expected rdma, ipc, tcp or auto)")
    if not isinstance(doc, dict):
        raise InjectError("document is not a Kubernetes object (mapping)")
    kind = doc.get("kind")
    out = copy.deepcopy(doc)
    if kind == "Pod":
        spec = out.get("spec")
        if not isinstance(spec, dict):
            raise InjectError("Pod has no spec")
        # A pod created by a LeaderWorkerSet for a worker (index != 0) runs
        # vLLM --headless: connector settings only, no sidecar.
        labels = (out.get("metadata") or {}).get("labels") or {}
        is_worker = str(labels.get(LWS_WORKER_INDEX_LABEL, "0")) != "0"
        inject_pod_spec(spec, role, options, with_sidecar=not is_worker)
        if not isinstance(out.get("metadata"), dict):
            out["metadata"] = {}
        _annotate(out["metadata"], role, options, with_sidecar=not is_worker)
    elif kind in ("Deployment", "StatefulSet"):
        _inject_template(_template(out, "spec", "template"), role, options, True)
    elif kind == "LeaderWorkerSet":
        lwt = _template(out, "spec", "leaderWorkerTemplate")
        worker = _template(out, "spec", "leaderWorkerTemplate", "workerTemplate")
        if not isinstance(lwt.get("leaderTemplate"), dict):
            # Without a leaderTemplate LWS uses the worker template for the
            # leader too; split them so only the leader gets the sidecar.
            lwt["leaderTemplate"] = copy.deepcopy(worker)
        _inject_template(lwt["leaderTemplate"], role, options, True)
        _inject_template(worker, role, options, False)
    else:
        raise InjectError(f"unsupported kind {kind!r} (supported: {', '.join(SUPPORTED_KINDS)})")
    return out


# --------------------------------------------------------------------------- #
# command line


def inject_documents(text: str, role: str, options: InjectOptions, *, skip_unknown: bool = False) -> str:
    """Inject every document of a (multi-document) YAML string; return YAML."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InjectError(f"input is not valid YAML{where}") from None
    if not docs:
        raise InjectError("input has no YAML documents")
    out = []
    for i, d in enumerate(docs):
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            d = dict(d, items=[inject(x, role, options) for x in d["items"]])
            out.append(d)
            continue
        if not isinstance(d, dict) or "kind" not in d:
            raise InjectError(f"document {i + 1} is not a Kubernetes object")
        if d.get("kind") not in SUPPORTED_KINDS and skip_unknown:
            out.append(d)
            continue
        try:
            out.append(inject(d, role, options))
        except InjectError as e:
            name = (d.get("metadata") or {}).get("name", "?") if isinstance(d.get("metadata"), dict) else "?"
            raise InjectError(f"document {i + 1} ({d.get('kind')}/{name}): {e}") from None
    return yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False, width=1 << 16)


def add_inject_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``pdsidecar inject`` and ``pdsidecar webhook``."""
    d = InjectOptions()
    p.add_argument("--image", default=d.image, help="sidecar image")
    p.add_argument("--container", dest="vllm_container", default=None, help="name of the vLLM container (default: auto-detect)")
    p.add_argument("--protocol", default=d.protocol, choices=["rdma", "ipc", "tcp", "auto"], help="KV transfer protocol")
    p.add_argument("--kv-target", default=None, help="KV_TRANSFER_TARGET (decode default: <prefill-service>:<sidecar-port>; "
                   "prefill default: <decode-service>:<sidecar-port>)")
    p.add_argument("--prefill-service", default=d.prefill_service, help="DNS name of the prefill sidecars (decode default target)")
    p.add_argument("--decode-service", default=d.decode_service,
                   help="headless DNS name of the decode pods (prefill default target = its allowlist)")
    p.add_argument("--sidecar-port", type=int, default=d.sidecar_port)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port)
    p.add_argument("--vllm-port", type=int, default=d.vllm_port)
    p.add_argument("--control-port", type=int, default=d.control_port, help="connector gRPC control port (+ DP rank)")
    p.add_argument("--auth-secret", default=d.auth_secret, help="Secret with the shared sidecar token ('' = none)")
    p.add_argument("--auth-secret-key", default=d.auth_secret_key)
    p.add_argument("--control-tls-secret", default=None,
                   help="Secret with ca.crt/tls.crt/tls.key (pdsidecar control-certs): mutual TLS on the connector's control plane")
    p.add_argument("--allowed-peers", default=None, help="PDSIDECAR_ALLOWED_PEERS")
    p.add_argument("--host-ipc", action="store_true", help="set hostIPC (CUDA IPC across pods)")
    p.add_argument("--shm-size", default=d.shm_size, help="/dev/shm emptyDir sizeLimit")
    p.add_argument("--rdma-resource", default=None, help="RDMA device resource, e.g. rdma/ib")
    p.add_argument("--rdma-count", type=int, default=d.rdma_count)
    p.add_argument("--ucx-tls", default=d.ucx_tls, help="UCX_TLS for the vLLM container ('' = unset)")
    p.add_argument("--ucx-net-devices", default=None, help="UCX_NET_DEVICES, e.g. mlx5_0:1")
    p.add_argument("--ucx-tcp-port-range", default=d.ucx_tcp_port_range,
                   help="UCX_TCP_PORT_RANGE for the vLLM container (the NetworkPolicy's range; '' = unset)")
    p.add_argument("--no-ipc-lock", dest="ipc_lock", action="store_false", help="do not add the IPC_LOCK capability")


def options_from_args(ns: argparse.Namespace) -> InjectOptions:
    names = {f.name for f in fields(InjectOptions)}
    kw = {k: v for k, v in vars(ns).items() if k in names}
    for k in ("auth_secret", "ucx_tls", "ucx_tcp_port_range", "control_tls_secret"):
        if kw.get(k) == "":
            kw[k] = None
    return InjectOptions(**kw)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser(prog: str = "pdsidecar inject") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Inject the pdsidecar P/D sidecar into Pod/Deployment/StatefulSet/LeaderWorkerSet YAML.")
    p.add_argument("file", nargs="?", default="-", help="YAML file ('-' or omitted: stdin)")
    p.add_argument("--role", required=True, help="prefill or decode")
    p.add_argument("--skip-unknown", action="store_true", help="pass through documents of other kinds unchanged")
    add_inject_arguments(p)
    return p


def run_inject(argv: Iterable[str] | None = None) -> int:
    """``pdsidecar inject``: returns the exit code (0 ok, 1 bad input, 2 usage)."""
    p = build_parser()
    try:
        ns = p.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if ns.role not in ROLES:
            raise InjectError(f"unknown role {ns.role!r} (expected prefill or decode)")
        if ns.file == "-":
            text = sys.stdin.read()
        else:
            try:
                with open(ns.file, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise InjectError(f"cannot read {ns.file}: {e.strerror}") from None
            except UnicodeDecodeError:
                raise InjectError(f"{ns.file} is not UTF-8 text") from None
        sys.stdout.write(inject_documents(text, ns.role, options_from_args(ns), skip_unknown=ns.skip_unknown))
        return 0
    except InjectError as e:
        sys.stderr.write(f"pdsidecar inject: error: {e}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_inject())
