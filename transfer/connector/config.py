"""``PdConfig``: the ``kv_connector_extra_config`` keys the PdConnector understands,
validated once at start-up (unknown keys, ranges, auth material, advertised address)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

@dataclass
class PdConfig:
    """``kv_connector_extra_config`` keys understood by the connector."""

    control_port: int = 0  # 0 = ephemeral; else control_port + data_parallel_rank
    control_host: str = ""  # advertised + bind address ("" = env PD_CONTROL_HOST / VLLM_HOST_IP / 127.0.0.1)
    protocol: str = "auto"  # transfer protocol: auto, rdma, tcp, ipc (env KV_TRANSFER_PROTOCOL wins)
    transfer_mode: str = "pull"  # pull = pull only; push = also accept push-mode requests
    # prefill: unread blocks are freed this long after the request finished (on this
    # host's monotonic clock), or after the last renewal / read grant (pull_scheduler)
    kv_lease_s: float = 30.0
    transfer_timeout_s: float = 10.0  # a READ not done after this fails
    handshake_timeout_s: float = 5.0
    allowed_remote_hosts: list[str] | None = None  # None = any
    spin_wait_us: float = 0.0  # worker may spin this long for a just-posted READ (0: never)
    backends: list[str] = field(default_factory=lambda: ["UCX"])
    # NIXL progress-thread poll delay (µs); 0 busy-polls a core. None: env
    # PDSIDECAR_NIXL_PROGRESS_DELAY_US, else transfer.nixl_agent's default
    nixl_progress_delay_us: int | None = None
    # host (DRAM) caches: collapse the registered KV cache onto transparent huge pages
    # at start-up (transfer.hugepages; best effort, logged); False leaves it as allocated.
    # None: env PDSIDECAR_KV_HUGE_PAGES (1/0), else True
    kv_huge_pages: bool | None = None
    push_wait_s: float = 30.0  # decode: how long a push request waits for the prefill's KV
    # decode: a granted write: lets the prefill WRITE this long (its monotonic clock;
    # it renews at half); the decode holds the blocks this + transfer_timeout_s past a grant
    push_write_lease_s: float = 10.0
    push_lookup_s: float = 5.0  # prefill: how long to wait for the decode's registration
    # control-plane authentication (transfer.control_auth): the shared token's file
    # ("" = env PDSIDECAR_AUTH_TOKEN_FILE, else env PDSIDECAR_AUTH_TOKEN)
    control_token_file: str = ""
    require_control_auth: bool = False  # refuse to start without a token
    control_tls_dir: str = ""  # mutual TLS: ca.crt, tls.crt, tls.key ("" = env PD_CONTROL_TLS_DIR)
    control_token: str | None = field(default=None, repr=False)  # resolved; not a key
    control_tls: Any = field(default=None, repr=False)  # resolved TlsFiles; not a key
    # advertise a loopback control address although peers read from this engine: only
    # for single-host setups (env PD_ALLOW_LOOPBACK=1 does the same; the local harness
    # sets it). Without it such an engine refuses to start (see check_advertised).
    allow_loopback: bool = False

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None,
                   kv_role: str | None = None) -> "PdConfig":
        import os
        env = os.environ if env is None else env
        extra = dict(extra or {})
        known = set(cls.__dataclass_fields__) - {"control_token", "control_tls"}
        unknown = set(extra) - known
        if unknown:
            raise ValueError(f"PdConnector: unknown kv_connector_extra_config keys "
                             f"{sorted(unknown)} (known: {sorted(known)})")
        cfg = cls(**extra)
        cfg.control_port = int(cfg.control_port)
        if not 0 <= cfg.control_port < 65536:
            raise ValueError(f"PdConnector: control_port {cfg.control_port} out of range")
        cfg.protocol = str(env.get("KV_TRANSFER_PROTOCOL") or cfg.protocol).lower()
        if cfg.protocol not in ("auto", "rdma", "tcp", "ipc"):
            raise ValueError(f"PdConnector: protocol {cfg.protocol!r} not one of auto, rdma, "
                             f"tcp, ipc")
        if cfg.transfer_mode not in ("pull", "push"):
            raise ValueError(f"PdConnector: transfer_mode {cfg.transfer_mode!r} not pull/push")
        for name in ("push_wait_s", "push_lookup_s", "push_write_lease_s"):
            v = float(getattr(cfg, name))
            if not v > 0:
                raise ValueError(f"PdConnector: {name} must be > 0")
            setattr(cfg, name, v)
        if cfg.nixl_progress_delay_us is None:
            from ..nixl_agent import progress_delay_default
            cfg.nixl_progress_delay_us = progress_delay_default(env)
        cfg.nixl_progress_delay_us = int(cfg.nixl_progress_delay_us)
        if cfg.kv_huge_pages is None:
            v = env.get("PDSIDECAR_KV_HUGE_PAGES", "1").strip().lower()
            if v not in ("1", "0", "true", "false"):
                raise ValueError(f"PdConnector: PDSIDECAR_KV_HUGE_PAGES must be 1/0/true/false, got {v!r}")
            cfg.kv_huge_pages = v in ("1", "true")
        if not isinstance(cfg.kv_huge_pages, bool):
            raise ValueError(f"PdConnector: kv_huge_pages must be true or false, got {cfg.kv_huge_pages!r}")
        if cfg.nixl_progress_delay_us < 0:
            raise ValueError("PdConnector: nixl_progress_delay_us must be >= 0")
        cfg.kv_lease_s = float(cfg.kv_lease_s)
        if not 0 < cfg.kv_lease_s < 1e6:
            raise ValueError("PdConnector: kv_lease_s must be a number of seconds in (0, 1e6)")
        if not isinstance(cfg.require_control_auth, bool):
            raise ValueError("PdConnector: require_control_auth must be true or false")
        from ..control_auth import load_tls, load_token
        cfg.control_token = load_token(str(cfg.control_token_file or ""), env)
        cfg.control_tls = load_tls(str(cfg.control_tls_dir or ""), env)
        if cfg.require_control_auth and not cfg.control_token and cfg.control_tls is None:
            raise ValueError("PdConnector: require_control_auth is set but neither a control "
                             "token (control_token_file, PDSIDECAR_AUTH_TOKEN_FILE or "
                             "PDSIDECAR_AUTH_TOKEN) nor control_tls_dir is configured")
        if not cfg.control_host:
            cfg.control_host = (env.get("PD_CONTROL_HOST") or env.get("VLLM_HOST_IP")
                                or "127.0.0.1")
        if not isinstance(cfg.allow_loopback, bool):
            raise ValueError("PdConnector: allow_loopback must be true or false")
        if env.get("PD_ALLOW_LOOPBACK", "").lower() in ("1", "true", "yes"):
            cfg.allow_loopback = True
        cfg.check_advertised(kv_role)
        return cfg

    def check_advertised(self, kv_role: str | None) -> None:
        """Refuse a loopback control address on an engine that remote peers read from.

        A prefill (``kv_producer``/``kv_both``) engine advertises ``control_host`` in
        every answer; 127.0.0.1 sends a decode engine in another pod to its own
        loopback, where the load fails and the prompt is silently recomputed."""
        if kv_role not in ("kv_producer", "kv_both") or self.allow_loopback:
            return
        if is_loopback(self.control_host):
            raise ValueError(
                f"PdConnector: refusing to advertise loopback control address {self.control_host!r} with "
                f"kv_role {kv_role}: peers in other pods could not reach it; set PD_CONTROL_HOST to the pod "
                f"IP (env from fieldRef status.podIP) or kv_connector_extra_config.control_host, or "
                f"allow_loopback: true / PD_ALLOW_LOOPBACK=1 when every engine runs on this host")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    import ipaddress
    h = host.strip("[]").lower()
    if h in ("localhost", "localhost.localdomain") or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


