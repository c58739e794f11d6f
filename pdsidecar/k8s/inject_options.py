"""What `pdsidecar inject` and the webhook are asked to do: ``InjectOptions``, the
labels/annotations and defaults they write, and ``InjectError`` for bad input."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ROLES", "InjectError", "InjectOptions"]

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
