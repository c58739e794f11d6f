"""Injection into one PodSpec: the vLLM container's connector settings (flag, shm,
IPC_LOCK, UCX, RDMA, control-plane auth/TLS), its API port moved behind the sidecar
(exec probes), and the sidecar itself as a native sidecar (init container with
``restartPolicy: Always``)."""

from __future__ import annotations

from typing import Any

from pdsidecar.k8s.inject_options import (CONTROL_TLS_DIR, CONTROL_TLS_VOLUME, SHM_VOLUME, SIDECAR_NAME,
                                          InjectError, InjectOptions)
from pdsidecar.k8s.vllm_args import arg_list, flag_value, kv_transfer_config, set_flag

__all__ = ["inject_pod_spec"]


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
    which, args = arg_list(c)
    args = set_flag(args, "--kv-transfer-config", kv_transfer_config(options), prefix_dotted=True)
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
    which, args = arg_list(c)
    old = flag_value(args, "--port")
    old_port = int(old) if old and old.isdigit() else 8000
    args = set_flag(args, "--port", str(options.vllm_port))
    # the sidecar is vLLM's only client: nothing outside the pod reaches vLLM directly
    args = set_flag(args, "--host", "127.0.0.1")
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
