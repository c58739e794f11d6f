"""Generator for the Pattern 5 LeaderWorkerSets in ``deploy/overlays/*/``.

Seed Pattern 5: a prefill LWS and a decode LWS, each ``replicas: 8`` (DP=8
independent groups) of ``size: 16`` pods (EP=16: one leader + 15 workers,
one GPU per pod). Inside a group vLLM runs data parallel across the pods with
expert parallelism over all 16 ranks:

* every pod: ``--data-parallel-size $(LWS_GROUP_SIZE)``,
  ``--data-parallel-size-local 1``, ``--data-parallel-address
  $(LWS_LEADER_ADDRESS)``, ``--data-parallel-rpc-port 5555``,
  ``--data-parallel-start-rank $(LWS_WORKER_INDEX)``,
  ``--enable-expert-parallel``, ``--tensor-parallel-size 1``;
* the leader runs the API server (behind the sidecar), workers ``--headless``.

``$(VAR)`` is Kubernetes' own expansion of container env vars, which the LWS
controller injects into every container, so no shell wrapper is needed and
``pdsidecar inject`` can edit the flags.

The LWS objects are built here un-injected and then passed through
:func:`pdsidecar.k8s.inject.inject` with each overlay's options; ``deploy/`` holds
the result. ``run_manifests(["--check"])`` (and the tests) verify the files
are up to date; ``run_manifests([])`` rewrites them.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from pdsidecar.k8s.inject import inject
from pdsidecar.k8s.inject_options import InjectOptions

__all__ = ["Profile", "PROFILES", "pattern5_lws", "overlay_documents", "run_manifests"]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

ENGINE_IMAGE = "ghcr.io/pdsidecar/vllm-pd:0.32.0-0.1.0"  # Dockerfile --target engine
SIDECAR_IMAGE = "ghcr.io/pdsidecar/pdsidecar:0.1.0"  # Dockerfile --target sidecar
DP_RPC_PORT = 5555


@dataclass
class Profile:
    replicas: int  # DP groups (independent vLLM deployments)
    size: int  # pods per group = EP ranks (1 GPU each)
    model: str
    gpus_per_pod: int = 1
    max_model_len: int = 32768
    role_args: dict = field(default_factory=dict)
    env: list = field(default_factory=list)
    inject: InjectOptions = field(default_factory=InjectOptions)
    cpu: str = "16"
    memory: str = "200Gi"
    volumes: list = field(default_factory=list)  # extra pod volumes
    volume_mounts: list = field(default_factory=list)  # their mounts in the vllm container
    init_containers: list = field(default_factory=list)  # run before the sidecar and vLLM


PRODUCTION = Profile(
    replicas=8,
    size=16,
    model="deepseek-ai/DeepSeek-V3",
    role_args={
        "prefill": ["--all2all-backend", "deepep_high_throughput", "--max-num-batched-tokens", "16384"],
        "decode": ["--all2all-backend", "deepep_low_latency", "--max-num-seqs", "256"],
    },
    env=[
        # seed Pattern 4/5: multi-node NCCL over IB/RoCE with GPUDirect RDMA
        {"name": "NCCL_IB_DISABLE", "value": "0"},
        {"name": "NCCL_NET_GDR_LEVEL", "value": "SYS"},
        {"name": "NCCL_IB_HCA", "value": "mlx5_0:1,mlx5_1:1"},
    ],
    inject=InjectOptions(
        image=SIDECAR_IMAGE,
        protocol="rdma",
        rdma_resource="rdma/ib",
        ucx_net_devices="mlx5_0:1,mlx5_1:1",
        shm_size="32Gi",
        control_tls_secret="pdsidecar-control-tls",  # pdsidecar control-certs
    ),
)

SINGLE_NODE = Profile(
    replicas=1,
    size=1,
    model="Qwen/Qwen1.5-MoE-A2.7B",
    max_model_len=8192,
    role_args={"prefill": [], "decode": []},
    inject=InjectOptions(image=SIDECAR_IMAGE, protocol="auto", shm_size="8Gi"),
    cpu="8",
    memory="64Gi",
)

# CPU development size: what `pdsidecar local --pods` and the pod tests run on one
# machine (pdsidecar.dev.pods), and what a CPU-only cluster can apply. Same base, env
# contract, sidecar, ports, vLLM flags (expert parallel: the tiny model is a Mixtral, an
# MoE like the real overlays' models) and connector config as the GPU overlays; a
# generated tiny model (an init container writes it into an emptyDir) and CPU vLLM flags.
DEV_MODEL = "/models/tiny-mixtral"
DEV_CPU = Profile(
    replicas=1,
    size=1,
    model=DEV_MODEL,
    gpus_per_pod=0,
    max_model_len=4096,
    # float32: a random-weight tiny model has near-flat logits, and bf16 flips greedy
    # argmaxes between kernel paths (P/D output would differ from aggregated by chance)
    role_args={"prefill": ["--enforce-eager", "--dtype", "float32"],
               "decode": ["--enforce-eager", "--dtype", "float32"]},
    env=[
        {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"},  # GiB of KV cache (CPU backend)
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
    ],
    inject=InjectOptions(image=SIDECAR_IMAGE, protocol="auto", shm_size="1Gi"),
    cpu="1",
    memory="8Gi",
    volumes=[{"name": "models", "emptyDir": {"sizeLimit": "1Gi"}}],
    volume_mounts=[{"name": "models", "mountPath": "/models"}],
    init_containers=[{
        "name": "tiny-model",
        "image": ENGINE_IMAGE,
        "command": ["pdsidecar"],
        "args": ["models", "make", "--arch", "mixtral", "--out", DEV_MODEL, "--if-missing"],
        "volumeMounts": [{"name": "models", "mountPath": "/models"}],
    }],
)

PROFILES = {"production": PRODUCTION, "single-node": SINGLE_NODE, "dev-cpu": DEV_CPU}

# The engine learns its pod IP for the KV control plane and NIXL (PdConnector reads
# PD_CONTROL_HOST; vLLM's stock NixlConnector VLLM_NIXL_SIDE_CHANNEL_HOST). Without it
# the connector would advertise 127.0.0.1 to decode engines in other pods.
POD_IP_ENV = [
    {"name": "PD_CONTROL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
]


def _vllm_args(role: str, p: Profile, *, leader: bool) -> list[str]:
    args = [p.model]
    if leader:
        args += ["--port", "8000", "--served-model-name", p.model]
    else:
        args += ["--headless"]
    args += ["--tensor-parallel-size", "1", "--enable-expert-parallel"]
    if p.size > 1:
        # a one-pod group is not data parallel: vLLM refuses --data-parallel-start-rank
        # (external load balancing) when the DP size is 1 (seen running dev-cpu as pods)
        args += [
            "--data-parallel-size", "$(LWS_GROUP_SIZE)",
            "--data-parallel-size-local", str(max(p.gpus_per_pod, 1)),
            "--data-parallel-address", "$(LWS_LEADER_ADDRESS)",
            "--data-parallel-rpc-port", str(DP_RPC_PORT),
            "--data-parallel-start-rank", "$(LWS_WORKER_INDEX)",
        ]
    args += ["--max-model-len", str(p.max_model_len), "--gpu-memory-utilization", "0.9"]
    return args + list(p.role_args.get(role, []))


def _pod_template(name: str, role: str, p: Profile, *, leader: bool) -> dict:
    c: dict = {
        "name": "vllm",
        "image": ENGINE_IMAGE,
        "args": _vllm_args(role, p, leader=leader),
        "env": [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}},
            {"name": "VLLM_LOGGING_LEVEL", "value": "INFO"},
        ] + [copy.deepcopy(e) for e in POD_IP_ENV] + [dict(e) for e in p.env],
        "ports": [{"name": "dp-rpc", "containerPort": DP_RPC_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": p.cpu, "memory": p.memory},
            "limits": {"memory": p.memory},
        },
    }
    if p.gpus_per_pod:
        c["resources"]["requests"]["nvidia.com/gpu"] = p.gpus_per_pod
        c["resources"]["limits"]["nvidia.com/gpu"] = p.gpus_per_pod
    if p.volume_mounts:
        c["volumeMounts"] = copy.deepcopy(p.volume_mounts)
    if leader:
        c["ports"].insert(0, {"name": "http", "containerPort": 8000, "protocol": "TCP"})
        c["startupProbe"] = {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 10, "failureThreshold": 180}
        c["readinessProbe"] = {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 5, "failureThreshold": 3}
        c["livenessProbe"] = {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 30, "failureThreshold": 5}
    labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/part-of": "pdsidecar",
    }
    spec: dict = {
        "serviceAccountName": "pdsidecar",
        "terminationGracePeriodSeconds": 120,
        "containers": [c],
    }
    if p.init_containers:
        spec["initContainers"] = copy.deepcopy(p.init_containers)
    if p.volumes:
        spec["volumes"] = copy.deepcopy(p.volumes)
    return {"metadata": {"labels": labels}, "spec": spec}


def pattern5_lws(role: str, p: Profile) -> dict:
    """The un-injected LeaderWorkerSet for ``role``."""
    name = f"pd-{role}"
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/component": role,
                       "app.kubernetes.io/part-of": "pdsidecar"},
        },
        "spec": {
            "replicas": p.replicas,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate", "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0}},
            "leaderWorkerTemplate": {
                "size": p.size,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": _pod_template(name, role, p, leader=True),
                "workerTemplate": _pod_template(name, role, p, leader=False),
            },
        },
    }


HEADER = (
    "# GENERATED by pdsidecar.k8s.manifests (pattern5_lws + pdsidecar inject) - do not edit by hand.\n"
    "# Regenerate: python -m pdsidecar.k8s.manifests   (tests check it is up to date)\n"
)


def overlay_documents(overlay: str) -> dict[str, str]:
    """file name (relative to the overlay dir) -> YAML text."""
    p = PROFILES[overlay]
    out = {}
    for role in ("prefill", "decode"):
        doc = inject(pattern5_lws(role, p), role, p.inject)
        out[f"lws-{role}.yaml"] = HEADER + yaml.safe_dump(doc, sort_keys=False, width=1 << 16)
    return out


def run_manifests(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdsidecar deploy-manifests", description="(Re)generate the Pattern 5 LWS manifests in deploy/overlays/.")
    ap.add_argument("--check", action="store_true", help="only check the files are up to date (exit 1 if not)")
    ap.add_argument("--deploy-dir", default=str(DEPLOY))
    ns = ap.parse_args(list(argv) if argv is not None else None)
    stale = []
    for overlay in PROFILES:
        for fname, text in overlay_documents(overlay).items():
            path = Path(ns.deploy_dir) / "overlays" / overlay / fname
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
                if not ns.check:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(text)
    if ns.check and stale:
        sys.stderr.write("out of date: " + ", ".join(stale) + " (run python -m pdsidecar.k8s.manifests)\n")
        return 1
    for s in stale:
        print(f"wrote {s}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_manifests())
