"""Worker half of the PdConnector (one per TP rank), shared part.

Cache registration (one :class:`transfer.TransferEngine` per worker), the lazy gRPC
handshake with other engines' control servers (in a background thread, picked up by
later steps: no hook waits), the table of known remote engines and their peers, the
completion notifications coming in over the engine, failure reporting and stats.
The pull and push parts are :mod:`.pull_worker` and :mod:`.push_worker`.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from ..amx import request_amx_tile_permission
from ..errors import FailureReason, PeerRefused, reason_of
from .config import PdConfig
from .control_client import ControlNotifier, configure_auth
from .metadata import PdWorkerMeta, PushSendStep, RecvJob, RemoteSource
from .stats import PdConnectorStats

log = logging.getLogger("vllm.pdsidecar.connector")  # vLLM's handlers and format


@dataclass
class RemoteEngine:
    """An engine we handshook with: its TP size and our peer name of each of its ranks."""

    engine_id: str
    tp_size: int
    peers: dict[int, str]  # remote tp rank -> peer name in our TransferEngine


def backend_of(handles: list[Any], engine: Any) -> str:
    """The backend that moved a request (``ipc``/``nixl``; the routing engine tags
    each handle with the engine it chose)."""
    for h in handles:
        b = getattr(h.extra, "backend", None)
        if isinstance(b, str):
            return b
    return engine.backend


class BaseWorker:
    """State and plumbing shared by the pull and push worker parts."""

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
        # push write windows (PushSendStep.valid_until; tests inject a clock)
        self.clock: Callable[[], float] = time.monotonic
        self._remotes: dict[tuple[str, int], RemoteEngine] = {}
        self._hs_futures: dict[tuple[str, int], Future] = {}
        self._waiting: dict[tuple[str, int], list[RecvJob]] = {}  # jobs for a handshake
        self._retired: set[str] = set()  # peers to remove once no transfer uses them
        self._done_recv: set[str] = set()
        self._failed_recv: set[str] = set()
        self._results: dict[str, dict[str, Any]] = {}
        self._bg = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pd-hs")
        self.notifier = ControlNotifier(engine_id, cfg.handshake_timeout_s)
        self._layer_index: dict[str, int] = {}
        configure_auth(cfg.control_token, cfg.control_tls)

    # ------------------------------------------------------------ registration
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        from ..control_messages import RankDescriptor
        from ..layout import head_slice_bytes, heads_per_rank
        from ..select import create_engine
        name = f"pd-{self.engine_id}-tp{self.tp_rank}-{uuid.uuid4().hex[:8]}"
        first = next(iter(kv_caches.values()))
        device = str(getattr(first, "device", "cpu"))
        # capture_telemetry: NIXL times each transfer itself (xferDuration), the figure
        # vLLM's NixlConnector reports, so both connectors' in-engine times are one measure
        self.engine = create_engine(self.cfg.protocol, name, device=device,
                                    backends=tuple(self.cfg.backends),
                                    progress_delay_us=self.cfg.nixl_progress_delay_us,
                                    huge_pages=self.cfg.kv_huge_pages, capture_telemetry=True)
        from ..late_peer import LateReads, read_delay_s
        if delay := read_delay_s():  # test hook: every READ reaches the wire late
            log.warning("PdConnector: test hook %s: READs posted %.1f s late", name, delay)
            self.engine = LateReads(self.engine, delay)
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
        huge = getattr(self.engine, "huge_pages_result", None)
        log.info("PdConnector worker %s (%s): %d regions, %d blocks, %d B/block/layer%s",
                 name, self.engine.backend, len(self.regions), self.regions[0].num_blocks,
                 self.regions[0].block_len, f"; KV cache {huge.describe()}" if huge else "")

    def _handshake(self, src: RemoteSource | PushSendStep) -> list[Any]:
        """Remote ranks' RankDescriptors (every TP rank of the named DP rank)."""
        from .control_client import control_client, drop_client
        try:
            c = control_client(src.host, src.port, self.cfg.handshake_timeout_s)
            return [c.handshake(self.desc, target_dp_rank=src.dp_rank, target_tp_rank=r,
                                timeout_s=self.cfg.handshake_timeout_s)
                    for r in range(src.tp_size)]
        except Exception:
            drop_client(src.host, src.port)
            raise

    # ------------------------------------------------------------ remote engines
    def _advance_handshakes(self) -> None:
        for key, fut in list(self._hs_futures.items()):
            if not fut.done():
                continue
            del self._hs_futures[key]
            jobs = self._waiting.pop(key, [])
            try:
                reply = fut.result()
            except Exception as e:
                # a mismatch is final: free the prefill blocks; unreachable: its lease does
                reason = FailureReason.MISMATCH if reason_of(e) == FailureReason.MISMATCH \
                    else FailureReason.UNREACHABLE
                for job in jobs:
                    self._fail(job, reason, f"control plane {key[0]}:{key[1]}: {e}",
                               release=reason == FailureReason.MISMATCH)
                continue
            try:
                rem = self._add_remote(key, reply)
            except Exception as e:
                reason = reason_of(e)
                for job in jobs:
                    self._fail(job, reason, str(e))
                continue
            for job in jobs:
                self._remote_ready(job, rem)

    def _add_remote(self, key: tuple[str, int], descs: list[Any]) -> RemoteEngine:
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
            raise PeerRefused(FailureReason.MISMATCH,
                              f"remote ranks disagree on engine id {sorted(eids)}")
        tp = descs[0].tp_size
        if tp != self.tp_size and not self.bytes_per_head and not self.compat.get("is_mla"):
            raise PeerRefused(
                FailureReason.MISMATCH, f"prefill TP {tp} != decode TP {self.tp_size} needs a "
                f"KV cache where each head is one byte range of a block (head-major, HND); this "
                f"engine's cache is laid out {self.compat.get('kv_layout')} (strides "
                f"{tuple(self._cache_strides)}): run both with the same TP size or "
                f"VLLM_KV_CACHE_LAYOUT=HND")
        peers = {d.tp_rank: self.engine.add_peer(d.peer) for d in descs}
        self._retired -= set(peers.values())  # the same agent again: keep it
        rem = RemoteEngine(descs[0].engine_id, descs[0].tp_size, peers)
        self._remotes[key] = rem
        return rem

    def _retire_idle_peers(self) -> None:
        busy = self._busy_peers()
        for name in self._retired - busy:
            self._retired.discard(name)
            try:
                self.engine.remove_peer(name)
            except Exception:
                pass

    # ------------------------------------------------------------ hooks of the parts
    def _remote_ready(self, job: RecvJob, rem: RemoteEngine) -> None:
        """The engine ``job`` reads from is known: go on with the load (pull part)."""
        raise NotImplementedError

    def _busy_peers(self) -> set[str]:
        """Peers some transfer still uses (they are not removed yet)."""
        return set()

    def _on_read_done(self, rid: str, expected: int) -> None:
        """A decode rank finished reading our blocks of ``rid`` (pull part)."""

    def _on_push_notif(self, msg: str) -> None:
        """``push:``/``push-fail:`` from a prefill engine (push part)."""

    def _take_notifs(self) -> None:
        """Hand the engine's new notifications to the part that waits for them."""
        if self.engine is None:
            return
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
                self._on_read_done(rid, n)

    def _fail(self, job: RecvJob, reason: str, msg: str, release: bool = True) -> None:
        log.warning("PdConnector: KV load of %s failed (%s): %s", job.req_id, reason, msg)
        self.stats.record_failure(reason)
        self._failed_recv.add(job.req_id)
        self._done_recv.add(job.req_id)
        self._results[job.req_id] = {"bytes": 0, "descriptors": 0, "blocks": 0, "ms": 0.0,
                                     "backend": "nixl", "error": reason, "detail": msg[:300]}
        if release and job.src is not None:
            src = job.src
            self.notifier.release(src.host, src.port, src.engine_id, src.request_id)

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
        self.notifier.shutdown()
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:
                pass
