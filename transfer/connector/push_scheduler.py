"""Scheduler half, push mode (``transfer_mode: "push"`` in the request's params).

The decode side registers its block ids for the push id in its control server when
the blocks are allocated and holds them on its monotonic clock (:mod:`.push_grant`);
the prefill side holds the request back (``None`` from ``get_num_new_matched_tokens``)
until a background lookup found that registration and the decode granted ``write:``,
then plans per step which of its blocks go where (within the write lease, renewed in
the background), and the worker WRITEs them layer by layer during the forward
(``save_kv_layer``). No wall-clock time crosses hosts.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import FailureReason, ParamsError
from .base_scheduler import FINISHED_OK, BaseScheduler
from .control_client import grant_failure
from .metadata import (PD_PROTOCOL_VERSION, PushRecvJob, PushSendStep, parse_push_id,
                       parse_push_target)
from .push_grant import RENEW_LEFT, WriteHolds

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.pdsidecar.connector")

_LOOKUP_RPC_WAIT_S = 0.5  # push lookup: longest a PushTarget RPC holds a server thread


@dataclass
class _PushOut:
    """Prefill side: one push request's destination and progress."""

    push_id: str
    host: str
    port: int
    lookup: Future | None = None
    target: object | None = None  # transfer.control_messages.PushTarget once found
    error: str = ""
    block_ids: list[int] = field(default_factory=list)  # our blocks, in prompt order
    computed: int = 0  # prompt tokens computed before the current step
    written: int = 0  # prompt blocks already planned for WRITE
    emitted: bool = False  # the worker got at least one step (it tracks the request)
    final_sent: bool = False
    # the write grant (this scheduler's clock): WRITEs may start until valid_until
    valid_until: float = -math.inf
    t_asked: float = 0.0  # when the pending renewal was asked
    grant: Future | None = None  # pending renewal (write:) on the notifier's threads


class PushScheduler(BaseScheduler):
    """Push mode: the prefill engine WRITEs into blocks the decode engine registered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._push_out: dict[str, _PushOut] = {}  # prefill: req -> push state
        self._lookup_pool: ThreadPoolExecutor | None = None
        cfg = args[0] if args else kwargs["cfg"]
        # decode: registered pushes held for write grants; a WRITE posted at the end of
        # a grant has transfer_timeout_s to land; a finished push is refused for push_wait_s
        self._holds = WriteHolds(cfg.push_write_lease_s, cfg.transfer_timeout_s,
                                 cfg.push_wait_s)
        super().__init__(*args, **kwargs)

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
            out.lookup = self._lookups().submit(self._find_target, host, port, push_id,
                                                request.num_prompt_tokens)
        if out.lookup is not None:
            if not out.lookup.done():  # never wait here: a later schedule call picks it up
                return None, False
            try:
                out.target, asked, out.error = out.lookup.result()
                if not out.error:
                    out.valid_until = asked + out.target.write_lease_s
            except Exception as e:
                out.error = grant_failure(e)
                log.warning("PdConnector: push %s: decode control %s:%d: %s", out.push_id,
                            out.host, out.port, e)
            out.lookup = None
            if out.error:
                self._push_stopped(out, out.error)
        return 0, False

    def _find_target(self, host: str, port: int, push_id: str, num_tokens: int
                     ) -> tuple[Any, float, str]:
        """Lookup pool: ``(registration, time asked for the write grant, error)``.
        Raises :class:`~transfer.errors.PeerRefused` (``expired``) when the decode
        refuses the grant (it no longer waits for this push)."""
        t = self._lookup(host, port, push_id)
        if t is None:
            return None, 0.0, FailureReason.TIMEOUT
        if t.num_tokens != num_tokens or t.block_size != self.block_size \
                or t.tp_size != self.tp_size or not t.write_lease_s > 0:
            return t, 0.0, FailureReason.MISMATCH  # (lease 0: a decode granting no writes)
        asked = self.clock()  # before the ask: our window closes before its hold ends
        self._ask_write(host, port, t.engine_id, push_id)
        return t, asked, ""

    def _ask_write(self, host: str, port: int, engine_id: str, push_id: str) -> None:
        """``write:<push id>`` to the decode's control plane (raises when refused)."""
        from .control_client import send_notify
        send_notify(host, port, self.engine_id, engine_id, f"write:{push_id}",
                    self.cfg.handshake_timeout_s)

    def _lookup(self, host: str, port: int, push_id: str) -> object | None:
        """The decode side's registration of ``push_id`` (None: not there in
        ``push_lookup_s``). Asked in short RPCs, so no call holds one of the decode
        control server's threads for long."""
        from .control_client import control_client
        client = control_client(host, port, self.cfg.handshake_timeout_s)
        deadline = time.monotonic() + self.cfg.push_lookup_s
        while True:
            left = deadline - time.monotonic()
            wait = max(0.0, min(left, _LOOKUP_RPC_WAIT_S))
            t = client.push_target(push_id, wait_s=wait, timeout_s=self.cfg.handshake_timeout_s)
            if t is not None or left <= _LOOKUP_RPC_WAIT_S:
                return t

    def _push_stopped(self, out: _PushOut, reason: str) -> None:
        """No more WRITEs planned for ``out``."""
        out.error = out.error or reason
        self._push_failed(out, reason)
        out.target = None
        if out.grant is not None:
            out.grant.cancel()
            out.grant = None

    def _push_failed(self, out: _PushOut, reason: str) -> None:
        """Tell the decode side so it recomputes now, not at its timeout: here when no
        WRITE was planned yet; else the worker tells it once its WRITEs are over (the
        decode gives the blocks back on that message, so none may still be landing)."""
        log.warning("PdConnector: push %s failed (%s); the decode side recomputes",
                    out.push_id, reason)
        if not out.emitted:
            self.notifier.notify(out.host, out.port, getattr(out.target, "engine_id", ""),
                                 f"push-fail:{out.push_id}:{reason}")

    def _advance_write_grant(self, out: _PushOut, now: float) -> None:
        """Prefill: take a renewal's answer; renew once less than half the write lease
        is left (on the notifier's threads; a later step sees the answer)."""
        lease = out.target.write_lease_s
        if out.grant is not None and out.grant.done():
            fut, out.grant = out.grant, None
            try:
                fut.result()
            except Exception as e:
                self._push_stopped(out, grant_failure(e))
                return
            out.valid_until = max(out.valid_until, out.t_asked + lease)
        if now > out.valid_until:
            self._push_stopped(out, FailureReason.EXPIRED)
            return
        if out.grant is None and out.valid_until - now < RENEW_LEFT * lease:
            out.t_asked = now
            out.grant = self.notifier.executor().submit(
                self._ask_write, out.host, out.port, out.target.engine_id, out.push_id)

    def _lookups(self) -> ThreadPoolExecutor:
        """Long-held push lookups (up to ``push_lookup_s`` each), apart from the
        notifier's pool so they never delay a release or a push-fail notification."""
        if self._lookup_pool is None:
            self._lookup_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pd-lookup")
        return self._lookup_pool

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
                    self._push_stopped(out, "preempted")
                new = cached.new_block_ids[i]
                if new:
                    out.block_ids.extend(new[0])
                out.computed = cached.num_computed_tokens[i]
        steps: dict[str, PushSendStep] = {}
        sched = scheduler_output.num_scheduled_tokens
        now = self.clock()
        for rid, out in self._push_out.items():
            if out.target is not None and not out.final_sent:
                self._advance_write_grant(out, now)
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
                remote_ids=[t.block_ids[k - first] for k in ks], final=final,
                valid_until=out.valid_until)
            out.final_sent = final
            out.emitted = True
        return steps

    def _register_push(self, request: "Request", params: dict, blocks: Any,
                       num_external_tokens: int) -> None:
        """Decode side of push mode: publish our block ids for the push id."""
        from ..control_messages import PushTarget
        rid = request.request_id
        try:
            push_id = parse_push_id(params)
        except ParamsError as e:
            self._reject_load(request, blocks, num_external_tokens, None, e.reason, str(e))
            return
        need = math.ceil(request.num_prompt_tokens / self.block_size)
        local_ids = [b.block_id for b in blocks.blocks[0]] if num_external_tokens else []
        hit = min(need, (request.num_prompt_tokens - num_external_tokens) // self.block_size) \
            if num_external_tokens else need
        target = PushTarget(engine_id=self.engine_id, dp_rank=self.dp_rank, tp_size=self.tp_size,
                            block_size=self.block_size, num_tokens=request.num_prompt_tokens,
                            first_block=hit, block_ids=local_ids[hit:need],
                            write_lease_s=self.cfg.push_write_lease_s, request_id=rid)
        if num_external_tokens > 0:  # held (write grants) before anyone can look it up
            self._holds.open(push_id, rid, self.clock(), self.cfg.push_wait_s)
        if self._server is not None:
            self._server.push_targets.register(push_id, target)
        if num_external_tokens > 0:
            self._push_ids[rid] = push_id
            self._push_recv[rid] = PushRecvJob(rid, push_id, need - hit,
                                               local_ids=local_ids[hit:need])
            self._recv_blocks[rid] = need - hit
            self._gauges_dirty = True

    # ------------------------------------------------------------ decode: write holds
    def _on_push_notify(self, kind: str, arg: str) -> None:
        """Control-server thread: ``write:<push id>`` (granted, or refused with
        ``expired``) or ``push-fail:<push id>:<reason>`` from the prefill engine."""
        if kind == "write":
            self._holds.grant(arg, self.clock())
            return
        push_id, _, reason = arg.partition(":")
        if self._holds.failed_by_peer(push_id, self.clock()):
            with self._lock:
                self._push_fail_in[push_id] = reason or FailureReason.TRANSFER

    def _sweep_push_holds(self) -> dict[str, str]:
        """Pushes whose wait is over and whose granted WRITEs can no longer land
        (failed in this step); registrations of pushes long over are forgotten."""
        fail, dropped = self._holds.sweep(self.clock())
        if self._server is not None:
            for push_id in dropped:
                self._server.push_targets.drop(push_id)
        return fail

    def _push_load_ended(self, push_id: str) -> None:
        """The workers reported the load (done or failed): a late ``write:`` is refused;
        the registration stays, without its block ids, until the hold is forgotten."""
        self._holds.end(push_id, self.clock())
        if self._server is not None:
            t = self._server.push_targets.get(push_id)
            if t is not None:
                self._server.push_targets.register(push_id, replace(t, block_ids=[]))

    def _push_decode_finished(self, rid: str) -> None:
        """A decode request finished before its push arrived (aborted): no more grants;
        the load fails once no granted WRITE can land (vLLM keeps the blocks till then)."""
        push_id = self._push_ids.get(rid)
        if push_id is not None:
            self._holds.close(push_id, self.clock(), FailureReason.ABORTED)

    def _push_grant_counts(self) -> tuple[int, int]:
        return self._holds.take_counts()

    def _push_request_finished(self, request: "Request", params: dict
                               ) -> tuple[bool, dict[str, Any] | None]:
        """Prefill side: keep the blocks until the worker's WRITEs drained."""
        rid = request.request_id
        out = self._push_out.pop(rid)
        for fut in (out.lookup, out.grant):
            if fut is not None:
                fut.cancel()
        status = getattr(request.status, "name", str(request.status))
        wrote = out.emitted
        if out.target is not None and not out.final_sent:
            self._push_failed(out, FailureReason.ABORTED if status not in FINISHED_OK else "incomplete")
        if wrote:
            self._push_finished.add(rid)
        info = {"transfer_mode": "push", "remote_request_id": out.push_id,
                "pd_protocol_version": PD_PROTOCOL_VERSION,
                "pd_push": "sent" if out.final_sent else (out.error or "not_sent")}
        return wrote, info

    def shutdown(self) -> None:
        super().shutdown()
        if self._lookup_pool is not None:
            self._lookup_pool.shutdown(wait=False, cancel_futures=True)
