"""Worker half, push mode.

Prefill side: WRITE each layer's blocks of the step's push requests from
``save_kv_layer`` (so only the last layer is outstanding when the forward ends) and,
once every WRITE of a request's last chunk completed, send the decode worker
``push:<push id>:<bytes>:<µs>:<tail µs>`` (or ``push-fail:<push id>:<reason>``) over
the engine, or over the control plane when there is no engine path to it.

A WRITE starts only while the step's ``valid_until`` (time the scheduler asked the
decode's write grant + the write lease, this host's monotonic clock) has not passed.

Decode side: turn that notification into finished (or failed) receiving; the decode
scheduler decides when a push that does not come is over (its write holds,
:mod:`.push_grant`) and says so in the step's ``push_fail``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import FailureReason
from .base_worker import BaseWorker
from .metadata import PdConnectorMetadata, PushRecvJob, PushSendStep, RecvJob

log = logging.getLogger("vllm.pdsidecar.connector")  # vLLM's handlers and format

_FAIL_MSG = {FailureReason.TIMEOUT: "no push within push_wait_s",
             FailureReason.ABORTED: "the request was aborted before its push arrived"}


@dataclass
class _PushWrites:
    """Prefill side: WRITEs of one push request (all its chunks)."""

    step: PushSendStep  # the latest step (peer address, ids of this step)
    handles: list[Any] = field(default_factory=list)
    nbytes: int = 0
    t0: float = field(default_factory=time.perf_counter)
    final: bool = False
    t_final: float = 0.0  # when the last chunk's forward ended
    error: str = ""
    finished: bool = False  # the scheduler let the request go
    notified: bool = False
    # layers saved while the decode peer's handshake was still in flight:
    # (local ids, remote ids, layer), posted once it completes (never inside a forward wait)
    deferred: list[tuple[list[int], list[int], int]] = field(default_factory=list)


class PushWorker(BaseWorker):
    """Push mode: WRITE our prompt's blocks into a decode engine's registered blocks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._push_waiting: dict[str, PushRecvJob] = {}  # decode: push id -> job
        self._push_step: list[PushSendStep] = []  # prefill: this step's WRITE plans
        self._push_writes: dict[str, _PushWrites] = {}  # prefill: req -> WRITEs
        self._prepared_meta: Any = None
        super().__init__(*args, **kwargs)

    def _start_push(self, meta: PdConnectorMetadata) -> None:
        for job in meta.push_recv.values():
            self._push_waiting[job.push_id] = job
        for push_id, reason in meta.push_fail.items():
            job = self._push_waiting.pop(push_id, None)
            if job is not None:
                self._fail_push(job, reason, _FAIL_MSG.get(reason, "the prefill engine could not push"))
        for rid in meta.push_finished:
            w = self._push_writes.get(rid)
            if w is not None:
                w.finished = True
        self._prepare_push_step(meta)

    def _prepare_push_step(self, meta: PdConnectorMetadata) -> None:
        """Adopt this step's WRITE plans (once per step's metadata).

        vLLM calls ``start_load_kv`` *after* the forward when a step has no
        synchronous loads, so the first ``save_kv_layer`` of a step prepares too.
        """
        if self._prepared_meta is meta:
            return
        self._prepared_meta = meta
        self._push_step = list(meta.push_send.values())
        for st in self._push_step:
            w = self._push_writes.get(st.req_id)
            if w is None:
                w = self._push_writes[st.req_id] = _PushWrites(st)
            w.step = st
            key = (st.host, st.port)
            rem = self._remotes.get(key)
            if (rem is None or rem.engine_id != st.engine_id) and key not in self._hs_futures:
                self._hs_futures[key] = self._bg.submit(self._handshake, st)

    def _push_peer(self, w: _PushWrites) -> str | None:
        """The decode rank to WRITE to, or None: handshake still in flight (``w.error``
        empty: try again later) or impossible (``w.error`` set). Never waits."""
        st = w.step
        key = (st.host, st.port)
        if key in self._hs_futures:
            self._advance_handshakes()
            if key in self._hs_futures:
                return None
        rem = self._remotes.get(key)
        if rem is None or rem.engine_id != st.engine_id:
            w.error = w.error or FailureReason.UNREACHABLE
            return None
        if rem.tp_size != self.tp_size:
            w.error = w.error or FailureReason.MISMATCH
            return None
        return rem.peers.get(self.tp_rank)

    def _post_write(self, w: _PushWrites, peer: str, local_ids: list[int],
                    remote_ids: list[int], layers: list[int]) -> None:
        try:
            h = self.engine.write_blocks(peer, local_ids, remote_ids, layers=layers,
                                         request_id=w.step.req_id)
        except Exception as e:
            log.warning("PdConnector: push WRITE of %s failed: %s", w.step.req_id, e)
            w.error = FailureReason.TRANSFER
            return
        w.handles.append(h)
        w.nbytes += h.stats.bytes

    def _flush_deferred(self, w: _PushWrites) -> None:
        """Post the WRITEs of layers saved before the handshake completed."""
        if not w.deferred or w.error:
            w.deferred.clear()
            return
        peer = self._push_peer(w)
        if peer is None:
            if w.error:
                w.deferred.clear()
            return
        if self.clock() > w.step.valid_until:  # the write grant is over
            w.error = FailureReason.EXPIRED
            w.deferred.clear()
            return
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        for lids, rids, layer in w.deferred:
            groups.setdefault((tuple(lids), tuple(rids)), []).append(layer)
        w.deferred.clear()
        for (lids, rids), layers in groups.items():
            if not w.error:
                self._post_write(w, peer, list(lids), list(rids), layers)

    def save_layer(self, layer_name: str, meta: PdConnectorMetadata | None) -> None:
        """Post this layer's WRITEs for every push request of the step."""
        if meta is not None and meta.push_send:
            self._prepare_push_step(meta)
        if not self._push_step:
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        now = self.clock()
        for st in self._push_step:
            w = self._push_writes[st.req_id]
            if w.error or not st.local_ids:
                continue
            if now > st.valid_until:  # the write grant is over: the decode may give up
                w.error = FailureReason.EXPIRED
                continue
            peer = None if w.deferred else self._push_peer(w)
            if peer is None:
                if not w.error:  # handshake in flight: WRITE this layer once it is done
                    w.deferred.append((st.local_ids, st.remote_ids, layer))
                continue
            self._post_write(w, peer, st.local_ids, st.remote_ids, [layer])

    def end_step(self, meta: PdConnectorMetadata | None) -> None:
        """``wait_for_save``: the forward is over; last chunks may now be reported."""
        if meta is not None and meta.push_send:
            self._prepare_push_step(meta)
        for st in self._push_step:
            w = self._push_writes.get(st.req_id)
            if w is not None and st.final:
                w.final = True
                w.t_final = time.perf_counter()
        self._push_step = []

    def _poll_push_writes(self) -> set[str]:
        """Prefill side: notify finished pushes; requests whose blocks may be freed."""
        freed: set[str] = set()
        for rid, w in list(self._push_writes.items()):
            if w.deferred:
                self._flush_deferred(w)
            pending = bool(w.deferred)
            for h in w.handles:
                try:
                    if not self.engine.poll(h):
                        pending = True
                except Exception:
                    w.error = w.error or FailureReason.TRANSFER
                    # a failed WRITE may still be landing in the decode blocks: the
                    # push-fail (after which the decode side recomputes into them)
                    # waits until the engine says it is over
                    if not self.engine.released(h):
                        pending = True
            if pending:
                continue
            if (w.final or w.error or w.finished) and not w.notified:
                self._notify_push(w)
            if w.finished and w.notified:
                freed.add(rid)
                del self._push_writes[rid]
        return freed

    def _notify_push(self, w: _PushWrites) -> None:
        st = w.step
        peer = self._push_peer(w)
        if peer is None and not w.error:
            return  # handshake still in flight: notify on a later step
        w.notified = True
        now = time.perf_counter()
        us, tail_us = (now - w.t0) * 1e6, (now - w.t_final) * 1e6 if w.t_final else 0.0
        ok = w.final and not w.error
        msg = (f"push:{st.push_id}:{w.nbytes}:{us:.0f}:{tail_us:.0f}" if ok else
               f"push-fail:{st.push_id}:{w.error or 'incomplete'}")
        if peer is None:
            # no NIXL path to the decode side: tell its control plane, so it recomputes
            # now instead of at its push_wait_s timeout
            self.notifier.notify(st.host, st.port, st.engine_id, msg)
            return
        try:
            self.engine.send_notif(peer, msg)
        except Exception as e:
            log.warning("PdConnector: push notification for %s failed: %s", st.req_id, e)
            self.notifier.notify(st.host, st.port, st.engine_id,
                                 f"push-fail:{st.push_id}:{w.error or FailureReason.TRANSFER}")

    def _on_push_notif(self, msg: str) -> None:
        """Decode side: ``push:<id>:<bytes>:<window µs>:<tail µs>`` or
        ``push-fail:<id>:<reason>``. The window runs from the first WRITE to the last
        completion; the tail from the end of the prefill forward to it."""
        kind, _, rest = msg.partition(":")
        push_id, _, tail = rest.partition(":")
        job = self._push_waiting.pop(push_id, None)
        if job is None:
            return
        if kind == "push-fail":
            self._fail_push(job, tail or FailureReason.TRANSFER, "the prefill engine reported a failed push")
            return
        try:
            nbytes, us, tail_us = (int(float(x)) for x in (tail.split(":") + ["0", "0"])[:3])
        except ValueError:
            nbytes, us, tail_us = 0, 0, 0
        # counted where the KV lands, as in pull mode (the decode engine's metrics)
        self.stats.record_transfer(nbytes, tail_us / 1e6, 0)
        self._done_recv.add(job.req_id)
        self._results[job.req_id] = {"bytes": nbytes, "descriptors": 0, "blocks": job.num_blocks,
                                     "ms": round(tail_us / 1e3, 4), "seconds": tail_us / 1e6,
                                     "window_ms": round(us / 1e3, 4),
                                     "backend": self.engine.backend, "mode": "push",
                                     "error": ""}

    def _fail_push(self, job: PushRecvJob, reason: str, msg: str) -> None:
        # reasons may come from the remote side: keep the metric label set bounded
        known = FailureReason.parse(reason)
        if known != reason:
            msg = f"{msg} ({reason[:40]})"
        self._fail(RecvJob(job.req_id, None, [], []), known, msg, release=False)
