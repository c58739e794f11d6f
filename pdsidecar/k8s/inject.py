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

``run_inject(argv)`` is the ``pdsidecar inject`` command line. The options live in
``inject_options``, the vLLM flags in ``vllm_args``, the PodSpec edits in ``pod_spec``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import fields
from typing import Any, Iterable

import yaml

from pdsidecar.k8s.inject_options import (INJECTED_KEY, INJECTED_VALUE, LWS_WORKER_INDEX_LABEL, ROLE_KEY, ROLES,
                                          InjectError, InjectOptions)
from pdsidecar.k8s.pod_spec import inject_pod_spec

__all__ = [
    "SUPPORTED_KINDS",
    "inject",
    "inject_documents",
    "add_inject_arguments",
    "options_from_args",
    "run_inject",
]


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
