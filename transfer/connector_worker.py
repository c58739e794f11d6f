"""Worker half of the PdConnector (one per TP rank), on ``transfer.TransferEngine``.

Decode side (pull): for each planned request, make sure the prefill engine's
workers are known (lazy gRPC handshake to its control server, in a background
thread), then READ the remote blocks into the local ones -- per layer, with byte
slices inside each block when prefill and decode TP differ
(``transfer.layout.tp_read_plan``, head sizes from the cache's strides). Once the READs
are seen done, each remote rank gets the notification
``"<remote_request_id>:<expected>"``; the prefill worker frees the request's blocks
once ``expected`` notifications arrived. A READ that timed out or failed is quarantined
until the engine says it can no longer write. No hook waits or spins.

Prefill side: holds finished requests' blocks until the notifications arrive, a
``Release`` comes through the scheduler, or the lease expires.

Push mode: the prefill worker WRITEs each layer's blocks of the step's push
requests from ``save_kv_layer`` (so only the last layer is outstanding when the
forward ends) and, once every WRITE of a request's last chunk completed, sends the
decode worker ``push:<push id>:<bytes>:<µs>`` (or ``push-fail:<push id>:<reason>``)
over NIXL. The decode worker turns that into finished (or failed) receiving.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .connector_meta import (REASONS, R_BLOCK_RANGE, R_EXPIRED, R_MISMATCH,
                             R_TIMEOUT, R_TRANSFER, R_UNKNOWN_ENGINE, R_UNREACHABLE,
                             PdConfig, PdConnectorMetadata, PdWorkerMeta, PushRecvJob,
                             PushSendStep, RecvJob, RemoteSource)
from .connector_stats import PdConnectorStats
from .amx import request_amx_tile_permission

log = logging.getLogger("vllm.pdsidecar.connector")  # vLLM's handlers and format

#: How often a load still quarantined (READs still active) is logged.
QUARANTINE_WARN_S = 30.0


class PeerRefused(ValueError):
    """A handshake answer this worker cannot use; ``reason`` is a failure label."""

    def __init__(self, reason: str, msg: str) -> None:
        self.reason = reason
        super().__init__(msg)


@dataclass
class _RemoteEngine:
    engine_id: str
    tp_size: int
    peers: dict[int, str]  # remote tp rank -> peer name in our TransferEngine


@dataclass
class _Inflight:
    job: RecvJob
    handles: list[Any]
    t0: float
    nbytes: int = 0
    descs: int = 0
    t_posted: float = 0.0  # time.monotonic() once every READ was posted
    t_done: float = 0.0  # ... when a poll saw them all done
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
    deadline: float  # time.monotonic() of this host: a wall-clock step cannot move it
    nblocks: int
    released: bool = False


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


@dataclass
class _Notifs:
    count: int = 0
    expected: int = 1
    t: float = field(default_factory=time.monotonic)


def _backend_of(handles: list[Any], engine: Any) -> str:
    """The backend that moved a request (``ipc``/``nixl``; the routing engine tags
    each handle with the engine it chose)."""
    for h in handles:
        b = getattr(h.extra, "backend", None)
        if isinstance(b, str):
            return b
    return engine.backend


class PdConnectorWorker:
    def __init__(self, cfg: PdConfig, *, engine_id: str, tp_rank: int, tp_size: int,
                 compat: dict[str, Any], dp_rank: int = 0) -> None:
        # This runs in the worker process, which runs the attention kernels: without
        # the permission, vLLM's AMX attention on a 1-token step over loaded KV is a
        # SIGILL (transfer/amx.py). A no-op without `amx_tile`; never raises.
        request_amx_tile_permission()
        self.dp_rank = dp_rank
        self.desc: Any = None
        self.cfg = cfg
        self.engine_id = engine_id
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.compat = dict(compat)
        self.engine: Any = None
        self.regions: list[Any] = []
        self.heads_local = 1
        self.bytes_per_head = 0
        self._cache_strides: tuple[int, ...] = ()
        self.stats = PdConnectorStats()
        self._remotes: dict[tuple[str, int], _RemoteEngine] = {}
        self._hs_futures: dict[tuple[str, int], Future] = {}
        self._waiting: dict[tuple[str, int], list[RecvJob]] = {}
        self._inflight: dict[str, _Inflight] = {}
        self._quarantine: dict[str, _Quarantined] = {}
        self._retired: set[str] = set()  # peers to remove once no transfer uses them
        self._done_recv: set[str] = set()
        self._failed_recv: set[str] = set()
        self._results: dict[str, dict[str, Any]] = {}
        self._sending: dict[str, _Sending] = {}
        self._notifs: dict[str, _Notifs] = {}
        self._posted_this_step = False
        self._bg = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pd-hs")
        self._expected_cache: dict[tuple[int, int, int], int] = {}
        self._layer_index: dict[str, int] = {}
        self._push_waiting: dict[str, PushRecvJob] = {}  # decode: push id -> job
        self._push_step: list[PushSendStep] = []  # prefill: this step's WRITE plans
        self._push_writes: dict[str, _PushWrites] = {}  # prefill: req -> WRITEs
        self._prepared_meta: Any = None
        from .connector_control import configure_auth
        configure_auth(cfg.control_token, cfg.control_tls)

    # ------------------------------------------------------------ registration
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        from .control import RankDescriptor
        from .layout import head_slice_bytes, heads_per_rank
        from .select import create_engine
        name = f"pd-{self.engine_id}-tp{self.tp_rank}-{uuid.uuid4().hex[:8]}"
        first = next(iter(kv_caches.values()))
        device = str(getattr(first, "device", "cpu"))
        self.engine = create_engine(self.cfg.protocol, name, device=device,
                                    backends=tuple(self.cfg.backends),
                                    progress_delay_us=self.cfg.nixl_progress_delay_us)
        self.regions = self.engine.register_kv_caches(kv_caches)
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        self._cache_strides = tuple(first.stride())
        c = self.compat
        self.heads_local = heads_per_rank(c["num_kv_heads"], self.tp_size, c.get("is_mla", False))
        # 0: a head is not one byte range of a block (token-major layout): no
        # heterogeneous TP with this cache (refused when such a peer handshakes)
        self.bytes_per_head = head_slice_bytes(first, self.heads_local)
        self.desc = RankDescriptor(
            engine_id=self.engine_id, peer=self.engine.local_info(), model_name=c["model"],
            dtype=c["dtype"], block_size=c["block_size"], kv_layout=c.get("kv_layout", "HND"),
            num_layers=len({r.layer for r in self.regions}), num_kv_heads=c["num_kv_heads"],
            head_size=c["head_size"], is_mla=c.get("is_mla", False), dp_rank=self.dp_rank,
            tp_rank=self.tp_rank, tp_size=self.tp_size)
        log.info("PdConnector worker %s (%s): %d regions, %d blocks, %d B/block/layer",
                 name, self.engine.backend, len(self.regions), self.regions[0].num_blocks,
                 self.regions[0].block_len)

    # ------------------------------------------------------------ per step
    def start_load_kv(self, meta: PdConnectorMetadata | None) -> None:
        if meta is not None:
            now = time.monotonic()
            for rid, (expiry, nblocks) in meta.send.items():
                # the scheduler stamped the lease end on this host's wall clock;
                # from here on it is kept on the monotonic clock
                self._sending[rid] = _Sending(now + max(0.0, expiry - time.time()), nblocks)
            for rid in meta.release:
                s = self._sending.get(rid)
                if s is not None:
                    s.released = True
            for job in meta.recv.values():
                job.t_start = now
                self._start_job(job)
            self._start_push(meta)
        self._advance_handshakes()

    def _start_job(self, job: RecvJob) -> None:
        if job.error:
            self._fail(job, job.error, job.error_msg, release=False)
            return
        src = job.src
        key = (src.host, src.port)
        rem = self._remotes.get(key)
        if rem is not None and rem.engine_id == src.engine_id:
            self._submit(job, rem)
            return
        # unknown (or changed) engine at that address: (re-)handshake
        self._waiting.setdefault(key, []).append(job)
        if key not in self._hs_futures:
            self._hs_futures[key] = self._bg.submit(self._handshake, src)

    def _handshake(self, src: RemoteSource | PushSendStep) -> list[Any]:
        """Remote ranks' RankDescriptors (every TP rank of the named DP rank)."""
        from .connector_control import control_client, drop_client
        try:
            c = control_client(src.host, src.port, self.cfg.handshake_timeout_s)
            return [c.handshake(self.desc, target_dp_rank=src.dp_rank, target_tp_rank=r,
                                timeout_s=self.cfg.handshake_timeout_s)
                    for r in range(src.tp_size)]
        except Exception:
            drop_client(src.host, src.port)
            raise

    # ------------------------------------------------------------ push mode
    def _start_push(self, meta: PdConnectorMetadata) -> None:
        for job in meta.push_recv.values():
            self._push_waiting[job.push_id] = job
        for push_id, reason in meta.push_fail.items():
            job = self._push_waiting.pop(push_id, None)
            if job is not None:
                self._fail_push(job, reason, "the prefill engine could not push")
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
            w.error = w.error or R_UNREACHABLE
            return None
        if rem.tp_size != self.tp_size:
            w.error = w.error or R_MISMATCH
            return None
        return rem.peers.get(self.tp_rank)

    def _post_write(self, w: _PushWrites, peer: str, local_ids: list[int],
                    remote_ids: list[int], layers: list[int]) -> None:
        try:
            h = self.engine.write_blocks(peer, local_ids, remote_ids, layers=layers,
                                         request_id=w.step.req_id)
        except Exception as e:
            log.warning("PdConnector: push WRITE of %s failed: %s", w.step.req_id, e)
            w.error = R_TRANSFER
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
        if time.time() > w.step.expiry:
            w.error = R_EXPIRED
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
        now = time.time()
        for st in self._push_step:
            w = self._push_writes[st.req_id]
            if w.error or not st.local_ids:
                continue
            if now > st.expiry:
                w.error = R_EXPIRED
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
                    w.error = w.error or R_TRANSFER
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
            self._notify_control(st.host, st.port, st.engine_id, msg)
            return
        try:
            self.engine.send_notif(peer, msg)
        except Exception as e:
            log.warning("PdConnector: push notification for %s failed: %s", st.req_id, e)
            self._notify_control(st.host, st.port, st.engine_id,
                                 f"push-fail:{st.push_id}:{w.error or R_TRANSFER}")

    def _notify_control(self, host: str, port: int, receiver: str, msg: str) -> None:
        """Best effort, off the engine thread: a control-plane ``Notify``."""
        me, timeout = self.engine_id, self.cfg.handshake_timeout_s

        def go() -> None:
            from .connector_control import send_notify
            try:
                send_notify(host, port, me, receiver, msg, timeout)
            except Exception as e:
                log.info("PdConnector: notification to %s:%s failed: %s", host, port, e)
        self._bg.submit(go)

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
            self._fail_push(job, tail or R_TRANSFER, "the prefill engine reported a failed push")
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
        if reason not in REASONS:
            msg, reason = f"{msg} ({reason[:40]})", R_TRANSFER
        self._fail(RecvJob(job.req_id, None, [], []), reason, msg, release=False)

    def _expire_pushes(self) -> None:
        now = time.time()
        for push_id, job in list(self._push_waiting.items()):
            if now > job.expiry + self.cfg.lease_guard_s:
                del self._push_waiting[push_id]
                self._fail_push(job, R_TIMEOUT, f"no push within {self.cfg.push_wait_s} s")

    def _advance_handshakes(self) -> None:
        for key, fut in list(self._hs_futures.items()):
            if not fut.done():
                continue
            del self._hs_futures[key]
            jobs = self._waiting.pop(key, [])
            try:
                reply = fut.result()
            except Exception as e:
                from .errors import HandshakeMismatchError
                mism = isinstance(e, HandshakeMismatchError)
                for job in jobs:
                    self._fail(job, R_MISMATCH if mism else R_UNREACHABLE,
                               f"control plane {key[0]}:{key[1]}: {e}", release=mism)
                continue
            try:
                rem = self._add_remote(key, reply)
            except Exception as e:
                reason = e.reason if isinstance(e, PeerRefused) else R_TRANSFER
                for job in jobs:
                    self._fail(job, reason, str(e))
                continue
            for job in jobs:
                self._submit(job, rem)

    def _add_remote(self, key: tuple[str, int], descs: list[Any]) -> _RemoteEngine:
        old = self._remotes.pop(key, None)
        if old is not None:
            # a peer with READs still in flight (or quarantined) stays until they are
            # over: NIXL cannot tell their state any more once the peer is removed
            self._retired |= set(old.peers.values())
            self._retire_idle_peers()
        if not descs:
            raise ValueError("prefill engine has no registered workers")
        eids = {d.engine_id for d in descs}
        if len(eids) != 1:
            raise PeerRefused(R_MISMATCH, f"remote ranks disagree on engine id {sorted(eids)}")
        tp = descs[0].tp_size
        if tp != self.tp_size and not self.bytes_per_head and not self.compat.get("is_mla"):
            raise PeerRefused(
                R_MISMATCH, f"prefill TP {tp} != decode TP {self.tp_size} needs a KV cache "
                f"where each head is one byte range of a block (head-major, HND); this "
                f"engine's cache is laid out {self.compat.get('kv_layout')} (strides "
                f"{tuple(self._cache_strides)}): run both with the same TP size or "
                f"VLLM_KV_CACHE_LAYOUT=HND")
        peers = {d.tp_rank: self.engine.add_peer(d.peer) for d in descs}
        self._retired -= set(peers.values())  # the same agent again: keep it
        rem = _RemoteEngine(descs[0].engine_id, descs[0].tp_size, peers)
        self._remotes[key] = rem
        return rem

    def _expected(self, remote_rank: int, remote_tp: int) -> int:
        k = (remote_rank, self.tp_size, remote_tp)
        if k not in self._expected_cache:
            from .layout import expected_notifications
            self._expected_cache[k] = expected_notifications(
                remote_rank, self.tp_size, remote_tp, self.compat["num_kv_heads"],
                self.compat.get("is_mla", False))
        return self._expected_cache[k]

    def _submit(self, job: RecvJob, rem: _RemoteEngine) -> None:
        src: RemoteSource = job.src
        if rem.engine_id != src.engine_id:
            self._fail(job, R_UNKNOWN_ENGINE, f"engine at {src.host}:{src.port} is "
                       f"{rem.engine_id!r}, params name {src.engine_id!r}", release=False)
            return
        if rem.tp_size != src.tp_size:
            self._fail(job, R_MISMATCH, f"tp_size {src.tp_size} != remote {rem.tp_size}")
            return
        if src.expiry is not None and time.time() > src.expiry - self.cfg.lease_guard_s:
            self._fail(job, R_EXPIRED, "prefill lease (nearly) expired before the READ")
            return
        from .layout import tp_read_plan
        plan = tp_read_plan(self.tp_rank, self.tp_size, rem.tp_size,
                            self.compat["num_kv_heads"], self.compat.get("is_mla", False),
                            bytes_per_head=self.bytes_per_head)
        t0 = time.perf_counter()
        infl = _Inflight(job, [], t0)
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
            from .errors import BlockIdError
            reason = R_BLOCK_RANGE if isinstance(e, BlockIdError) else R_TRANSFER
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

    def _fail(self, job: RecvJob, reason: str, msg: str, release: bool = True) -> None:
        log.warning("PdConnector: KV load of %s failed (%s): %s", job.req_id, reason, msg)
        self.stats.record_failure(reason)
        self._failed_recv.add(job.req_id)
        self._done_recv.add(job.req_id)
        self._results[job.req_id] = {"bytes": 0, "descriptors": 0, "blocks": 0, "ms": 0.0,
                                     "backend": "nixl", "error": reason, "detail": msg[:300]}
        if release and job.src is not None:
            src = job.src

            me, timeout = self.engine_id, self.cfg.handshake_timeout_s

            def go() -> None:
                from .connector_control import send_release
                try:
                    send_release(src.host, src.port, me, src.engine_id, src.request_id, timeout)
                except Exception:
                    pass
            self._bg.submit(go)

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
                self._quarantine_load(infl, R_TRANSFER, str(e))
                continue
            src = infl.job.src
            if done:
                del self._inflight[rid]
                self._send_done_notifs(infl)
                if src.expiry is not None and time.time() > src.expiry:
                    # the prefill side may have reused the blocks while we read
                    self._fail(infl.job, R_EXPIRED, "READ completed after the lease expired")
                    continue
                secs = max(h.stats.transfer_us for h in infl.handles) / 1e6 \
                    if infl.handles else now - infl.t0
                self.stats.record_transfer(infl.nbytes, secs, infl.descs)
                self._done_recv.add(rid)
                infl.t_done = time.monotonic()
                self._results[rid] = {"bytes": infl.nbytes, "descriptors": infl.descs,
                                      "blocks": len(infl.job.local_ids),
                                      "ms": round(secs * 1e3, 4), "seconds": secs,
                                      "backend": _backend_of(infl.handles, self.engine),
                                      "error": "", "stages_ms": _stages(infl)}
            elif now - infl.t0 > self.cfg.transfer_timeout_s or \
                    (src.expiry is not None and time.time() > src.expiry):
                del self._inflight[rid]
                for h in infl.handles:
                    try:
                        self.engine._on_timeout(h)
                    except Exception:
                        pass
                self._quarantine_load(infl, R_TIMEOUT, f"READ not done after "
                                      f"{now - infl.t0:.3f} s")

    def _quarantine_load(self, infl: _Inflight, reason: str, msg: str) -> None:
        """Fail ``infl`` once none of its READs can write any more (see _Quarantined)."""
        self._quarantine[infl.job.req_id] = _Quarantined(infl, reason, msg)
        self._poll_quarantine()

    def _retire_idle_peers(self) -> None:
        busy = {h.stats.peer for infl in [*self._inflight.values(),
                                         *(q.infl for q in self._quarantine.values())]
                for h in infl.handles}
        for name in self._retired - busy:
            self._retired.discard(name)
            try:
                self.engine.remove_peer(name)
            except Exception:
                pass

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

    def _poll_sending(self, finished_req_ids: set[str]) -> set[str]:
        if not self._sending and not self._notifs and not self._push_waiting:
            return set()
        if self.engine is not None:
            for _peer, msgs in self.engine.get_new_notifs().items():
                for m in msgs:
                    if m.startswith((b"push:", b"push-fail:")):
                        self._on_push_notif(m.decode(errors="replace"))
                        continue
                    try:
                        rid, n = m.decode().rsplit(":", 1)
                        n = max(1, int(n))
                    except Exception:
                        continue
                    st = self._notifs.setdefault(rid, _Notifs())
                    st.count += 1
                    st.expected = n
        out: set[str] = set()
        mono = time.monotonic()
        for rid, s in list(self._sending.items()):
            st = self._notifs.get(rid)
            if (st is not None and st.count >= st.expected) or s.released:
                out.add(rid)
            elif mono > s.deadline:
                self.stats.record_expired(s.nblocks)
                log.info("PdConnector: lease of %s expired, freeing %d blocks", rid, s.nblocks)
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

    def get_transfer_results(self, finished_req_ids: set[str]
                             ) -> tuple[set[str], set[str], set[str]]:
        self._advance_handshakes()
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
        sending = self._poll_sending(finished_req_ids)
        if self._push_writes:
            sending |= self._poll_push_writes()
        if self._push_waiting:
            self._expire_pushes()
        recving, failed = self._done_recv, self._failed_recv
        self._done_recv, self._failed_recv = set(), set()
        if recving:
            now = time.monotonic()
            for rid in recving:
                r = self._results.get(rid)
                st = r.get("stages_ms") if r else None
                if st is not None:
                    st["done_seen_to_reported"] = round((now - st.pop("_t_done")) * 1e3, 3)
                    r["t_reported"] = now
        return sending, recving, failed

    def take_worker_meta(self) -> PdWorkerMeta | None:
        if not self._results:
            return None
        m = PdWorkerMeta(self._results)
        self._results = {}
        return m

    def take_stats(self) -> PdConnectorStats | None:
        if self.stats.is_empty():
            return None
        s, self.stats = self.stats, PdConnectorStats()
        return s

    def shutdown(self) -> None:
        self._bg.shutdown(wait=False)
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:
                pass


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
            "_t_done": infl.t_done}
