"""Offline validation of rendered manifests.

* core kinds: ``kubernetes-validate`` (bundled upstream schemas);
* CRDs (LeaderWorkerSet, InferencePool, ServiceMonitor): ``jsonschema``
  against the openAPIV3Schema vendored in ``deploy/crds/`` (see its README);
* vLLM command lines: vLLM's own argument parser, after Kubernetes ``$(VAR)``
  expansion with sample LeaderWorkerSet values.

``run_validate(argv)`` (``pdsidecar deploy-validate DIR...``) renders each
kustomize directory with ``kubectl kustomize`` and validates everything.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

__all__ = [
    "CRD_DIR",
    "K8S_VERSION",
    "render",
    "validate_object",
    "pod_templates",
    "vllm_container",
    "expand_vars",
    "parse_vllm_args",
    "run_validate",
]

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "deploy" / "crds"
K8S_VERSION = "1.32.0"


class ValidationError(Exception):
    pass


# --------------------------------------------------------------------------- #
# rendering


def render(kustomize_dir: str | Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise ValidationError("kubectl not found (needed for `kubectl kustomize`)")
    p = subprocess.run([kubectl, "kustomize", str(kustomize_dir)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise ValidationError(f"kubectl kustomize {kustomize_dir} failed: {p.stderr.strip()}")
    return [d for d in yaml.safe_load_all(p.stdout) if d]


# --------------------------------------------------------------------------- #
# schemas


@functools.lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema from deploy/crds/*.schema.json."""
    out = {}
    for f in sorted(CRD_DIR.glob("*.schema.json")):
        d = json.loads(f.read_text())
        out[(f"{d['group']}/{d['source']['version']}", d["kind"])] = d["openAPIV3Schema"]
    return out


def _structural(schema: Any) -> Any:
    """Kubernetes structural-schema extensions → plain JSON Schema."""
    if isinstance(schema, list):
        return [_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: _structural(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    # kubectl (validate=strict, the default) and the API server's strict field
    # validation reject unknown fields: do the same.
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        s["additionalProperties"] = False
    # "format: int32" etc. are annotations for jsonschema; fine as they are.
    return s


@functools.lru_cache(maxsize=None)
def _crd_validator(api_version: str, kind: str):
    import jsonschema

    schema = crd_schemas().get((api_version, kind))
    if schema is None:
        return None
    s = _structural(schema)
    # ObjectMeta is `type: object` in CRD schemas; the API server checks it.
    return jsonschema.Draft7Validator(s)


def _metadata_checks(obj: dict) -> list[str]:
    errs = []
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name or "") or len(name) > 253:
        errs.append(f"metadata.name {name!r} is not a DNS subdomain")
    return errs


def validate_object(obj: dict) -> list[str]:
    """Errors for one object (empty list = valid). Unknown kinds → error."""
    api, kind = obj.get("apiVersion"), obj.get("kind")
    v = _crd_validator(api, kind)
    if v is not None:
        errs = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in v.iter_errors(obj)]
        return errs + _metadata_checks(obj)
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError as KVError

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except KVError as e:
        return [f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}"]
    except SchemaNotFoundError:
        return [f"no schema for {api} {kind} (neither core nor vendored in deploy/crds)"]
    return []


# --------------------------------------------------------------------------- #
# vLLM arguments


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(label, PodSpec) pairs of a workload object."""
    k = obj.get("kind")
    spec = obj.get("spec") or {}
    if k == "Pod":
        return [("pod", spec)]
    if k in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [("template", spec["template"]["spec"])]
    if k == "LeaderWorkerSet":
        lwt = spec["leaderWorkerTemplate"]
        out = []
        if lwt.get("leaderTemplate"):
            out.append(("leader", lwt["leaderTemplate"]["spec"]))
        out.append(("worker", lwt["workerTemplate"]["spec"]))
        return out
    return []


def vllm_container(spec: dict) -> dict | None:
    for c in spec.get("containers") or []:
        hay = " ".join([c.get("image", "")] + list(c.get("command") or []) + list(c.get("args") or [])[:3])
        if "vllm" in hay.lower():
            return c
    return None


def expand_vars(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes $(VAR) expansion ($$ escapes; unknown stays as is)."""

    def one(s: str) -> str:
        return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)

    return [one(a) for a in args]


def lws_env(worker_index: int = 0, size: int = 16, name: str = "pd", group: int = 0, ns: str = "default") -> dict[str, str]:
    return {
        "LWS_LEADER_ADDRESS": f"{name}-{group}.{name}.{ns}",
        "LWS_GROUP_SIZE": str(size),
        "LWS_WORKER_INDEX": str(worker_index),
    }


def vllm_serve_args(c: dict) -> list[str]:
    """The arguments after ``vllm serve`` / ``-m vllm.entrypoints.openai.api_server``."""
    cmd = list(c.get("command") or [])
    args = [str(a) for a in (c.get("args") or [])]
    if not cmd:  # official image: ENTRYPOINT ["vllm", "serve"]
        return args
    full = [str(x) for x in cmd] + args
    for i, a in enumerate(full):
        if a == "serve" and i > 0 and full[i - 1].endswith("vllm"):
            return full[i + 1:]
        if a.startswith("vllm.entrypoints"):
            return full[i + 1:]
    return args


@functools.lru_cache(maxsize=1)
def _vllm_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def parse_vllm_args(args: list[str]):
    """Parse with vLLM's own serve parser (raises SystemExit on bad flags)."""
    return _vllm_parser().parse_args(list(args))


# --------------------------------------------------------------------------- #
# command line


def validate_rendered(docs: list[dict], *, vllm: bool = True) -> list[str]:
    errs = []
    for d in docs:
        ident = f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        errs += [f"{ident}: {e}" for e in validate_object(d)]
        if not vllm:
            continue
        for label, spec in pod_templates(d):
            c = vllm_container(spec)
            if c is None:
                continue
            env = lws_env(worker_index=0 if label != "worker" else 1)
            try:
                parse_vllm_args(expand_vars(vllm_serve_args(c), env))
            except SystemExit:
                errs.append(f"{ident} ({label}): vLLM rejects its arguments")
    return errs


def run_validate(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdsidecar deploy-validate", description="Render kustomize dirs and validate them offline.")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--no-vllm", action="store_true", help="skip parsing vLLM arguments")
    ns = p.parse_args(list(argv) if argv is not None else None)
    bad = 0
    for d in ns.dirs:
        try:
            errs = validate_rendered(render(d), vllm=not ns.no_vllm)
        except ValidationError as e:
            errs = [str(e)]
        for e in errs:
            sys.stderr.write(f"{d}: {e}\n")
        bad += len(errs)
        if not errs:
            print(f"{d}: ok")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_validate())
