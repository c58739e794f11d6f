"""Scheduler half of the PdConnector, shared part (engine-core process).

Holds the per-step state both modes hand to the workers, the gRPC control server
(``control_port + data_parallel_rank``, or an ephemeral port when 0) that serves the
workers' handshake metadata and receives notifications, the one notification path to
other engines (:class:`~transfer.connector.control_client.ControlNotifier`), and the
gauges. The pull and push parts are :mod:`.pull_scheduler` and :mod:`.push_scheduler`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import FailureReason, PeerRefused
from .config import PdConfig
from .control_client import ControlNotifier
from .metadata import PdConnectorMetadata, PdWorkerMeta, PushRecvJob, RecvJob
from .stats import PdConnectorStats

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.pdsidecar.connector")  # vLLM's handlers and format

FINISHED_OK = ("FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED")


def external_ids(request: "Request", blocks: Any, num_external_tokens: int,
                 block_size: int) -> list[int]:
    """Local block ids that were to receive the ``num_external_tokens`` remote tokens.

    A rejected load still names them: vLLM releases before 0.27 learn of a failed
    load only from these ids (``get_block_ids_with_load_errors``)."""
    if num_external_tokens <= 0:
        return []
    # the external tokens end the prompt (get_num_new_matched_tokens asks for
    # num_prompt_tokens - num_computed_tokens); local prefix hits are whole blocks
    first = (request.num_prompt_tokens - num_external_tokens) // block_size
    last = -(-request.num_prompt_tokens // block_size)
    return [b.block_id for b in blocks.blocks[0][first:last]]


class BaseScheduler:
    """State, control plane and stats shared by the pull and push scheduler parts."""

    def __init__(self, cfg: PdConfig, *, engine_id: str, block_size: int, tp_size: int,
                 dp_rank: int, start_server: bool = True) -> None:
        self.cfg = cfg
        self.engine_id = engine_id
        self.block_size = block_size
        self.tp_size = tp_size
        self.dp_rank = dp_rank
        self.clock: Callable[[], float] = time.monotonic  # lease clock (tests inject one)
        self._lock = threading.Lock()  # the control server's threads vs the engine thread
        self._recv: dict[str, RecvJob] = {}
        self._send: dict[str, int] = {}  # prefill: req -> blocks, for the next step
        self._release_in: set[str] = set()  # from release: notifications
        self._pending: dict[str, Any] = {}  # prefill reqs held for pickup (pull_scheduler.Lease)
        self._results: dict[str, dict[str, Any]] = {}  # decode: req -> pd_transfer
        self._recv_blocks: dict[str, int] = {}  # decode: req -> blocks inflight
        self._push_recv: dict[str, PushRecvJob] = {}  # decode: jobs for the next step
        self._push_ids: dict[str, str] = {}  # decode: req -> push id (registered)
        self._push_fail_in: dict[str, str] = {}  # decode: push id -> reason (Notify)
        self._push_finished: set[str] = set()  # prefill: freed, for the next step
        self._gauges_dirty = True
        self._renewed_new = 0  # prefill: lease renewals applied, not yet in get_stats
        self.bad_params = 0  # requests whose kv_transfer_params were not an object
        self._bad_params_new = 0  # ... not yet reported in get_stats
        self._server = None
        self.notifier = ControlNotifier(engine_id, cfg.handshake_timeout_s)
        self.port = 0
        self.block_bytes = 0
        self.host = cfg.control_host
        if start_server:
            self._start_server()

    # ------------------------------------------------------------ control plane
    def _start_server(self) -> None:
        from .control_client import configure_auth, start_control_server
        configure_auth(self.cfg.control_token, self.cfg.control_tls)
        port = self.cfg.control_port + self.dp_rank if self.cfg.control_port else 0
        self._server = start_control_server(self.host, port, on_notify=self._on_notify)
        self.port = self._server.port
        log.info("PdConnector %s control plane on %s:%d", self.engine_id, self.host, self.port)

    def _on_notify(self, sender: str, receiver: str, message: bytes) -> None:
        """A control-plane ``Notify`` (on one of the server's threads).

        Leases (pull, :meth:`_on_lease_notify`): ``release:<id>``, ``renew:<id>,<id>``,
        ``read:<id>`` (refused with a reason when the lease is over). Push
        (:meth:`_on_push_notify`): ``write:<push id>`` (a write grant, refused the same
        way) and ``push-fail:<push id>:<reason>``, which may come with an empty receiver
        (a prefill engine that could not look our registration up does not know our id).
        """
        msg = bytes(message).decode(errors="replace")
        if receiver != self.engine_id and not (receiver == "" and msg.startswith("push-fail:")):
            # a refusal the caller can name: e.g. a decode asking read: of params that
            # name another engine at this address fails its load as unknown_engine
            raise PeerRefused(FailureReason.UNKNOWN_ENGINE, f"notification for engine "
                              f"{receiver[:80]!r}, this is {self.engine_id!r}")
        kind, _, arg = msg.partition(":")
        if kind in ("write", "push-fail"):
            self._on_push_notify(kind, arg)
            return
        if kind not in ("release", "renew", "read"):
            raise ValueError(f"unknown notification {msg[:40]!r}")
        self._on_lease_notify(kind, arg)

    def _on_lease_notify(self, kind: str, arg: str) -> None:
        raise ValueError(f"{kind}: notifications are not served here")

    def _on_push_notify(self, kind: str, arg: str) -> None:
        raise ValueError(f"{kind}: notifications are not served here")

    def set_workers_metadata(self, descs: dict[int, Any]) -> None:
        """Workers' ``transfer.control_messages.RankDescriptor`` by TP rank, served by Handshake."""
        # bytes of one block over all layers and TP ranks (reported as pd_kv_bytes)
        self.block_bytes = sum(r.block_len for d in descs.values() for r in d.peer.regions)
        for d in descs.values():
            d.dp_rank = self.dp_rank
            if self._server is not None:
                self._server.add_rank(d)

    def _params(self, request: "Request") -> dict | None:
        """The request's kv_transfer_params if they are an object (or None). Anything else
        (a string or list sent straight to vLLM's port, e.g. via ``vllm_xargs``) is "no
        remote KV": counted (``bad_params``), logged, dropped from the request, and never
        an exception inside the scheduler step."""
        params = request.kv_transfer_params
        if params is None or isinstance(params, dict):
            return params
        self.bad_params += 1
        self._bad_params_new += 1
        self._gauges_dirty = True
        log.warning("PdConnector: request %s: kv_transfer_params is a %s, not an object; "
                    "treated as no remote KV (%s)", request.request_id, type(params).__name__,
                    FailureReason.BAD_PARAMS)
        try:
            request.kv_transfer_params = None
        except AttributeError:  # pragma: no cover - a read-only attribute in some version
            pass
        return None

    def _reject_load(self, request: "Request", blocks: Any, num_external_tokens: int,
                     src: Any, reason: FailureReason, msg: str) -> None:
        """A load that cannot happen: failed in the next step's metadata (the policy
        decides: recompute or error), naming the local blocks it was to fill."""
        if num_external_tokens > 0:
            rid = request.request_id
            self._recv[rid] = RecvJob(rid, src, external_ids(
                request, blocks, num_external_tokens, self.block_size), [], reason, msg)

    # ------------------------------------------------------------ per step
    def _plan_push_steps(self, scheduler_output: Any) -> dict:
        return {}

    def _expired_leases(self) -> set[str]:
        return set()

    def _send_renewals(self) -> None:
        pass

    def _sweep_push_holds(self) -> dict[str, str]:
        return {}

    def _push_load_ended(self, push_id: str) -> None:
        if self._server is not None:
            self._server.push_targets.drop(push_id)

    def _push_grant_counts(self) -> tuple[int, int]:
        return 0, 0

    def build_connector_meta(self, scheduler_output: Any) -> PdConnectorMetadata:
        with self._lock:
            release, self._release_in = self._release_in, set()
            push_fail, self._push_fail_in = self._push_fail_in, {}
        push_fail.update(self._sweep_push_holds())
        now = time.monotonic()
        for job in self._recv.values():
            job.t_meta = now
        self._send_renewals()
        meta = PdConnectorMetadata(recv=self._recv, send=self._send, release=release,
                                   expired=self._expired_leases(),
                                   push_recv=self._push_recv,
                                   push_send=self._plan_push_steps(scheduler_output),
                                   push_finished=self._push_finished, push_fail=push_fail)
        self._recv = {}
        self._send = {}
        self._push_recv = {}
        self._push_finished = set()
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        wm = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(wm, PdWorkerMeta):
            now = time.monotonic()
            for rid, r in wm.results.items():
                st = r.get("stages_ms")
                if st is not None and "t_reported" in r:
                    st["reported_to_scheduler"] = round((now - r.pop("t_reported")) * 1e3, 3)
                self._results[rid] = r
            # results of requests aborted while their READ was in flight are never
            # popped by request_finished: keep the map bounded (oldest first)
            while len(self._results) > 4096:
                self._results.pop(next(iter(self._results)))
        for rid in connector_output.finished_recving or ():
            if self._recv_blocks.pop(rid, None) is not None:
                self._gauges_dirty = True
            push_id = self._push_ids.pop(rid, None)
            if push_id is not None:
                self._push_load_ended(push_id)
        for rid in connector_output.finished_sending or ():
            with self._lock:
                if self._pending.pop(rid, None) is not None:
                    self._gauges_dirty = True

    def get_stats(self) -> PdConnectorStats | None:
        refused = self._server.refused.take() if self._server is not None else {}
        with self._lock:
            renewed, self._renewed_new = self._renewed_new, 0
        grants = self._push_grant_counts()
        if not self._gauges_dirty and not refused and not renewed and not any(grants):
            return None
        self._gauges_dirty = False
        s = PdConnectorStats()
        s.record_renewals(renewed)
        s.record_push_grants(*grants)
        for _ in range(self._bad_params_new):
            s.record_failure(FailureReason.BAD_PARAMS)
        self._bad_params_new = 0
        for reason, n in refused.items():
            s.record_control_refused(reason, n)
        with self._lock:
            s.set_gauge("pending_blocks", sum(lease.nblocks for lease in self._pending.values()))
            s.set_gauge("pending_reqs", len(self._pending))
        s.set_gauge("recv_inflight_blocks", sum(self._recv_blocks.values()))
        return s

    def has_pending(self) -> bool:
        return bool(self._pending)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        self.notifier.shutdown()
