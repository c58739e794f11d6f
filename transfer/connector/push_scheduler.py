"""Scheduler half, push mode (``transfer_mode: "push"`` in the request's params).

The decode side registers its block ids for the push id in its control server when
the blocks are allocated; the prefill side holds the request back (``None`` from
``get_num_new_matched_tokens``) until a background lookup found that registration,
then plans per step which of its blocks go where, and the worker WRITEs them layer by
layer during the forward (``save_kv_layer``).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import FailureReason, ParamsError
from .base_scheduler import FINISHED_OK, BaseScheduler
from .metadata import (PD_PROTOCOL_VERSION, PushRecvJob, PushSendStep, now_wall,
                       parse_push_id, parse_push_target)

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


class PushScheduler(BaseScheduler):
    """Push mode: the prefill engine WRITEs into blocks the decode engine registered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._push_out: dict[str, _PushOut] = {}  # prefill: req -> push state
        self._lookup_pool: ThreadPoolExecutor | None = None
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
            out.lookup = self._lookups().submit(self._lookup, host, port, push_id)
        if out.lookup is not None:
            if not out.lookup.done():  # never wait here: a later schedule call picks it up
                return None, False
            try:
                out.target = out.lookup.result()
                if out.target is None:
                    out.error = FailureReason.TIMEOUT
            except Exception as e:
                out.error = FailureReason.UNREACHABLE
                log.warning("PdConnector: push %s: decode control %s:%d: %s", out.push_id,
                            out.host, out.port, e)
            out.lookup = None
            t = out.target
            if t is not None and t.num_tokens != request.num_prompt_tokens:
                out.error, out.target = FailureReason.MISMATCH, None
            if t is not None and (t.block_size != self.block_size or t.tp_size != self.tp_size):
                out.error, out.target = FailureReason.MISMATCH, None
            if out.error:
                self._push_failed(out, out.error)
        return 0, False

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

    def _push_failed(self, out: _PushOut, reason: str) -> None:
        """Tell the decode side (best effort) so it recomputes now, not at its timeout."""
        log.warning("PdConnector: push %s failed (%s); the decode side recomputes",
                    out.push_id, reason)
        self.notifier.notify(out.host, out.port, getattr(out.target, "engine_id", ""),
                             f"push-fail:{out.push_id}:{reason}")

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
