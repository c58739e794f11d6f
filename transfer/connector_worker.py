"""Worker half of the PdConnector (one per TP rank), on ``transfer.TransferEngine``.

Decode side (pull): for each planned request, make sure the prefill engine's
workers are known (lazy gRPC handshake to its control server, in a background
thread), then READ the remote blocks into the local ones -- per layer, with byte
slices inside each block when prefill and decode TP differ
(``transfer.layout.tp_read_plan``). The last READ to each remote rank carries the
notification ``"<remote_request_id>:<expected>"``; the prefill worker frees the
request's blocks once ``expected`` notifications arrived.

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

log = logging.getLogger("vllm.pdsidecar.connector")  # vLLM's handlers and format


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


@dataclass
class _Sending:
    expiry: float
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
        self.stats = PdConnectorStats()
        self._remotes: dict[tuple[str, int], _RemoteEngine] = {}
        self._hs_futures: dict[tuple[str, int], Future] = {}
        self._waiting: dict[tuple[str, int], list[RecvJob]] = {}
        self._inflight: dict[str, _Inflight] = {}
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

    # ------------------------------------------------------------ registration
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        from .control import RankDescriptor
        from .layout import heads_per_rank
        from .select import create_engine
        name = f"pd-{self.engine_id}-tp{self.tp_rank}-{uuid.uuid4().hex[:8]}"
        first = next(iter(kv_caches.values()))
        device = str(getattr(first, "device", "cpu"))
        self.engine = create_engine(self.cfg.protocol, name, device=device,
                                    backends=tuple(self.cfg.backends),
                                    progress_delay_us=self.cfg.nixl_progress_delay_us)
        self.regions = self.engine.register_kv_caches(kv_caches)
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        c = self.compat
        self.heads_local = heads_per_rank(c["num_kv_heads"], self.tp_size, c.get("is_mla", False))
        self.bytes_per_head = self.regions[0].block_len // self.heads_local
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
            for rid, (expiry, nblocks) in meta.send.items():
                self._sending[rid] = _Sending(expiry, nblocks)
            for rid in meta.release:
                s = self._sending.get(rid)
                if s is not None:
                    s.released = True
            for job in meta.recv.values():
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
        """The decode rank to WRITE to; waits (bounded) for a first handshake."""
        st = w.step
        key = (st.host, st.port)
        fut = self._hs_futures.get(key)
        if fut is not None:
            try:
                fut.result(timeout=self.cfg.handshake_timeout_s)
            except Exception:
                pass
            self._advance_handshakes()
        rem = self._remotes.get(key)
        if rem is None or rem.engine_id != st.engine_id:
            w.error = w.error or R_UNREACHABLE
            return None
        if rem.tp_size != self.tp_size:
            w.error = w.error or R_MISMATCH
            return None
        return rem.peers.get(self.tp_rank)

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
            peer = self._push_peer(w)
            if peer is None:
                continue
            try:
                h = self.engine.write_blocks(peer, st.local_ids, st.remote_ids, layers=[layer],
                                             request_id=st.req_id)
            except Exception as e:
                log.warning("PdConnector: push WRITE of %s failed: %s", st.req_id, e)
                w.error = R_TRANSFER
                continue
            w.handles.append(h)
            w.nbytes += h.stats.bytes

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
            pending = False
            for h in w.handles:
                try:
                    if not self.engine.poll(h):
                        pending = True
                except Exception:
                    w.error = w.error or R_TRANSFER
            if pending:
                continue
            if (w.final or w.error or w.finished) and not w.notified:
                self._notify_push(w)
            if w.finished and w.notified:
                freed.add(rid)
                del self._push_writes[rid]
        return freed

    def _notify_push(self, w: _PushWrites) -> None:
        w.notified = True
        st = w.step
        now = time.perf_counter()
        us, tail_us = (now - w.t0) * 1e6, (now - w.t_final) * 1e6 if w.t_final else 0.0
        ok = w.final and not w.error
        msg = (f"push:{st.push_id}:{w.nbytes}:{us:.0f}:{tail_us:.0f}" if ok else
               f"push-fail:{st.push_id}:{w.error or 'incomplete'}")
        peer = self._push_peer(w)
        if peer is None:
            return  # never reached the decode side: it times out and recomputes
        try:
            self.engine.send_notif(peer, msg)
        except Exception as e:
            log.warning("PdConnector: push notification for %s failed: %s", st.req_id, e)

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
                reason = R_MISMATCH if "mismatch" in str(e) else R_TRANSFER
                for job in jobs:
                    self._fail(job, reason, str(e))
                continue
            for job in jobs:
                self._submit(job, rem)

    def _add_remote(self, key: tuple[str, int], descs: list[Any]) -> _RemoteEngine:
        old = self._remotes.pop(key, None)
        if old is not None:
            for name in old.peers.values():
                try:
                    self.engine.remove_peer(name)
                except Exception:
                    pass
        if not descs:
            raise ValueError("prefill engine has no registered workers")
        eids = {d.engine_id for d in descs}
        if len(eids) != 1:
            raise ValueError(f"mismatch: remote ranks disagree on engine id {sorted(eids)}")
        peers = {d.tp_rank: self.engine.add_peer(d.peer) for d in descs}
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
                notif = f"{src.request_id}:{self._expected(p, rem.tp_size)}"
                for i, s in enumerate(slices):
                    whole = s.num_heads == self.heads_local and s.remote_offset == 0 and \
                        s.local_offset == 0 and rem.tp_size == self.tp_size
                    kw = {} if whole else {"local_slice": (s.local_offset, s.length),
                                           "remote_slice": (s.remote_offset, s.length)}
                    h = self.engine.read_blocks(
                        peer, job.local_ids, job.remote_ids, request_id=job.req_id,
                        notif=notif if i == len(slices) - 1 else None, **kw)
                    infl.handles.append(h)
                    infl.nbytes += h.stats.bytes
                    infl.descs += h.stats.descriptors
            for p in plan.notify_only:
                self.engine.send_notif(rem.peers[p], f"{src.request_id}:"
                                                     f"{self._expected(p, rem.tp_size)}")
        except Exception as e:
            from .errors import BlockIdError
            reason = R_BLOCK_RANGE if isinstance(e, BlockIdError) else R_TRANSFER
            self._fail(job, reason, str(e))
            return
        self._inflight[job.req_id] = infl
        self._posted_this_step = True

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

    def _poll_inflight(self) -> None:
        now = time.perf_counter()
        for rid, infl in list(self._inflight.items()):
            try:
                done = all(self.engine.poll(h) for h in infl.handles)
            except Exception as e:
                del self._inflight[rid]
                self._fail(infl.job, R_TRANSFER, str(e))
                continue
            src = infl.job.src
            if done:
                del self._inflight[rid]
                if src.expiry is not None and time.time() > src.expiry:
                    # the prefill side may have reused the blocks while we read
                    self._fail(infl.job, R_EXPIRED, "READ completed after the lease expired")
                    continue
                secs = max(h.stats.transfer_us for h in infl.handles) / 1e6 \
                    if infl.handles else now - infl.t0
                self.stats.record_transfer(infl.nbytes, secs, infl.descs)
                self._done_recv.add(rid)
                self._results[rid] = {"bytes": infl.nbytes, "descriptors": infl.descs,
                                      "blocks": len(infl.job.local_ids),
                                      "ms": round(secs * 1e3, 4), "seconds": secs,
                                      "backend": _backend_of(infl.handles, self.engine),
                                      "error": ""}
            elif now - infl.t0 > self.cfg.transfer_timeout_s or \
                    (src.expiry is not None and time.time() > src.expiry):
                del self._inflight[rid]
                for h in infl.handles:
                    try:
                        self.engine._on_timeout(h)
                    except Exception:
                        pass
                self._fail(infl.job, R_TIMEOUT, f"READ not done after "
                           f"{now - infl.t0:.3f} s", release=False)

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
        now = time.time()
        for rid, s in list(self._sending.items()):
            st = self._notifs.get(rid)
            if (st is not None and st.count >= st.expected) or s.released:
                out.add(rid)
            elif now > s.expiry:
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
