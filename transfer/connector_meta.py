"""Wire formats of the PdConnector: request params, scheduler->worker metadata,
worker->scheduler metadata, handshake payload. Pure Python, import-cheap.

``kv_transfer_params`` stay field-compatible with vLLM's stock NixlConnector
(``do_remote_decode``, ``do_remote_prefill``, ``remote_block_ids`` (list per KV
group), ``remote_engine_id``, ``remote_request_id``, ``remote_host``,
``remote_port``, ``tp_size``, ``remote_num_tokens``, ``remote_blocks_expiry_time``,
``transfer_mode``) and add ``pd_protocol_version``, ``pd_control_addr``,
``remote_dp_rank``, ``remote_block_size``. The decode response adds ``pd_transfer``.

Push mode (``transfer_mode: "push"``): both legs carry ``remote_request_id`` = a
push id chosen by the proxy; the decode leg ``do_remote_prefill: true``, the
prefill leg ``do_remote_decode: true`` plus ``push_target: "host:port"`` (the decode
engine's control plane, where it registers its block ids for that push id).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

try:  # vLLM base classes (present in every process that loads the connector)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorHandshakeMetadata, KVConnectorMetadata, KVConnectorWorkerMetadata)
except Exception:  # pragma: no cover - unit tests without vLLM
    class KVConnectorMetadata:  # type: ignore[no-redef]
        pass

    class KVConnectorHandshakeMetadata:  # type: ignore[no-redef]
        pass

    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        def aggregate(self, other):  # noqa: D401
            raise NotImplementedError

PD_PROTOCOL_VERSION = 1
CONNECTOR_NAME = "PdConnector"

# failure reasons (label values of pd_connector_failures_total)
R_BAD_PARAMS = "bad_params"
R_FOREIGN_HOST = "foreign_host"
R_EXPIRED = "expired"
R_MISMATCH = "mismatch"
R_UNREACHABLE = "unreachable"
R_UNKNOWN_ENGINE = "unknown_engine"
R_BLOCK_RANGE = "block_range"
R_TRANSFER = "transfer_failed"
R_TIMEOUT = "timeout"
R_ABORTED = "aborted"
REASONS = (R_BAD_PARAMS, R_FOREIGN_HOST, R_EXPIRED, R_MISMATCH, R_UNREACHABLE,
           R_UNKNOWN_ENGINE, R_BLOCK_RANGE, R_TRANSFER, R_TIMEOUT, R_ABORTED)


class ParamsError(ValueError):
    """Invalid or unusable ``kv_transfer_params``; ``reason`` is a failure label."""

    def __init__(self, reason: str, msg: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {msg}")


# ----------------------------------------------------------------- config


@dataclass
class PdConfig:
    """``kv_connector_extra_config`` keys understood by the connector."""

    control_port: int = 0  # 0 = ephemeral; else control_port + data_parallel_rank
    control_host: str = ""  # advertised + bind address ("" = env PD_CONTROL_HOST / VLLM_HOST_IP / 127.0.0.1)
    protocol: str = "auto"  # transfer protocol: auto, rdma, tcp, ipc (env KV_TRANSFER_PROTOCOL wins)
    transfer_mode: str = "pull"  # pull = pull only; push = also accept push-mode requests
    kv_lease_s: float = 30.0  # unread prefill blocks are freed after this
    lease_guard_s: float = 1.0  # decode does not start a READ this close to expiry
    transfer_timeout_s: float = 10.0  # a READ not done after this fails
    handshake_timeout_s: float = 5.0
    allowed_remote_hosts: list[str] | None = None  # None = any
    spin_wait_us: float = 3000.0  # worker waits this long for a just-posted READ
    enforce_compat: bool = True
    backends: list[str] = field(default_factory=lambda: ["UCX"])
    nixl_progress_delay_us: int = 100  # NIXL progress-thread poll delay; 0 busy-polls a core
    push_wait_s: float = 30.0  # decode: how long a push request waits for the prefill's KV
    push_lookup_s: float = 5.0  # prefill: how long to wait for the decode's registration
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
        known = set(cls.__dataclass_fields__)
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
        for name in ("push_wait_s", "push_lookup_s"):
            v = float(getattr(cfg, name))
            if not v > 0:
                raise ValueError(f"PdConnector: {name} must be > 0")
            setattr(cfg, name, v)
        cfg.nixl_progress_delay_us = int(cfg.nixl_progress_delay_us)
        if cfg.nixl_progress_delay_us < 0:
            raise ValueError("PdConnector: nixl_progress_delay_us must be >= 0")
        cfg.kv_lease_s = float(cfg.kv_lease_s)
        if cfg.kv_lease_s <= cfg.lease_guard_s:
            raise ValueError("PdConnector: kv_lease_s must exceed lease_guard_s")
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


# ----------------------------------------------------------------- request params


@dataclass(frozen=True)
class RemoteSource:
    """Validated prefill-side description of a request's KV blocks."""

    engine_id: str
    request_id: str
    host: str
    port: int
    block_ids: tuple[int, ...]  # KV group 0
    num_tokens: int
    tp_size: int
    dp_rank: int
    expiry: float | None  # wall clock (time.time())
    block_size: int | None


def _int(v: Any, name: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamsError(R_BAD_PARAMS, f"{name} must be an integer, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ParamsError(R_BAD_PARAMS, f"{name}={v} out of range")
    return v


def _str(v: Any, name: str, maxlen: int = 512) -> str:
    if not isinstance(v, str) or not v or len(v) > maxlen:
        raise ParamsError(R_BAD_PARAMS, f"{name} must be a non-empty string")
    return v


def parse_remote_params(params: Mapping[str, Any], *, now: float | None = None,
                        allowed_hosts: list[str] | None = None, guard_s: float = 0.0,
                        max_blocks: int = 1 << 24) -> RemoteSource:
    """Validate the decode-side ``kv_transfer_params`` (types, host, expiry)."""
    if not isinstance(params, Mapping):
        raise ParamsError(R_BAD_PARAMS, "kv_transfer_params must be an object")
    mode = params.get("transfer_mode", "pull")
    if mode not in (None, "pull"):
        raise ParamsError(R_BAD_PARAMS, f"transfer_mode {mode!r} where pull params are expected")
    ver = params.get("pd_protocol_version")
    if ver is not None and ver != PD_PROTOCOL_VERSION:
        raise ParamsError(R_MISMATCH, f"pd_protocol_version {ver!r} != {PD_PROTOCOL_VERSION}")
    rb = params.get("remote_block_ids")
    if isinstance(rb, list) and rb and all(isinstance(g, list) for g in rb):
        if len(rb) != 1:
            raise ParamsError(R_BAD_PARAMS, f"{len(rb)} KV-cache groups; only 1 supported")
        ids = rb[0]
    elif isinstance(rb, list):  # older flat form
        ids = rb
    else:
        raise ParamsError(R_BAD_PARAMS, "remote_block_ids must be a list (per KV group)")
    if len(ids) > max_blocks:
        raise ParamsError(R_BLOCK_RANGE, f"{len(ids)} remote blocks is too many")
    for b in ids:
        _int(b, "remote_block_ids[]", 0, max_blocks)
    host = _str(params.get("remote_host"), "remote_host", 255)
    if allowed_hosts is not None and host not in allowed_hosts:
        raise ParamsError(R_FOREIGN_HOST, f"remote_host {host!r} not in allowed_remote_hosts")
    exp = params.get("remote_blocks_expiry_time")
    if exp is not None:
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise ParamsError(R_BAD_PARAMS, "remote_blocks_expiry_time must be a number")
        now = time.time() if now is None else now
        if now > float(exp) - guard_s:
            raise ParamsError(R_EXPIRED, f"prefill blocks expired {now - float(exp):.3f} s ago"
                              if now > exp else "prefill blocks about to expire")
    bs = params.get("remote_block_size")
    return RemoteSource(
        engine_id=_str(params.get("remote_engine_id"), "remote_engine_id"),
        request_id=_str(params.get("remote_request_id"), "remote_request_id"),
        host=host,
        port=_int(params.get("remote_port"), "remote_port", 1, 65535),
        block_ids=tuple(ids),
        num_tokens=_int(params.get("remote_num_tokens"), "remote_num_tokens", 0),
        tp_size=_int(params.get("tp_size", 1), "tp_size", 1, 1024),
        dp_rank=_int(params.get("remote_dp_rank", 0), "remote_dp_rank", 0, 4096),
        expiry=None if exp is None else float(exp),
        block_size=None if bs is None else _int(bs, "remote_block_size", 1, 1 << 16),
    )


def plan_block_read(src: RemoteSource, num_prompt_tokens: int, block_size: int,
                    local_block_ids: list[int], num_local_hit_blocks: int
                    ) -> tuple[list[int], list[int]]:
    """``(local_ids, remote_ids)`` to READ: prompt blocks past the local prefix hit."""
    if src.block_size is not None and src.block_size != block_size:
        raise ParamsError(R_MISMATCH, f"remote block size {src.block_size} != {block_size}")
    if src.num_tokens != num_prompt_tokens:
        raise ParamsError(R_MISMATCH, f"remote_num_tokens {src.num_tokens} != prompt "
                                      f"length {num_prompt_tokens}")
    need = -(-num_prompt_tokens // block_size)
    if len(src.block_ids) < need:
        raise ParamsError(R_BLOCK_RANGE, f"{len(src.block_ids)} remote blocks for "
                                         f"{num_prompt_tokens} tokens (need {need})")
    if len(local_block_ids) < need:
        raise ParamsError(R_BLOCK_RANGE, f"only {len(local_block_ids)} local blocks")
    k = min(num_local_hit_blocks, need)
    return list(local_block_ids[k:need]), list(src.block_ids[k:need])


def is_push(params: Mapping[str, Any] | None) -> bool:
    return bool(params) and params.get("transfer_mode") == "push"


def parse_push_id(params: Mapping[str, Any]) -> str:
    """The push id (``remote_request_id``) of push-mode params."""
    return _str(params.get("remote_request_id"), "remote_request_id", 256)


def parse_push_target(params: Mapping[str, Any],
                      allowed_hosts: list[str] | None = None) -> tuple[str, int]:
    """``(host, port)`` of ``push_target`` (prefill side of push mode)."""
    raw = _str(params.get("push_target"), "push_target", 300)
    host, sep, port = raw.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ParamsError(R_BAD_PARAMS, f"push_target {raw!r} is not host:port")
    if allowed_hosts is not None and host not in allowed_hosts:
        raise ParamsError(R_FOREIGN_HOST, f"push_target host {host!r} not in allowed_remote_hosts")
    return host, int(port)


# ----------------------------------------------------------------- scheduler -> worker


@dataclass
class PushRecvJob:
    """Decode side: wait for the prefill engine to WRITE ``push_id``'s KV."""

    req_id: str
    push_id: str
    num_blocks: int
    expiry: float  # wall clock; after it the load fails (policy decides)
    local_ids: list[int] = field(default_factory=list)  # blocks the WRITEs fill


@dataclass
class PushSendStep:
    """Prefill side, one engine step: WRITE these blocks of a request, layer by layer."""

    req_id: str
    push_id: str
    host: str  # decode control plane
    port: int
    engine_id: str
    dp_rank: int
    tp_size: int
    local_ids: list[int]
    remote_ids: list[int]
    final: bool  # last prompt chunk: notify the decode side when all WRITEs are done
    expiry: float  # wall clock: no WRITE starts after it


@dataclass
class RecvJob:
    """Decode side: READ ``remote_ids`` of ``src`` into ``local_ids``."""

    req_id: str
    src: RemoteSource | None
    local_ids: list[int]
    remote_ids: list[int]
    error: str = ""  # reason label when the scheduler already rejected it
    error_msg: str = ""


@dataclass
class PdConnectorMetadata(KVConnectorMetadata):
    recv: dict[str, RecvJob] = field(default_factory=dict)
    # prefill side: req_id -> (expiry wall clock, number of blocks)
    send: dict[str, tuple[float, int]] = field(default_factory=dict)
    # prefill side: requests the decode side released without reading (or aborted)
    release: set[str] = field(default_factory=set)
    # push mode: decode side waits, prefill side writes during the forward
    push_recv: dict[str, PushRecvJob] = field(default_factory=dict)
    push_send: dict[str, PushSendStep] = field(default_factory=dict)
    push_finished: set[str] = field(default_factory=set)  # prefill: scheduler freed the request
    push_fail: dict[str, str] = field(default_factory=dict)  # decode: push id -> reason


# ----------------------------------------------------------------- worker -> scheduler


@dataclass
class PdWorkerMeta(KVConnectorWorkerMetadata):
    """Per-request transfer results of one step: ``req_id -> dict``."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)  # prefill side: freed req ids

    def aggregate(self, other: "PdWorkerMeta") -> "PdWorkerMeta":
        out = PdWorkerMeta(dict(self.results), set(self.released) | set(other.released))
        for rid, r in other.results.items():
            out.results[rid] = merge_result(out.results.get(rid), r)
        return out


def merge_result(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b)
    return {
        "bytes": a.get("bytes", 0) + b.get("bytes", 0),
        "descriptors": a.get("descriptors", 0) + b.get("descriptors", 0),
        "blocks": max(a.get("blocks", 0), b.get("blocks", 0)),
        "ms": max(a.get("ms", 0.0), b.get("ms", 0.0)),
        "seconds": max(a.get("seconds", 0.0), b.get("seconds", 0.0)),
        "backend": a.get("backend") or b.get("backend"),
        "error": a.get("error") or b.get("error", ""),
        "ranks": a.get("ranks", 1) + b.get("ranks", 1),
    }


@dataclass
class PdHandshakeMetadata(KVConnectorHandshakeMetadata):
    """One worker's ``transfer.control.RankDescriptor`` (served by the control plane)."""

    desc: Any


def now_wall() -> float:
    return time.time()
