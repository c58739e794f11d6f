"""Scheduler half of the PdConnector (engine-core process).

Prefill side: ``request_finished`` keeps a finished ``do_remote_decode`` request's
blocks under a lease (``kv_lease_s``) and returns NixlConnector-compatible params;
the worker frees them when the decode side's READ-completion notification arrives,
a ``Release`` RPC comes in, or the lease expires.

Decode side: a ``do_remote_prefill`` request asks for ``prompt - local hit`` tokens
asynchronously; ``update_state_after_alloc`` validates the params and plans which
local blocks receive which remote blocks (only the blocks past the local prefix
hit). Invalid params become a failed load, so vLLM's ``kv_load_failure_policy``
decides (recompute or error), never a crash.

The gRPC control server (``control_port + data_parallel_rank``, or an ephemeral
port when 0) serves the workers' handshake metadata.

Push mode (``transfer_mode: "push"`` in the request's params): the decode side
registers its block ids for the push id in its control server when the blocks are
allocated; the prefill side holds the request back (``None`` from
``get_num_new_matched_tokens``) until a background lookup found that registration,
then plans per step which of its blocks go where, and the worker WRITEs them layer
by layer during the forward (``save_kv_layer``).
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .connector_meta import (PD_PROTOCOL_VERSION, R_ABORTED, R_BAD_PARAMS, R_MISMATCH, R_TIMEOUT,
                             R_UNREACHABLE, ParamsError, PdConfig, PdConnectorMetadata,
                             PdWorkerMeta, PushRecvJob, PushSendStep, RecvJob, is_push,
                             now_wall, parse_push_id, parse_push_target, parse_remote_params,
                             plan_block_read)
from .connector_control import send_notify
from .connector_stats import PdConnectorStats


if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.pdsidecar.connector")  # vLLM's handlers and format

_FINISHED_OK = ("FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED")
_LOOKUP_INLINE_WAIT_S = 0.05  # push lookup: blocking wait per scheduler call


@dataclass
class _PushOut:
    """Prefill side: one push request's destination and progress."""

    push_id: str
    host: str
    port: int
    lookup: Future | None = None
    target: object | None = None  # transfer.control.PushTarget once found
    error: str = ""
    block_ids: list[int] = field(default_factory=list)  # our blocks, in prompt order
    computed: int = 0  # prompt tokens computed before the current step
    written: int = 0  # prompt blocks already planned for WRITE
    emitted: bool = False  # the worker got at least one step (it tracks the request)
    final_sent: bool = False



def _external_ids(request: "Request", blocks: Any, num_external_tokens: int,
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

class PdConnectorScheduler:
    def __init__(self, cfg: PdConfig, *, engine_id: str, block_size: int, tp_size: int,
                 dp_rank: int, start_server: bool = True) -> None:
        self.cfg = cfg
        self.engine_id = engine_id
        self.block_size = block_size
        self.tp_size = tp_size
        self.dp_rank = dp_rank
        self._lock = threading.Lock()
        self._recv: dict[str, RecvJob] = {}
        self._send: dict[str, tuple[float, int]] = {}
        self._release_in: set[str] = set()  # from Release RPCs
        self._pending: dict[str, tuple[float, int]] = {}  # prefill reqs held for pickup
        self._results: dict[str, dict[str, Any]] = {}  # decode: req -> pd_transfer
        self._recv_blocks: dict[str, int] = {}  # decode: req -> blocks inflight
        self._push_recv: dict[str, PushRecvJob] = {}  # decode: jobs for the next step
        self._push_ids: dict[str, str] = {}  # decode: req -> push id (registered)
        self._push_fail_in: dict[str, str] = {}  # decode: push id -> reason (Notify)
        self._push_out: dict[str, _PushOut] = {}  # prefill: req -> push state
        self._push_finished: set[str] = set()  # prefill: freed, for the next step
        self._gauges_dirty = True
        self._server = None
        self._bg: ThreadPoolExecutor | None = None
        self.port = 0
        self.block_bytes = 0
        self.host = cfg.control_host
        if start_server:
            self._start_server()

    # ------------------------------------------------------------ control plane
    def _start_server(self) -> None:
        from .connector_control import start_control_server
        port = self.cfg.control_port + self.dp_rank if self.cfg.control_port else 0
        self._server = start_control_server(self.host, port, on_notify=self._on_notify)
        self.port = self._server.port
        log.info("PdConnector %s control plane on %s:%d", self.engine_id, self.host, self.port)

    def _on_notify(self, sender: str, receiver: str, message: bytes) -> None:
        """``Notify(receiver=<our engine id>, message=b"release:<request id>")``.

        ``push-fail:<push id>:<reason>`` may come with an empty receiver (a prefill
        engine that could not look our registration up does not know our id).
        """
        msg = bytes(message).decode(errors="replace")
        if receiver != self.engine_id and not (receiver == "" and msg.startswith("push-fail:")):
            raise ValueError(f"notification for engine {receiver!r}, this is {self.engine_id!r}")
        if msg.startswith("push-fail:"):
            push_id, _, reason = msg[len("push-fail:"):].partition(":")
            with self._lock:
                self._push_fail_in[push_id] = reason or "transfer_failed"
            return
        if not msg.startswith("release:"):
            raise ValueError(f"unknown notification {msg[:40]!r}")
        rid = msg[len("release:"):]
        with self._lock:
            if rid in self._pending:
                self._release_in.add(rid)

    def set_workers_metadata(self, descs: dict[int, Any]) -> None:
        """Workers' ``transfer.control.RankDescriptor`` by TP rank, served by Handshake."""
        # bytes of one block over all layers and TP ranks (reported as pd_kv_bytes)
        self.block_bytes = sum(r.block_len for d in descs.values() for r in d.peer.regions)
        for d in descs.values():
            d.dp_rank = self.dp_rank
            if self._server is not None:
                self._server.add_rank(d)

    def _release_remote(self, src_host: str, src_port: int, remote_req_id: str,
                        remote_engine_id: str = "") -> None:
        """Best effort: tell a prefill engine to free blocks (else its lease frees them)."""
        self._notify_async(src_host, src_port, remote_engine_id, f"release:{remote_req_id}")

    def _notify_async(self, host: str, port: int, receiver: str, message: str) -> None:
        """Best effort, off the engine thread: a control-plane ``Notify`` to an engine."""
        me, timeout = self.engine_id, self.cfg.handshake_timeout_s

        def go() -> None:
            try:
                send_notify(host, port, me, receiver, message, timeout)
            except Exception as e:  # the other engine is gone or unreachable
                log.info("PdConnector: notification %r to %s:%s failed: %s", message[:80],
                         host, port, e)
        self._background().submit(go)

    # ------------------------------------------------------------ decode side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill"):
            count = request.num_prompt_tokens - num_computed_tokens
            if count > 0:
                return count, True
        elif is_push(params) and params.get("do_remote_decode"):
            if self.cfg.transfer_mode != "push":
                log.warning("PdConnector: request %s asks for push mode, which this engine "
                            "does not accept (transfer_mode=%s)", request.request_id,
                            self.cfg.transfer_mode)
                params["do_remote_decode"] = False
                return 0, False
            return self._push_lookup_state(request)
        return 0, False

    # ------------------------------------------------------------ push, prefill side
    def _push_lookup_state(self, request: "Request") -> tuple[int | None, bool]:
        """``(None, False)`` while the decode registration is being looked up."""
        rid = request.request_id
        out = self._push_out.get(rid)
        if out is None:
            params = request.kv_transfer_params
            try:
                push_id = parse_push_id(params)
                host, port = parse_push_target(params, self.cfg.allowed_remote_hosts)
            except ParamsError as e:
                log.warning("PdConnector: request %s: bad push params: %s", rid, e)
                params["do_remote_decode"] = False
                return 0, False
            out = self._push_out[rid] = _PushOut(push_id, host, port)
            out.lookup = self._background().submit(self._lookup, host, port, push_id)
        if out.lookup is not None:
            if not out.lookup.done():
                # the decode leg was sent at the same time and usually registered
                # within milliseconds: a short wait here beats a round of empty
                # engine steps (which also compete with the lookup thread for the GIL)
                try:
                    out.lookup.exception(timeout=_LOOKUP_INLINE_WAIT_S)
                except Exception:  # TimeoutError / CancelledError
                    pass
            if not out.lookup.done():
                return None, False
            try:
                out.target = out.lookup.result()
                if out.target is None:
                    out.error = R_TIMEOUT
            except Exception as e:
                out.error = R_UNREACHABLE
                log.warning("PdConnector: push %s: decode control %s:%d: %s", out.push_id,
                            out.host, out.port, e)
            out.lookup = None
            t = out.target
            if t is not None and t.num_tokens != request.num_prompt_tokens:
                out.error, out.target = R_MISMATCH, None
            if t is not None and (t.block_size != self.block_size or t.tp_size != self.tp_size):
                out.error, out.target = R_MISMATCH, None
            if out.error:
                self._push_failed(out, out.error)
        return 0, False

    def _lookup(self, host: str, port: int, push_id: str) -> object | None:
        from .connector_control import control_client
        return control_client(host, port, self.cfg.handshake_timeout_s).push_target(
            push_id, wait_s=self.cfg.push_lookup_s, timeout_s=self.cfg.handshake_timeout_s)

    def _push_failed(self, out: _PushOut, reason: str) -> None:
        """Tell the decode side (best effort) so it recomputes now, not at its timeout."""
        log.warning("PdConnector: push %s failed (%s); the decode side recomputes",
                    out.push_id, reason)
        self._notify_async(out.host, out.port, getattr(out.target, "engine_id", ""),
                           f"push-fail:{out.push_id}:{reason}")

    def _background(self) -> ThreadPoolExecutor:
        if self._bg is None:
            self._bg = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pd-bg")
        return self._bg

    def _plan_push_steps(self, scheduler_output: Any) -> dict[str, PushSendStep]:
        """Blocks each push request finishes writing in this step (``{}`` if none)."""
        if not self._push_out:
            return {}
        for nr in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            out = self._push_out.get(nr.req_id)
            if out is not None:
                out.block_ids = list(nr.block_ids[0]) if nr.block_ids else []
                out.computed = nr.num_computed_tokens
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = getattr(cached, "resumed_req_ids", set()) or set()
            for i, rid in enumerate(cached.req_ids):
                out = self._push_out.get(rid)
                if out is None:
                    continue
                if rid in resumed and out.target is not None:
                    # preempted and resumed: blocks may have changed; stop pushing
                    self._push_failed(out, "preempted")
                    out.target = None
                new = cached.new_block_ids[i]
                if new:
                    out.block_ids.extend(new[0])
                out.computed = cached.num_computed_tokens[i]
        steps: dict[str, PushSendStep] = {}
        sched = scheduler_output.num_scheduled_tokens
        for rid, out in self._push_out.items():
            t = out.target
            if t is None or out.final_sent or rid not in sched:
                continue
            after = out.computed + sched[rid]
            final = after >= t.num_tokens
            upto = math.ceil(t.num_tokens / self.block_size) if final else after // self.block_size
            first, last = t.first_block, t.first_block + len(t.block_ids)
            ks = [k for k in range(max(out.written, first), min(upto, last)) if k < len(out.block_ids)]
            out.written = max(out.written, upto)
            if not ks and not final:
                continue
            steps[rid] = PushSendStep(
                req_id=rid, push_id=out.push_id, host=out.host, port=out.port,
                engine_id=t.engine_id, dp_rank=t.dp_rank, tp_size=t.tp_size,
                local_ids=[out.block_ids[k] for k in ks],
                remote_ids=[t.block_ids[k - first] for k in ks], final=final, expiry=t.expiry)
            out.final_sent = final
            out.emitted = True
        return steps

    def update_state_after_alloc(self, request: "Request", blocks: Any,
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # one transfer per request
        rid = request.request_id
        if is_push(params):
            if self.cfg.transfer_mode != "push":
                if num_external_tokens > 0:
                    self._recv[rid] = RecvJob(rid, None, _external_ids(request, blocks,
                                              num_external_tokens, self.block_size), [],
                                              R_BAD_PARAMS,
                                              "push mode not accepted (transfer_mode=pull)")
                return
            self._register_push(request, params, blocks, num_external_tokens)
            return
        try:
            src = parse_remote_params(params, allowed_hosts=self.cfg.allowed_remote_hosts,
                                      guard_s=self.cfg.lease_guard_s)
        except ParamsError as e:
            if num_external_tokens > 0:
                self._recv[rid] = RecvJob(rid, None, _external_ids(
                    request, blocks, num_external_tokens, self.block_size), [], e.reason, str(e))
            log.warning("PdConnector: request %s: invalid kv_transfer_params: %s", rid, e)
            return
        if num_external_tokens == 0:
            # full local prefix hit: nothing to read, free the prefill blocks now
            self._release_remote(src.host, src.port, src.request_id, src.engine_id)
            return
        group = blocks.blocks[0]
        local_ids = [b.block_id for b in group]
        hit = 0
        for b in group:
            if b.block_hash is None or getattr(b, "is_null", False):
                break
            hit += 1
        try:
            lids, rids = plan_block_read(src, request.num_prompt_tokens, self.block_size,
                                         local_ids, hit)
        except ParamsError as e:
            self._recv[rid] = RecvJob(rid, src, _external_ids(
                request, blocks, num_external_tokens, self.block_size), [], e.reason, str(e))
            self._release_remote(src.host, src.port, src.request_id, src.engine_id)
            log.warning("PdConnector: request %s: %s", rid, e)
            return
        self._recv[rid] = RecvJob(rid, src, lids, rids)
        self._recv_blocks[rid] = len(lids)
        self._gauges_dirty = True

    def _register_push(self, request: "Request", params: dict, blocks: Any,
                       num_external_tokens: int) -> None:
        """Decode side of push mode: publish our block ids for the push id."""
        from .control import PushTarget
        rid = request.request_id
        try:
            push_id = parse_push_id(params)
        except ParamsError as e:
            if num_external_tokens > 0:
                self._recv[rid] = RecvJob(rid, None, _external_ids(
                    request, blocks, num_external_tokens, self.block_size), [], e.reason, str(e))
            return
        need = math.ceil(request.num_prompt_tokens / self.block_size)
        local_ids = [b.block_id for b in blocks.blocks[0]] if num_external_tokens else []
        hit = min(need, (request.num_prompt_tokens - num_external_tokens) // self.block_size) \
            if num_external_tokens else need
        expiry = now_wall() + self.cfg.push_wait_s
        target = PushTarget(engine_id=self.engine_id, dp_rank=self.dp_rank, tp_size=self.tp_size,
                            block_size=self.block_size, num_tokens=request.num_prompt_tokens,
                            first_block=hit, block_ids=local_ids[hit:need], expiry=expiry,
                            request_id=rid)
        if self._server is not None:
            self._server.push_targets.register(push_id, target)
        if num_external_tokens > 0:
            self._push_ids[rid] = push_id
            self._push_recv[rid] = PushRecvJob(rid, push_id, need - hit, expiry,
                                               local_ids=local_ids[hit:need])
            self._recv_blocks[rid] = need - hit
            self._gauges_dirty = True

    # ------------------------------------------------------------ both
    def build_connector_meta(self, scheduler_output: Any) -> PdConnectorMetadata:
        with self._lock:
            release, self._release_in = self._release_in, set()
            push_fail, self._push_fail_in = self._push_fail_in, {}
        meta = PdConnectorMetadata(recv=self._recv, send=self._send, release=release,
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
            for rid, r in wm.results.items():
                self._results[rid] = r
            # results of requests aborted while their READ was in flight are never
            # popped by request_finished: keep the map bounded (oldest first)
            while len(self._results) > 4096:
                self._results.pop(next(iter(self._results)))
        for rid in connector_output.finished_recving or ():
            if self._recv_blocks.pop(rid, None) is not None:
                self._gauges_dirty = True
            push_id = self._push_ids.pop(rid, None)
            if push_id is not None and self._server is not None:
                self._server.push_targets.drop(push_id)
        for rid in connector_output.finished_sending or ():
            if self._pending.pop(rid, None) is not None:
                self._gauges_dirty = True

    def request_finished(self, request: "Request", block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if not params:
            return False, None
        rid = request.request_id
        if is_push(params) and rid in self._push_out:
            return self._push_request_finished(request, params)
        if params.get("do_remote_prefill"):
            # decode request finished (aborted) before it was scheduled: free the
            # prefill blocks now instead of waiting for the lease
            params["do_remote_prefill"] = False
            try:
                src = parse_remote_params(params)
                self._release_remote(src.host, src.port, src.request_id, src.engine_id)
            except ParamsError:
                pass
            return False, {"pd_transfer": {"error": R_ABORTED}, "pd_protocol_version":
                           PD_PROTOCOL_VERSION}
        if not params.get("do_remote_decode"):
            # decode side (or plain request): report what the transfer cost
            res = self._results.pop(rid, None)
            self._recv_blocks.pop(rid, None)
            if res is None:
                return False, None
            return False, {"pd_transfer": res, "pd_protocol_version": PD_PROTOCOL_VERSION}
        # prefill side
        status = getattr(request.status, "name", str(request.status))
        if status not in _FINISHED_OK or not block_ids:
            return False, None
        ids = list(block_ids)
        n_tokens = request.num_computed_tokens
        need = -(-n_tokens // self.block_size)
        ids = ids[:need] if need else ids
        expiry = now_wall() + self.cfg.kv_lease_s
        self._send[rid] = (expiry, len(ids))
        self._pending[rid] = (expiry, len(ids))
        self._gauges_dirty = True
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [ids],
            "remote_engine_id": self.engine_id,
            "remote_request_id": rid,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": self.tp_size,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": n_tokens,
            "remote_blocks_expiry_time": expiry,
            "transfer_mode": "pull",
            "pd_protocol_version": PD_PROTOCOL_VERSION,
            "pd_control_addr": f"{self.host}:{self.port}",
            "remote_dp_rank": self.dp_rank,
            "remote_block_size": self.block_size,
            "pd_kv_bytes": len(ids) * self.block_bytes,
        }

    def _push_request_finished(self, request: "Request", params: dict
                               ) -> tuple[bool, dict[str, Any] | None]:
        """Prefill side: keep the blocks until the worker's WRITEs drained."""
        rid = request.request_id
        out = self._push_out.pop(rid)
        if out.lookup is not None:
            out.lookup.cancel()
        status = getattr(request.status, "name", str(request.status))
        wrote = out.emitted
        if out.target is not None and not out.final_sent:
            self._push_failed(out, R_ABORTED if status not in _FINISHED_OK else "incomplete")
        if wrote:
            self._push_finished.add(rid)
        info = {"transfer_mode": "push", "remote_request_id": out.push_id,
                "pd_protocol_version": PD_PROTOCOL_VERSION,
                "pd_push": "sent" if out.final_sent else (out.error or "not_sent")}
        return wrote, info

    def note_expired_or_freed(self, rid: str) -> None:
        if self._pending.pop(rid, None) is not None:
            self._gauges_dirty = True

    def get_stats(self) -> PdConnectorStats | None:
        if not self._gauges_dirty:
            return None
        self._gauges_dirty = False
        s = PdConnectorStats()
        s.set_gauge("pending_blocks", sum(n for _, n in self._pending.values()))
        s.set_gauge("pending_reqs", len(self._pending))
        s.set_gauge("recv_inflight_blocks", sum(self._recv_blocks.values()))
        return s

    def has_pending(self) -> bool:
        return bool(self._pending)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._bg is not None:
            self._bg.shutdown(wait=False)
