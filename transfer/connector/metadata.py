"""Wire formats of the PdConnector: request params, scheduler->worker metadata,
worker->scheduler metadata, handshake payload. Pure Python, import-cheap.

``kv_transfer_params`` stay field-compatible with vLLM's stock NixlConnector
(``do_remote_decode``, ``do_remote_prefill``, ``remote_block_ids`` (list per KV
group), ``remote_engine_id``, ``remote_request_id``, ``remote_host``,
``remote_port``, ``tp_size``, ``remote_num_tokens``, ``remote_blocks_expiry_time``,
``transfer_mode``) and add ``pd_protocol_version``, ``pd_control_addr``,
``remote_dp_rank``, ``remote_block_size``, and, from a prefill whose KV covers exactly its
prompt, ``pd_prompt_sha256`` (:func:`prompt_digest` of those tokens: the decode engine
loads the KV only into a prompt that starts with them, else ``mismatch``) and
``pd_next_token_id`` (the token the prefill sampled after them). The decode response adds
``pd_transfer``.

Continuation (the decode sidecar's first token from the prefill leg): the decode leg may
set ``pd_extra_tokens: k`` (1 <= k <= ``MAX_EXTRA_TOKENS``): its prompt is the prefill's
``remote_num_tokens`` tokens plus k tokens the prefill sampled, not computed. Only the
remote prompt's tokens are claimed and read; the decode engine computes the k tokens.
Without it a prompt of another length is refused (``mismatch``).

Push mode (``transfer_mode: "push"``): both legs carry ``remote_request_id`` = a
push id chosen by the proxy; the decode leg ``do_remote_prefill: true``, the
prefill leg ``do_remote_decode: true`` plus ``push_target: "host:port"`` (the decode
engine's control plane, where it registers its block ids for that push id).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgspec

from ..errors import FailureReason, ParamsError

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

#: 2: pull leases on the prefill's monotonic clock; the decode asks ``read:<id>`` first;
#: push: the prefill asks ``write:<push id>`` and WRITEs within a lease on its own clock
PD_PROTOCOL_VERSION = 2
#: most tokens a decode prompt may add to the remote prompt (``pd_extra_tokens``)
MAX_EXTRA_TOKENS = 16
CONNECTOR_NAME = "PdConnector"

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
    lease_s: float | None  # the prefill's lease (pd_kv_lease_s): paces renewals, bounds a READ
    block_size: int | None
    extra_tokens: int = 0  # pd_extra_tokens: local tokens after the remote prompt


def _int(v: Any, name: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamsError(FailureReason.BAD_PARAMS, f"{name} must be an integer, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ParamsError(FailureReason.BAD_PARAMS, f"{name}={v} out of range")
    return v


def _str(v: Any, name: str, maxlen: int = 512) -> str:
    if not isinstance(v, str) or not v or len(v) > maxlen:
        raise ParamsError(FailureReason.BAD_PARAMS, f"{name} must be a non-empty string")
    return v


def parse_remote_params(params: Mapping[str, Any], *, allowed_hosts: list[str] | None = None,
                        max_blocks: int = 1 << 24) -> RemoteSource:
    """Validate the decode-side ``kv_transfer_params`` (types, host). Expiry is never
    judged here: only the prefill engine knows whether its lease still holds."""
    if not isinstance(params, Mapping):
        raise ParamsError(FailureReason.BAD_PARAMS, "kv_transfer_params must be an object")
    mode = params.get("transfer_mode", "pull")
    if mode not in (None, "pull"):
        raise ParamsError(FailureReason.BAD_PARAMS, f"transfer_mode {mode!r} where pull params are expected")
    ver = params.get("pd_protocol_version")
    if ver is not None and ver != PD_PROTOCOL_VERSION:
        raise ParamsError(FailureReason.MISMATCH, f"pd_protocol_version {ver!r} != {PD_PROTOCOL_VERSION}")
    rb = params.get("remote_block_ids")
    if isinstance(rb, list) and rb and all(isinstance(g, list) for g in rb):
        if len(rb) != 1:
            raise ParamsError(FailureReason.BAD_PARAMS, f"{len(rb)} KV-cache groups; only 1 supported")
        ids = rb[0]
    elif isinstance(rb, list):  # older flat form
        ids = rb
    else:
        raise ParamsError(FailureReason.BAD_PARAMS, "remote_block_ids must be a list (per KV group)")
    if len(ids) > max_blocks:
        raise ParamsError(FailureReason.BLOCK_RANGE, f"{len(ids)} remote blocks is too many")
    for b in ids:
        _int(b, "remote_block_ids[]", 0, max_blocks)
    host = _str(params.get("remote_host"), "remote_host", 255)
    if allowed_hosts is not None and host not in allowed_hosts:
        raise ParamsError(FailureReason.FOREIGN_HOST, f"remote_host {host!r} not in allowed_remote_hosts")
    exp = params.get("remote_blocks_expiry_time")
    if exp is not None:
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise ParamsError(FailureReason.BAD_PARAMS, "remote_blocks_expiry_time must be a number")
        if not -1e18 < exp < 1e18:  # a huge int would raise OverflowError in float(); NaN/inf
            raise ParamsError(FailureReason.BAD_PARAMS, "remote_blocks_expiry_time out of range")
    lease = params.get("pd_kv_lease_s")
    if lease is not None and (isinstance(lease, bool) or not isinstance(lease, (int, float))
                              or not 0 < lease < 1e6):
        raise ParamsError(FailureReason.BAD_PARAMS, "pd_kv_lease_s must be a number in (0, 1e6)")
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
        lease_s=None if lease is None else float(lease),
        block_size=None if bs is None else _int(bs, "remote_block_size", 1, 1 << 16),
        extra_tokens=extra_tokens(params),
    )


def extra_tokens(params: Mapping[str, Any]) -> int:
    """``pd_extra_tokens`` (0 when absent); ParamsError when not in 1..MAX_EXTRA_TOKENS."""
    v = params.get("pd_extra_tokens")
    return 0 if v is None else _int(v, "pd_extra_tokens", 1, MAX_EXTRA_TOKENS)


def remote_prompt_tokens(params: Mapping[str, Any], num_prompt_tokens: int) -> int:
    """How many of a decode prompt's tokens the remote computed: the prompt less its
    declared ``pd_extra_tokens`` (cheap: called in ``get_num_new_matched_tokens``; a bad
    value claims the whole prompt and is refused when the blocks are planned)."""
    v = params.get("pd_extra_tokens")
    if type(v) is int and 1 <= v <= MAX_EXTRA_TOKENS and v < num_prompt_tokens:
        return num_prompt_tokens - v
    return num_prompt_tokens


def plan_block_read(src: RemoteSource, num_prompt_tokens: int, block_size: int,
                    local_block_ids: list[int], num_local_hit_blocks: int
                    ) -> tuple[list[int], list[int]]:
    """``(local_ids, remote_ids)`` to READ: prompt blocks past the local prefix hit.

    A continuation (``src.extra_tokens`` > 0) reads only the blocks holding the remote
    prompt's ``src.num_tokens`` tokens (the last one partly; the decode engine writes the
    extra tokens after it once the READ is done): never KV the prefill did not compute."""
    if src.block_size is not None and src.block_size != block_size:
        raise ParamsError(FailureReason.MISMATCH, f"remote block size {src.block_size} != {block_size}")
    if src.num_tokens + src.extra_tokens != num_prompt_tokens:
        raise ParamsError(FailureReason.MISMATCH, f"remote_num_tokens {src.num_tokens} + pd_extra_tokens "
                                      f"{src.extra_tokens} != prompt length {num_prompt_tokens}")
    need = -(-src.num_tokens // block_size)
    if len(src.block_ids) < need:
        raise ParamsError(FailureReason.BLOCK_RANGE, f"{len(src.block_ids)} remote blocks for "
                                         f"{src.num_tokens} tokens (need {need})")
    if len(local_block_ids) < need:
        raise ParamsError(FailureReason.BLOCK_RANGE, f"only {len(local_block_ids)} local blocks")
    k = min(num_local_hit_blocks, need)
    return list(local_block_ids[k:need]), list(src.block_ids[k:need])


def prompt_digest(token_ids: list[int]) -> str:
    """``pd_prompt_sha256``: SHA-256 (hex) of the token ids as a compact JSON array
    (``[1,2,3]``); the decode sidecar computes the same of its own tokenization."""
    return hashlib.sha256(msgspec.json.encode(token_ids)).hexdigest()


def prompt_fields(request: Any, num_tokens: int) -> dict[str, Any]:
    """A finished prefill's ``pd_prompt_sha256`` and ``pd_next_token_id`` when its KV
    covers exactly its prompt's `num_tokens` tokens (else none)."""
    ids = getattr(request, "prompt_token_ids", None)
    if ids is None or len(ids) != num_tokens:
        return {}
    out: dict[str, Any] = {"pd_prompt_sha256": prompt_digest(ids)}
    sampled = request.output_token_ids
    if sampled:
        out["pd_next_token_id"] = int(sampled[0])
    return out


def check_prompt_digest(params: Mapping[str, Any], prompt_token_ids: list[int] | None, num_tokens: int) -> None:
    """A decode prompt must start with the tokens the prefill computed the KV of, when
    the params say which (``pd_prompt_sha256``); ParamsError (``mismatch``) otherwise."""
    want = params.get("pd_prompt_sha256")
    if want is None:
        return
    ids = prompt_token_ids
    if ids is not None and len(ids) > num_tokens:
        ids = ids[:num_tokens]
    if not isinstance(want, str) or ids is None or len(ids) != num_tokens or prompt_digest(ids) != want:
        raise ParamsError(FailureReason.MISMATCH, f"the prompt's first {num_tokens} tokens are not the ones "
                                                  "the prefill computed the KV of (pd_prompt_sha256)")


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
    # isascii: "²".isdigit() is True and int("²") raises, inside the scheduler step
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ParamsError(FailureReason.BAD_PARAMS, f"push_target {raw!r} is not host:port")
    if allowed_hosts is not None and host not in allowed_hosts:
        raise ParamsError(FailureReason.FOREIGN_HOST, f"push_target host {host!r} not in allowed_remote_hosts")
    return host, int(port)


# ----------------------------------------------------------------- scheduler -> worker


@dataclass
class PushRecvJob:
    """Decode side: wait for the prefill engine to WRITE ``push_id``'s KV."""

    req_id: str
    push_id: str
    num_blocks: int
    # blocks the WRITEs fill; the scheduler decides when the wait is over (its write
    # holds, push_grant.py) and tells the workers through ``push_fail``
    local_ids: list[int] = field(default_factory=list)


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
    # this host's time.monotonic(): no WRITE starts after it (time the write grant was
    # asked + the decode's write lease; see push_grant.py)
    valid_until: float


@dataclass
class RecvJob:
    """Decode side: READ ``remote_ids`` of ``src`` into ``local_ids``."""

    req_id: str
    src: RemoteSource | None
    local_ids: list[int]
    remote_ids: list[int]
    error: str = ""  # reason label when the scheduler already rejected it
    error_msg: str = ""
    # time.monotonic() (one clock for every process of a host) when the scheduler
    # allocated the blocks and when it put the job into a step's metadata
    t_alloc: float = 0.0
    t_meta: float = 0.0
    t_start: float = 0.0  # worker: start_load_kv saw it
    # time.monotonic() until which the prefill granted the read (asked by the scheduler
    # when the request arrived); None: the worker asks itself
    granted_until: float | None = None


@dataclass
class PdConnectorMetadata(KVConnectorMetadata):
    recv: dict[str, RecvJob] = field(default_factory=dict)
    # prefill side: req_id -> number of blocks held under a lease (see pull_scheduler)
    send: dict[str, int] = field(default_factory=dict)
    # prefill side: requests the decode side released without reading (or aborted)
    release: set[str] = field(default_factory=set)
    # prefill side: requests whose lease ended unread (freed, counted as expired)
    expired: set[str] = field(default_factory=set)
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
        **({"stages_ms": a["stages_ms"], "t_reported": a.get("t_reported", 0.0)}
           if "stages_ms" in a else {}),
    }


@dataclass
class PdHandshakeMetadata(KVConnectorHandshakeMetadata):
    """One worker's ``transfer.control_messages.RankDescriptor`` (served by the control plane)."""

    desc: Any


#: Test hook: seconds added to this process's wall clock (``PDSIDECAR_TEST_CLOCK_OFFSET_S``),
#: to show that no lease decision depends on two hosts' wall clocks agreeing.
WALL_CLOCK_OFFSET_S = float(os.environ.get("PDSIDECAR_TEST_CLOCK_OFFSET_S", "0") or 0)


def now_wall() -> float:
    """The connector's only wall clock. No lease, grant or push decision uses it (they
    run on each host's monotonic clock); connector code that needs wall time reads it
    here, never ``time.time()`` (a unit test checks), so the engine tests that shift
    it per engine would catch a wall-clock comparison between hosts coming back."""
    return time.time() + WALL_CLOCK_OFFSET_S
