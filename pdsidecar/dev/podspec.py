"""Rendered manifests -> what to run in a pod: command lines, environment, ports, probes.

``render_overlay`` runs ``kubectl kustomize`` (offline) and ``pod_spec`` turns one
LeaderWorkerSet's leader template into a :class:`PodSpec` the way the kubelet would:
``$(VAR)`` expansion, ``fieldRef`` (``status.podIP``, ``metadata.name``,
``metadata.namespace``), ``secretKeyRef`` (from the rendered Secrets, or ones the harness
generates), the LeaderWorkerSet's own ``LWS_*`` variables.

Images are not pulled: each image's command runs from this machine's Python environment.
The mapping lives in one place, :data:`EXECUTABLES` (command[0] -> local argv) and
:data:`IMAGE_ENTRYPOINTS` (images whose manifests give only ``args``):

=====================================  =============================================
manifest                               runs here
=====================================  =============================================
engine image, no command (``vllm serve``)  ``python -m pdsidecar.dev.vllm_cli serve``
command ``vllm``                       ``python -m pdsidecar.dev.vllm_cli`` (vLLM's CLI)
command ``pdsidecar``                  ``python -m pdsidecar``
command ``python`` / ``python3``       ``python`` (this interpreter)
=====================================  =============================================

Volumes: a volume the harness maps (``volume_dirs``, e.g. ``models`` -> the tiny-model
cache) has its ``mountPath`` prefix rewritten to that folder in args and env values;
other volumes (``/dev/shm``) are not mounted.
"""

from __future__ import annotations

import base64
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from pdsidecar.k8s import validate as kv
from pdsidecar.k8s.manifests import ENGINE_IMAGE, SIDECAR_IMAGE

EXECUTABLES: dict[str, list[str]] = {
    "vllm": [sys.executable, "-m", "pdsidecar.dev.vllm_cli"],  # vLLM's own CLI (see that module)
    "pdsidecar": [sys.executable, "-m", "pdsidecar"],
    "python": [sys.executable],
    "python3": [sys.executable],
}
IMAGE_ENTRYPOINTS: dict[str, list[str]] = {
    ENGINE_IMAGE: ["vllm", "serve"],  # the official vLLM image's ENTRYPOINT
    SIDECAR_IMAGE: ["pdsidecar"],  # Dockerfile --target sidecar ENTRYPOINT
}
NAMESPACE = "pdsidecar"


class PodSpecError(Exception):
    """A manifest this harness cannot run (one line)."""


@dataclass
class Probe:
    path: str
    port: int
    argv: list[str] | None = None  # exec probe: run in the pod, ready on exit 0
    timeout_s: float = 5.0


@dataclass
class ContainerSpec:
    name: str
    argv: list[str]  # local command line (mapped)
    env: dict[str, str]
    ports: dict[str, int]  # name -> containerPort
    kind: str  # "init" (runs to completion), "sidecar" (init, restartPolicy Always), "main"
    probe: Probe | None = None  # readiness probe (httpGet; else the startup probe)
    startup: Probe | None = None  # startup probe (else the readiness probe)
    is_engine: bool = False


@dataclass
class PodSpec:
    name: str  # pod name, e.g. pd-prefill-0
    role: str  # prefill | decode
    ip: str
    containers: list[ContainerSpec] = field(default_factory=list)

    def container(self, name: str) -> ContainerSpec:
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)


def render_overlay(path: str | Path) -> list[dict]:
    """``kubectl kustomize PATH`` as a list of objects (raises PodSpecError)."""
    try:
        return kv.render(path)
    except kv.ValidationError as e:
        raise PodSpecError(str(e)) from None


def secrets_of(docs: list[dict]) -> dict[str, dict[str, str]]:
    """Secret name -> key -> decoded value, from rendered Secrets."""
    out: dict[str, dict[str, str]] = {}
    for d in docs:
        if d.get("kind") != "Secret":
            continue
        vals = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
        vals.update(d.get("stringData") or {})
        out[d["metadata"]["name"]] = vals
    return out


def lws(docs: list[dict], name: str) -> dict:
    for d in docs:
        if d.get("kind") == "LeaderWorkerSet" and d["metadata"]["name"] == name:
            return d
    raise PodSpecError(f"no LeaderWorkerSet {name!r} in the rendered overlay")


def map_command(c: dict) -> list[str]:
    """The local argv for a container (see the table in the module docstring)."""
    cmd = [str(x) for x in (c.get("command") or [])]
    if not cmd:
        image = c.get("image", "")
        if image not in IMAGE_ENTRYPOINTS:
            raise PodSpecError(f"container {c.get('name')}: no command and unknown image {image!r} "
                               f"(known: {', '.join(IMAGE_ENTRYPOINTS)})")
        cmd = list(IMAGE_ENTRYPOINTS[image])
    exe = cmd[0].rsplit("/", 1)[-1]
    if exe not in EXECUTABLES:
        raise PodSpecError(f"container {c.get('name')}: command {cmd[0]!r} has no local mapping "
                           f"(known: {', '.join(EXECUTABLES)})")
    return EXECUTABLES[exe] + cmd[1:] + [str(a) for a in (c.get("args") or [])]


def _field(path: str, pod: PodSpec) -> str:
    values = {"status.podIP": pod.ip, "status.podIPs": pod.ip, "metadata.name": pod.name,
              "metadata.namespace": NAMESPACE, "status.hostIP": pod.ip, "spec.nodeName": "local"}
    if path not in values:
        raise PodSpecError(f"fieldRef {path!r} is not supported by the pod harness")
    return values[path]


def resolve_env(c: dict, pod: PodSpec, secrets: dict[str, dict[str, str]], lws_env: dict[str, str]
                ) -> dict[str, str]:
    """A container's environment as the kubelet builds it (LWS variables first)."""
    env = dict(lws_env)
    for e in c.get("env") or []:
        name = e["name"]
        if "value" in e:
            env[name] = kv.expand_vars([str(e["value"])], env)[0]
            continue
        src = e.get("valueFrom") or {}
        if "fieldRef" in src:
            env[name] = _field(src["fieldRef"]["fieldPath"], pod)
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            val = secrets.get(ref["name"], {}).get(ref["key"])
            if val is None:
                if ref.get("optional"):
                    continue
                raise PodSpecError(f"container {c['name']}: secret {ref['name']}/{ref['key']} not found")
            env[name] = val
        else:
            raise PodSpecError(f"container {c['name']}: env {name} valueFrom {sorted(src)} not supported")
    return env


def _rewrite_mounts(values: list[str], mounts: dict[str, str]) -> list[str]:
    out = []
    for v in values:
        for mp, host in mounts.items():
            v = re.sub(rf"(?<![\w/]){re.escape(mp)}(?=/|$)", host, v)
        out.append(v)
    return out


def _probe(c: dict, ports: dict[str, int], order=("readinessProbe", "startupProbe")) -> Probe | None:
    for key in order:
        probe = c.get(key) or {}
        hg = probe.get("httpGet")
        if hg:
            port = hg["port"]
            port = ports[port] if isinstance(port, str) else int(port)
            return Probe(hg.get("path", "/"), port)
        cmd = (probe.get("exec") or {}).get("command")
        if cmd:  # e.g. vLLM bound to 127.0.0.1 in the pod: only a command inside it can ask
            exe = str(cmd[0]).rsplit("/", 1)[-1]
            if exe not in EXECUTABLES:
                raise PodSpecError(f"container {c.get('name')}: {key} command {cmd[0]!r} has no "
                                   f"local mapping (known: {', '.join(EXECUTABLES)})")
            return Probe("", 0, EXECUTABLES[exe] + [str(a) for a in cmd[1:]],
                         float(probe.get("timeoutSeconds", 5)))
    return None


def pod_spec(docs: list[dict], role: str, ip: str, *, secrets: dict[str, dict[str, str]] | None = None,
             volume_dirs: dict[str, str] | None = None) -> PodSpec:
    """The leader pod of LeaderWorkerSet ``pd-<role>`` (group 0) with address ``ip``."""
    name = f"pd-{role}"
    obj = lws(docs, name)
    lwt = obj["spec"]["leaderWorkerTemplate"]
    spec = (lwt.get("leaderTemplate") or lwt["workerTemplate"])["spec"]
    pod = PodSpec(name=f"{name}-0", role=role, ip=ip)
    all_secrets = {**secrets_of(docs), **(secrets or {})}
    lws_env = {**kv.lws_env(worker_index=0, size=int(lwt.get("size", 1)), name=name, ns=NAMESPACE),
               "LWS_NAME": name, "LWS_GROUP_INDEX": "0"}
    engine = kv.vllm_container(spec)
    for kind_key in ("initContainers", "containers"):
        for c in spec.get(kind_key) or []:
            kind = "main" if kind_key == "containers" else (
                "sidecar" if c.get("restartPolicy") == "Always" else "init")
            mounts = {m["mountPath"]: (volume_dirs or {})[m["name"]]
                      for m in c.get("volumeMounts") or [] if m["name"] in (volume_dirs or {})}
            env = resolve_env(c, pod, all_secrets, lws_env)
            argv = kv.expand_vars(map_command(c), env)
            env = dict(zip(env, _rewrite_mounts(list(env.values()), mounts)))
            ports = {p.get("name", str(p["containerPort"])): int(p["containerPort"]) for p in c.get("ports") or []}
            pod.containers.append(ContainerSpec(
                name=c["name"], argv=_rewrite_mounts(argv, mounts), env=env, ports=ports, kind=kind,
                probe=_probe(c, ports), startup=_probe(c, ports, ("startupProbe", "readinessProbe")),
                is_engine=c is engine))
    return pod


def edit_env(docs: list[dict], role: str, container: str, *, drop: tuple[str, ...] = (),
             set_: dict[str, str] | None = None) -> list[dict]:
    """A copy of ``docs`` with env vars dropped from / set in ``container`` of ``pd-<role>``
    (fault tests and transport runs: e.g. without PD_CONTROL_HOST, with UCX_TLS=tcp)."""
    import copy

    docs = copy.deepcopy(docs)
    for _, spec in kv.pod_templates(lws(docs, f"pd-{role}")):
        for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            if c["name"] == container:
                gone = set(drop) | set(set_ or {})
                c["env"] = [e for e in c.get("env") or [] if e["name"] not in gone]
                c["env"] += [{"name": k, "value": v} for k, v in (set_ or {}).items()]
    return docs


def drop_env(docs: list[dict], role: str, container: str, var: str) -> list[dict]:
    """A copy of ``docs`` without env ``var`` in ``container`` of ``pd-<role>``."""
    return edit_env(docs, role, container, drop=(var,))


def service_hosts(docs: list[dict], pods: dict[str, str]) -> dict[str, str]:
    """DNS names -> pod IP for the Services and LWS pod names, given role -> pod IP.

    Stand-in for cluster DNS: a Service resolves to the IP of the pod its selector
    picks (``leaderworkerset.sigs.k8s.io/name: pd-<role>``); one pod per role here."""
    out: dict[str, str] = {}
    suffixes = ("", f".{NAMESPACE}", f".{NAMESPACE}.svc", f".{NAMESPACE}.svc.cluster.local")
    for d in docs:
        if d.get("kind") != "Service":
            continue
        sel = (d.get("spec") or {}).get("selector") or {}
        lname = sel.get("leaderworkerset.sigs.k8s.io/name", "")
        role = lname.removeprefix("pd-")
        if role in pods:
            for s in suffixes:
                out[d["metadata"]["name"] + s] = pods[role]
    for role, addr in pods.items():
        name = f"pd-{role}"
        for s in ("", f".{NAMESPACE}"):
            out[f"{name}-0.{name}{s}"] = addr
        out[f"{name}-0"] = addr
    return out
