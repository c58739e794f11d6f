"""Worker half, pull mode.

Decode side: for each planned request, make sure the prefill engine's workers are
known (handshake, :mod:`.base_worker`), then READ the remote blocks into the local
ones -- per layer, with byte slices inside each block when prefill and decode TP
differ (:func:`.tp_mapping.tp_read_plan`, head sizes from the cache's strides). Once
the READs are seen done, each remote rank gets the notification
``"<remote_request_id>:<expected>"``. A READ that timed out or failed is quarantined
until the engine says it can no longer write. No hook waits or spins.

Prefill side: holds finished requests' blocks until ``expected`` notifications
arrived, a ``release:`` comes through the scheduler, or the lease expires.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import FailureReason, reason_of
from .base_worker import BaseWorker, RemoteEngine, backend_of
from .control_client import grant_failure, send_read
from .metadata import PdConnectorMetadata, RecvJob, RemoteSource
from .tp_mapping import expected_notifications_cached, tp_read_plan

log = logging.getLogger("vllm.pdsidecar.connector")  # vLLM's handlers and format

#: How often a load still quarantined (READs still active) is logged.
QUARANTINE_WARN_S = 30.0


@dataclass
class _Inflight:
    job: RecvJob
    handles: list[Any]
    t0: float
    nbytes: int = 0
    descs: int = 0
    t_posted: float = 0.0  # time.monotonic() once every READ was posted
    t_done: float = 0.0  # ... when a poll saw them all done
    # time.monotonic() after which a completion no longer counts: the prefill granted
    # the read for lease_s from its answer, which came after we asked (None: no bound)
    valid_until: float | None = None
    notifs: list[tuple[str, str]] = field(default_factory=list)  # (peer, msg) once done


@dataclass
class _Quarantined:
    """A load that failed or timed out while some of its READs may still write into
    its local blocks: not reported to vLLM (which would reuse the blocks) until the
    engine confirms every handle over (done, or failed: e.g. the peer died)."""

    infl: _Inflight
    reason: str
    msg: str
    since: float = field(default_factory=time.monotonic)
    last_warn: float = field(default_factory=time.monotonic)


@dataclass
class _Sending:
    """Prefill side: blocks held for a decode; the scheduler decides the lease."""

    nblocks: int
    released: bool = False


@dataclass
class _Grant:
    """Decode side: a ``read:`` asked of the prefill engine, its answer pending."""

    job: RecvJob
    rem: RemoteEngine
    answer: Future
    t_asked: float  # time.monotonic() before the call went out


@dataclass
class _Notifs:
    count: int = 0
    expected: int = 1
    t: float = field(default_factory=time.monotonic)


class PullWorker(BaseWorker):
    """Pull mode: READ a prefill engine's leased blocks; lease our own to decodes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._inflight: dict[str, _Inflight] = {}
        self._quarantine: dict[str, _Quarantined] = {}
        self._sending: dict[str, _Sending] = {}
        self._notifs: dict[str, _Notifs] = {}
        self._grants: dict[str, _Grant] = {}
        self._grant_pool: ThreadPoolExecutor | None = None
        self._posted_this_step = False
        super().__init__(*args, **kwargs)

    def _start_pull(self, meta: PdConnectorMetadata, now: float) -> None:
        for rid, nblocks in meta.send.items():
            self._sending[rid] = _Sending(nblocks)
        for rid in meta.release:
            s = self._sending.get(rid)
            if s is not None:
                s.released = True
        for rid in meta.expired:
            s = self._sending.get(rid)
            if s is not None and not s.released:
                s.released = True
                self.stats.record_expired(s.nblocks)
                log.info("PdConnector: lease of %s expired, freeing %d blocks", rid, s.nblocks)
        for job in meta.recv.values():
            job.t_start = now
            self._start_job(job)

    def _start_job(self, job: RecvJob) -> None:
        if job.error:
            self._fail(job, job.error, job.error_msg, release=False)
            return
        src = job.src
        key = (src.host, src.port)
        rem = self._remotes.get(key)
        if rem is not None and rem.engine_id == src.engine_id:
            self._remote_ready(job, rem)
            return
        # unknown (or changed) engine at that address: (re-)handshake
        self._waiting.setdefault(key, []).append(job)
        if key not in self._hs_futures:
            self._hs_futures[key] = self._bg.submit(self._handshake, src)

    def _expected(self, remote_rank: int, remote_tp: int) -> int:
        return expected_notifications_cached(remote_rank, self.tp_size, remote_tp,
                                             self.compat["num_kv_heads"],
                                             self.compat.get("is_mla", False))

    # ------------------------------------------------------------ read grants
    def _remote_ready(self, job: RecvJob, rem: RemoteEngine) -> None:
        """The prefill engine is known: ask it for the read (``read:<id>``), off the
        engine thread; a later step posts the READs once it agreed (:meth:`_advance_grants`)."""
        src: RemoteSource = job.src
        if rem.engine_id != src.engine_id:
            self._fail(job, FailureReason.UNKNOWN_ENGINE, f"engine at {src.host}:{src.port} is "
                       f"{rem.engine_id!r}, params name {src.engine_id!r}", release=False)
            return
        if rem.tp_size != src.tp_size:
            self._fail(job, FailureReason.MISMATCH, f"tp_size {src.tp_size} != remote {rem.tp_size}")
            return
        t = time.monotonic()
        if job.granted_until is not None and t < job.granted_until:
            self._submit(job, rem, job.granted_until)  # the scheduler asked on arrival
            return
        if self._grant_pool is None:
            self._grant_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pd-grant")
        self._grants[job.req_id] = _Grant(job, rem, self._grant_pool.submit(
            send_read, src, self.engine_id, self.cfg.handshake_timeout_s), t)

    def _advance_grants(self) -> None:
        """Post the READs the prefill agreed to; fail the refused (expired) ones."""
        for rid, g in list(self._grants.items()):
            if not g.answer.done():
                continue
            del self._grants[rid]
            try:
                g.answer.result()
            except Exception as e:
                self._fail(g.job, grant_failure(e), f"read of {g.job.src.request_id!r} at "
                           f"{g.job.src.host}:{g.job.src.port}: {e}", release=False)
                continue
            lease_s = g.job.src.lease_s
            self._submit(g.job, g.rem, None if lease_s is None else g.t_asked + lease_s)

    def _submit(self, job: RecvJob, rem: RemoteEngine, valid_until: float | None = None) -> None:
        """Post the READs of ``job`` (the prefill holds its blocks until ``valid_until``)."""
        src: RemoteSource = job.src
        plan = tp_read_plan(self.tp_rank, self.tp_size, rem.tp_size,
                            self.compat["num_kv_heads"], self.compat.get("is_mla", False),
                            bytes_per_head=self.bytes_per_head)
        t0 = time.perf_counter()
        infl = _Inflight(job, [], t0, valid_until=valid_until)
        try:
            by_rank: dict[int, list[Any]] = {}
            for s in plan.slices:
                by_rank.setdefault(s.remote_rank, []).append(s)
            for p, slices in by_rank.items():
                peer = rem.peers[p]
                # the completion notification goes out once we saw the READs done,
                # not attached to them: a READ without one completes inside its post
                # (CMA/shared memory), one with it waits for a UCX flush, i.e. for
                # the progress thread, and is only seen a step later
                infl.notifs.append((peer, f"{src.request_id}:{self._expected(p, rem.tp_size)}"))
                for s in slices:
                    whole = s.num_heads == self.heads_local and s.remote_offset == 0 and \
                        s.local_offset == 0 and rem.tp_size == self.tp_size
                    kw = {} if whole else {"local_slice": (s.local_offset, s.length),
                                           "remote_slice": (s.remote_offset, s.length)}
                    h = self.engine.read_blocks(peer, job.local_ids, job.remote_ids,
                                                request_id=job.req_id, **kw)
                    infl.handles.append(h)
                    infl.nbytes += h.stats.bytes
                    infl.descs += h.stats.descriptors
            for p in plan.notify_only:
                self.engine.send_notif(rem.peers[p], f"{src.request_id}:"
                                                     f"{self._expected(p, rem.tp_size)}")
        except Exception as e:
            reason = FailureReason.BLOCK_RANGE if reason_of(e) == FailureReason.BLOCK_RANGE \
                else FailureReason.TRANSFER
            if infl.handles:  # some READs of this request were posted: may still write
                self._quarantine_load(infl, reason, str(e))
            else:
                self._fail(job, reason, str(e))
            return
        infl.t_posted = time.monotonic()
        self._inflight[job.req_id] = infl
        self._posted_this_step = True
        if all(h.done for h in infl.handles):  # completed inside the post
            self._poll_inflight(only=job.req_id)

    def _send_done_notifs(self, infl: _Inflight) -> None:
        """Tell the prefill ranks the READs are done (they free the blocks)."""
        for peer, msg in infl.notifs:
            try:
                self.engine.send_notif(peer, msg)
            except Exception as e:  # its lease (or a Release) frees the blocks then
                log.warning("PdConnector: completion notification %s failed: %s", msg, e)

    def _poll_inflight(self, only: str | None = None) -> None:
        now = time.perf_counter()
        items = [(only, self._inflight[only])] if only else list(self._inflight.items())
        for rid, infl in items:
            try:
                done = all([self.engine.poll(h) for h in infl.handles])
            except Exception as e:
                del self._inflight[rid]
                self._quarantine_load(infl, FailureReason.TRANSFER, str(e))
                continue
            late = infl.valid_until is not None and time.monotonic() > infl.valid_until
            if done:
                del self._inflight[rid]
                self._send_done_notifs(infl)
                if late:  # the prefill may have freed and reused the blocks while we read
                    self._fail(infl.job, FailureReason.EXPIRED,
                               "READ completed after the read grant ended")
                    continue
                # post -> completion seen: the span stock NixlConnector reports (NIXL's
                # xferDuration); the prepare before it is in stages_ms["prepare"]
                secs = max(h.stats.in_engine_us for h in infl.handles) / 1e6 \
                    if infl.handles else now - infl.t0
                self.stats.record_transfer(infl.nbytes, secs, infl.descs)
                self._done_recv.add(rid)
                infl.t_done = time.monotonic()
                self._results[rid] = {"bytes": infl.nbytes, "descriptors": infl.descs,
                                      "blocks": len(infl.job.local_ids),
                                      "ms": round(secs * 1e3, 4), "seconds": secs,
                                      "backend": backend_of(infl.handles, self.engine),
                                      "error": "", "stages_ms": _stages(infl)}
            elif now - infl.t0 > self.cfg.transfer_timeout_s or late:
                del self._inflight[rid]
                for h in infl.handles:
                    try:
                        self.engine._on_timeout(h)
                    except Exception:
                        pass
                self._quarantine_load(infl, FailureReason.TIMEOUT, f"READ not done after "
                                      f"{now - infl.t0:.3f} s")

    def _quarantine_load(self, infl: _Inflight, reason: str, msg: str) -> None:
        """Fail ``infl`` once none of its READs can write any more (see _Quarantined)."""
        self._quarantine[infl.job.req_id] = _Quarantined(infl, reason, msg)
        self._poll_quarantine()

    def _busy_peers(self) -> set[str]:
        return {h.stats.peer for infl in [*self._inflight.values(),
                                         *(q.infl for q in self._quarantine.values())]
                for h in infl.handles}

    def _poll_quarantine(self) -> None:
        for rid, q in list(self._quarantine.items()):
            pending = []
            for h in q.infl.handles:
                try:
                    if not self.engine.released(h):
                        pending.append(h)
                except Exception:
                    pending.append(h)
            if not pending:
                del self._quarantine[rid]
                self._fail(q.infl.job, q.reason, q.msg)
                continue
            now = time.monotonic()
            if now - q.last_warn > QUARANTINE_WARN_S:
                # never forgotten: neither releasing nor disconnecting the peer stops
                # a NIXL transfer (measured), only its end does (or the peer dying)
                q.last_warn = now
                log.warning("PdConnector: load of %s still quarantined after %.0f s: %d "
                            "transfer(s) with %s still active", rid, now - q.since,
                            len(pending), sorted({h.stats.peer for h in pending}))

    def _on_read_done(self, rid: str, expected: int) -> None:
        st = self._notifs.setdefault(rid, _Notifs())
        st.count += 1
        st.expected = expected

    def _poll_sending(self) -> set[str]:
        """Prefill side: requests whose blocks may be freed (read, released, expired)."""
        out: set[str] = set()
        for rid, s in list(self._sending.items()):
            st = self._notifs.get(rid)
            if (st is not None and st.count >= st.expected) or s.released:
                out.add(rid)
        for rid in out:
            del self._sending[rid]
            self._notifs.pop(rid, None)
        if len(self._notifs) > len(self._sending):  # stray notifs (expired, unknown)
            cut = time.monotonic() - 2 * self.cfg.kv_lease_s
            for rid in [r for r, st in self._notifs.items()
                        if r not in self._sending and st.t < cut]:
                del self._notifs[rid]
        return out

    def shutdown(self) -> None:
        if self._grant_pool is not None:
            self._grant_pool.shutdown(wait=False, cancel_futures=True)
        super().shutdown()

    def _poll_pull(self) -> None:
        """Decode side, every step: read grants, quarantined and in-flight loads,
        retired peers."""
        if self._grants:
            self._advance_grants()
        if self._quarantine:
            self._poll_quarantine()
        if self._retired:
            self._retire_idle_peers()
        if self._inflight:
            self._poll_inflight()
            if self._inflight and self._posted_this_step and self.cfg.spin_wait_us > 0:
                # a fresh READ usually completes within microseconds: report it this
                # step instead of next
                deadline = time.perf_counter() + self.cfg.spin_wait_us / 1e6
                while self._inflight and time.perf_counter() < deadline:
                    self._poll_inflight()
        self._posted_this_step = False


def _stages(infl: _Inflight) -> dict[str, float]:
    """Milliseconds between the stages of one pull load (all ``time.monotonic()``):
    scheduler allocation -> step metadata -> worker ``start_load_kv`` -> READs posted
    -> completion seen by a poll (-> reported, added when returned to vLLM)."""
    j = infl.job

    def ms(a: float, b: float) -> float:
        return round((b - a) * 1e3, 3) if a and b else -1.0
    return {"alloc_to_meta": ms(j.t_alloc, j.t_meta), "meta_to_start": ms(j.t_meta, j.t_start),
            "start_to_posted": ms(j.t_start, infl.t_posted),
            "posted_to_done_seen": ms(infl.t_posted, infl.t_done),
            "nixl_submit_to_done_seen": round(max((h.stats.transfer_us for h in infl.handles),
                                                  default=0.0) / 1e3, 3),
            # submit = prepare (id checks, index arrays, make_prepped_xfer) + post;
            # post -> done seen is what pd_connector_transfer_seconds records
            "prepare": round(sum(h.stats.prepare_us for h in infl.handles) / 1e3, 3),
            "post": round(sum(h.stats.post_us for h in infl.handles) / 1e3, 3),
            "post_cpu": round(sum(h.stats.post_cpu_us for h in infl.handles) / 1e3, 3),
            "post_preempted": sum(h.stats.post_preempted for h in infl.handles),
            "post_to_done_seen": round(max((h.stats.xfer_us for h in infl.handles),
                                           default=0.0) / 1e3, 3),
            # NIXL's own span (telemetry), what pd_connector_transfer_seconds records
            "nixl_xfer": round(max((h.stats.nixl_xfer_us for h in infl.handles),
                                   default=0.0) / 1e3, 3),
            # CUDA IPC: the copies' time on the device (start -> end event), -1 elsewhere
            "device_copy": round(max((h.stats.device_us for h in infl.handles
                                      if h.stats.device_us > 0), default=-1e3) / 1e3, 3),
            "_t_done": infl.t_done}
