"""Transfer engine over a NIXL agent (UCX backend), DRAM or VRAM regions.

Descriptor lists are prepared once: locally at registration, per peer at
:meth:`NixlTransferEngine.add_peer` (one descriptor per block per region, index =
``first_desc[region] + block_id``, like vLLM's NixlConnector). A transfer is then one
``make_prepped_xfer`` with numpy index arrays plus one ``transfer`` post.

Everything a transfer needs that depends only on (peer, layers, slices) — the region
selection, each selected region's first descriptor, bytes per block, layer count — is
kept per peer in a :class:`_Plan` on first use (a :class:`~transfer.engine.PlanCache`);
a submit then does one id check (:func:`~transfer.blocks.validate_block_id_pair`) and one
int32 add for both index arrays, which NIXL's binding takes as they are (1-D, C-contiguous int32: no conversion).

``protocol="tcp"`` forces UCX onto TCP (``UCX_TLS=tcp,self``); it sets the variable
for this process before the agent is created, so use one protocol per process.

NIXL's progress thread is kept (the passive side of a READ must progress UCX or
the transfer never completes), but with a non-zero delay: the Python API hard-codes
``pthrDelay = 0``, which busy-polls a whole core per agent even when idle.

UCX guards a worker shared with that thread with a spinlock by default. Over CMA a
READ copies inside its post, holding the lock; the progress thread, woken by its poll
timeout, preempts the posting thread and spins on the lock for a whole scheduler slice
when both share a core (an engine pinned to one): 1-3 ms per transfer, measured. So
the agent is created with ``UCX_USE_MT_MUTEX=y`` (a waiting thread sleeps) unless the
environment sets it.

With ``huge_pages`` the DRAM regions are collapsed onto transparent huge pages before
registration (:mod:`transfer.hugepages`): a CMA READ then looks up and pins one huge
page per 2 MiB instead of 512 small ones.

A notification leaves the peer's UCX endpoint owing a flush that NIXL would make the
next READ wait for; on DRAM :class:`~transfer.nixl_lane.LaneFlush` pays it right after
the notification instead.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .blocks import block_descriptors, region_indices
from .engine import (PeerInfo, PeerTableEngine, PlanCache, TransferHandle, TransferStats,
                     as_bytes, new_transfer_id, thread_clock)
from .errors import TransferError, TransferFailedError, UnknownPeerError, UnregisteredMemoryError
from .hugepages import CollapseResult, collapse
from .layout import Region, memory_ranges, regions_from_kv_caches
from .nixl_agent import UnpostedAgent, compute_event, make_agent
from .nixl_lane import LaneFlush


@dataclass
class _Plan:
    """What a transfer with one peer needs for one (layers, slices) key."""

    local_dlist: Any
    remote_dlist: Any
    first: np.ndarray  # int32 (2, regions, 1): first descriptor of each selected region
    bytes_per_block: int
    num_layers: int


@dataclass
class _Peer:
    info: PeerInfo
    agent_name: str
    dlist: Any  # prepared remote descriptor list (whole blocks)
    first_desc: np.ndarray  # per remote region: index of its block 0
    sliced: dict  # (offset, length) -> (dlist, first_desc)
    num_blocks: int = 0  # blocks per remote region (the smallest)
    plans: PlanCache = field(default_factory=PlanCache)  # (layers, lslice, rslice) -> _Plan


class NixlTransferEngine(PeerTableEngine):
    """:class:`TransferEngine` on one NIXL agent with the UCX backend."""

    backend = "nixl"

    def __init__(self, name: str | None = None, *, protocol: str = "rdma",
                 num_threads: int = 0, capture_telemetry: bool = False,
                 backends: Sequence[str] = ("UCX",),
                 progress_delay_us: int | None = None, huge_pages: bool = False) -> None:
        super().__init__(name or f"pdx-{uuid.uuid4().hex[:12]}")
        self.huge_pages = huge_pages  # DRAM: collapse registered memory onto huge pages
        self.huge_pages_result: CollapseResult | None = None
        self.protocol = protocol
        self.capture_telemetry = capture_telemetry
        self._api, self.agent = make_agent(self.name, protocol, backends, num_threads,
                                           capture_telemetry, progress_delay_us)
        self._reg_descs: list[Any] = []
        self._local_dlist: Any = None
        self._local_first = np.zeros(0, dtype=np.int64)
        self._local_blocks = 0
        self._local_sliced: dict = {}
        self._inflight: dict[int, TransferHandle] = {}
        self._stale: list[Any] = []  # xfer handles NIXL could not release yet
        self._ranges: list[tuple[int, int, int]] = []
        self._lane: LaneFlush | None = None  # DRAM: flushes owed by notifications

    # ------------------------------------------------------------ registration
    def register_regions(self, regions: Sequence[Region], mem_type: str = "DRAM") -> None:
        if mem_type not in ("DRAM", "VRAM"):
            raise ValueError(f"mem_type must be DRAM or VRAM, got {mem_type!r}")
        with self._lock:
            if self.regions:
                raise TransferError("regions already registered on this engine")
            ranges = memory_ranges(regions)
            if mem_type == "DRAM" and self.huge_pages:  # before NIXL pins anything
                self.huge_pages_result = collapse((a, n) for a, n, _ in ranges)
            reg = self.agent.register_memory([(a, l, d, "") for a, l, d in ranges], mem_type)
            self._reg_descs.append(reg)
            self._ranges = ranges
            self.regions = list(regions)
            self.mem_type = mem_type
            self._local_dlist, self._local_first = self._prep(
                "NIXL_INIT_AGENT", self.regions, 0, None)
            self._local_blocks = min((r.num_blocks for r in self.regions), default=0)
            if mem_type == "DRAM":
                self._lane = LaneFlush(self.agent)

    def register_kv_caches(self, kv_caches: Mapping[str, Any],
                           num_blocks: int | None = None) -> list[Region]:
        regions = regions_from_kv_caches(kv_caches, num_blocks)
        first = next(iter(kv_caches.values()))
        is_cuda = str(getattr(first, "device", "cpu")).startswith("cuda")
        self.register_regions(regions, "VRAM" if is_cuda else "DRAM")
        return regions

    def _prep(self, agent: str, regions: Sequence[Region], offset: int,
              length: int | None) -> tuple[Any, np.ndarray]:
        descs = []
        first = np.zeros(len(regions), dtype=np.int64)
        n = 0
        for i, r in enumerate(regions):
            first[i] = n
            descs.append(block_descriptors([r], np.arange(r.num_blocks), offset=offset,
                                           length=length, coalesce=False))
            n += r.num_blocks
        arr = np.concatenate(descs) if descs else np.empty((0, 3), dtype=np.int64)
        dl = self.agent.prep_xfer_dlist(agent, arr, self.mem_type)
        return dl, first

    def check_registered(self, addr: int, length: int) -> None:
        """Raise :class:`UnregisteredMemoryError` unless ``[addr, addr+length)`` is ours."""
        for a, l, _ in self._ranges:
            if a <= addr and addr + length <= a + l:
                return
        raise UnregisteredMemoryError(
            f"range [{addr:#x}, {addr + length:#x}) is not inside memory registered "
            f"with agent {self.name!r}")

    # ------------------------------------------------------------ peers
    def local_info(self) -> PeerInfo:
        with self._lock:
            if not self.regions:
                raise UnregisteredMemoryError("no memory registered: call register_* first")
            return PeerInfo(name=self.name, backend=self.backend, mem_type=self.mem_type,
                            regions=list(self.regions),
                            agent_metadata=self.agent.get_agent_metadata(),
                            device_id=self.regions[0].device_id)

    def add_peer(self, info: PeerInfo) -> str:
        if not info.agent_metadata:
            raise TransferError(f"peer {info.name!r} sent no NIXL agent metadata")
        with self._lock:
            if info.name in self._peers:
                self.remove_peer(info.name)
            try:
                agent_name = self.agent.add_remote_agent(info.agent_metadata)
            except Exception as e:
                raise TransferError(f"cannot load NIXL metadata of {info.name!r}: {e}") from e
            if isinstance(agent_name, bytes):
                agent_name = agent_name.decode()
            try:
                dl, first = self._prep(agent_name, info.regions, 0, None)
            except Exception as e:
                self.agent.remove_remote_agent(agent_name)
                raise UnregisteredMemoryError(
                    f"peer {info.name!r}: its regions are not registered on its side "
                    f"({e})") from e
            self._peers[info.name] = _Peer(info, agent_name, dl, first, {}, info.num_blocks)
            if self._lane is not None and info.mem_type == "DRAM" and info.regions:
                r = info.regions[0]
                self._lane.add_peer(agent_name, r.base_addr, r.device_id)
            return info.name

    def remove_peer(self, name: str) -> None:
        with self._lock:
            p = self._peers.pop(name, None)
            if p is None:
                raise UnknownPeerError(name, list(self._peers))
            for h in [p.dlist] + [d for d, _ in p.sliced.values()]:
                try:
                    self.agent.release_dlist_handle(h)
                except Exception:
                    pass
            if self._lane is not None:
                self._lane.remove_peer(p.agent_name)
            try:
                self.agent.remove_remote_agent(p.agent_name)
            except Exception:
                pass

    # ------------------------------------------------------------ transfers
    def _local_side(self, sl: tuple[int, int] | None) -> tuple[Any, np.ndarray]:
        if sl is None:
            return self._local_dlist, self._local_first
        if sl not in self._local_sliced:
            self._local_sliced[sl] = self._prep("NIXL_INIT_AGENT", self.regions, *sl)
        return self._local_sliced[sl]

    def _remote_side(self, p: _Peer, sl: tuple[int, int] | None) -> tuple[Any, np.ndarray]:
        if sl is None:
            return p.dlist, p.first_desc
        if sl not in p.sliced:
            p.sliced[sl] = self._prep(p.agent_name, p.info.regions, *sl)
        return p.sliced[sl]

    def _build_plan(self, p: _Peer, key: tuple) -> _Plan:
        """The :class:`_Plan` of ``key = (layers, local_slice, remote_slice)``."""
        layers, local_slice, remote_slice = key
        lreg = region_indices(self.regions, layers)
        rreg = region_indices(p.info.regions, layers)
        if lreg.size != rreg.size:
            raise TransferError(
                f"peer {p.info.name!r} has {rreg.size} regions for these layers, we have "
                f"{lreg.size}")
        ldl, lfirst = self._local_side(local_slice)
        rdl, rfirst = self._remote_side(p, remote_slice)
        first = np.stack((lfirst[lreg], rfirst[rreg])).astype(np.int32)[:, :, None]
        return _Plan(ldl, rdl, first, _bytes(self.regions, lreg, 1, local_slice),
                     len({self.regions[i].layer for i in lreg}))

    def _submit(self, op: str, peer: str, local_ids: Any, remote_ids: Any,
                layers: Iterable[int] | None, notif: bytes | str | None, request_id: str,
                local_slice: tuple[int, int] | None,
                remote_slice: tuple[int, int] | None) -> TransferHandle:
        t0 = time.perf_counter_ns()
        with self._lock:
            if self._local_dlist is None:
                raise UnregisteredMemoryError("no local memory registered on this engine")
            p = self._peer(peer)
            ids = self._checked_ids(p, local_ids, remote_ids, self._local_blocks, p.num_blocks)
            plan = p.plans.get((None if layers is None else tuple(layers), local_slice,
                                remote_slice), lambda k: self._build_plan(p, k))
            # (2, regions, 1) + (2, 1, n) -> (2, regions, n), region-major per side
            idx = np.add(plan.first, ids[:, None, :], dtype=np.int32, casting="unsafe")
            lidx = idx[0].reshape(-1)
            ridx = idx[1].reshape(-1)
            msg = as_bytes(notif)
            try:
                xh = self.agent.make_prepped_xfer(op, plan.local_dlist, lidx,
                                                  plan.remote_dlist, ridx, msg)
            except Exception as e:
                raise TransferFailedError(f"{op} to {peer!r}: cannot create transfer: {e}") from e
            ev = compute_event() if op == "WRITE" and self.mem_type == "VRAM" else None
            cpu0, preempt0 = thread_clock()
            t1 = time.perf_counter_ns()
            if ev is not None and not ev.query():
                state = "PENDING"  # posted by poll() once the KV is written
            else:
                ev = None
                try:
                    # over CMA/shared memory the copy runs inside this call
                    state = self.agent.transfer(xh)
                except Exception as e:
                    self._release(xh)
                    raise TransferFailedError(f"{op} to {peer!r}: post failed: {e}") from e
            t2 = time.perf_counter_ns()
            cpu1, preempt1 = thread_clock()
        n = ids.shape[1]
        stats = TransferStats(
            transfer_id=new_transfer_id(), request_id=request_id, peer=peer, op=op,
            backend=self.backend, bytes=plan.bytes_per_block * n, descriptors=int(lidx.size),
            num_blocks=n, num_layers=plan.num_layers,
            prepare_us=(t1 - t0) / 1e3, post_us=(t2 - t1) / 1e3,
            post_cpu_us=cpu1 - cpu0, post_preempted=preempt1 - preempt0)
        h = TransferHandle(stats=stats, native=xh, t_submit_ns=t0, notif=msg, post_after=ev)
        if state == "ERR":
            self._finish(h, "ERR", f"{op} to {peer!r}: NIXL post returned ERR")
            raise TransferFailedError(h.stats.error)
        if state == "DONE":
            self._finish(h, "DONE")
        return h

    def poll(self, handle: TransferHandle) -> bool:
        if handle.done:
            if handle.stats.state == "ERR":
                raise TransferFailedError(handle.stats.error)
            return True
        with self._lock:
            if handle.post_after is not None:
                if not handle.post_after.query():
                    return False
                handle.post_after = None
                try:
                    if self.agent.transfer(handle.native) == "ERR":
                        raise RuntimeError("NIXL post returned ERR")
                except Exception as e:
                    self._finish(handle, "ERR", f"{handle.stats.op} with peer "
                                                f"{handle.stats.peer!r}: post failed: {e}")
                    raise TransferFailedError(handle.stats.error) from e
            try:
                state = self.agent.check_xfer_state(handle.native)
            except Exception as e:
                state, err = "ERR", str(e)
            else:
                err = ""
            if state == "PROC":
                return False
            if state == "DONE":
                self._finish(handle, "DONE")
                return True
            self._finish(handle, "ERR", f"{handle.stats.op} with peer {handle.stats.peer!r} "
                                        f"failed (NIXL state ERR) {err}".strip())
        raise TransferFailedError(handle.stats.error)

    def _finish(self, h: TransferHandle, state: str, error: str = "") -> None:
        h.stats.transfer_us = (time.perf_counter_ns() - h.t_submit_ns) / 1e3
        h.stats.state = state
        h.stats.error = error
        h.done = True
        if state == "DONE" and self.capture_telemetry:  # read before the handle is released
            try:
                h.stats.nixl_xfer_us = float(self.agent.get_xfer_telemetry(h.native).xferDuration)
            except Exception:  # no telemetry for this handle: the Python-side span stands
                pass
        # a handle NIXL would not release is kept (and parked): released() retries
        h.native = None if self._release(h.native) else h.native
        self._publish(h.stats)

    def _release(self, xh: Any) -> bool:
        try:
            self.agent.release_xfer_handle(xh)
            return True
        except Exception:
            self._stale.append(xh)  # still active in the backend; retried on close
            return False

    def _on_timeout(self, handle: TransferHandle) -> None:
        """Mark it failed, but keep NIXL's handle: NIXL accepts releasing an active
        transfer while the backend goes on writing (measured: UCX over TCP, blocks kept
        landing after the release), so only :meth:`released` lets it go, once NIXL
        reports it over. Parked for :meth:`close` meanwhile."""
        with self._lock:
            if handle.done:
                return
            handle.stats.transfer_us = (time.perf_counter_ns() - handle.t_submit_ns) / 1e3
            handle.stats.state, handle.stats.error, handle.done = "ERR", "timed out", True
            if handle.native is not None and handle.post_after is None:
                self._stale.append(handle.native)
            self._publish(handle.stats)

    def released(self, handle: TransferHandle) -> bool:
        """True once NIXL reports the transfer over (done or failed) and its handle was
        released, or it was never posted. False while NIXL still reports it active
        (releasing an active transfer does not stop it, see :meth:`_on_timeout`)."""
        with self._lock:
            xh = handle.native
            if xh is None:
                return True
            if handle.post_after is not None:
                handle.post_after = None  # never posted: nothing moved, nothing will
            else:
                try:
                    state = self.agent.check_xfer_state(xh)
                except Exception:
                    # e.g. NOT_FOUND once the peer was removed: UCX may still be
                    # writing (measured), so this does not count as over
                    return False
                if state == "PROC":
                    return False
                if not handle.done:
                    handle.stats.state = "DONE" if state == "DONE" else "ERR"
                    handle.done = True
            try:
                self.agent.release_xfer_handle(xh)
            except Exception:
                return False
            handle.native = None
            self._stale = [x for x in self._stale if x is not xh]
            if handle.stats.state == "PROC":
                handle.stats.state, handle.done = "ERR", True
            return True

    # ------------------------------------------------------------ notifications
    def get_new_notifs(self) -> dict[str, list[bytes]]:
        with self._lock:
            raw = self.agent.get_new_notifs()
        # map NIXL agent names back to peer names (they are equal for our engines)
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}

    def send_notif(self, peer: str, msg: bytes | str) -> None:
        with self._lock:
            p = self._peer(peer)
            try:
                self.agent.send_notif(p.agent_name, as_bytes(msg))
            except Exception as e:
                raise TransferFailedError(f"notification to {peer!r} failed: {e}") from e
            if self._lane is not None:
                self._lane.after_notif(p.agent_name)

    def close(self) -> None:
        with self._lock:
            for name in list(self._peers):
                self.remove_peer(name)
            for dl in [self._local_dlist] + [d for d, _ in self._local_sliced.values()]:
                if dl is not None:
                    try:
                        self.agent.release_dlist_handle(dl)
                    except Exception:
                        pass
            self._local_dlist = None
            if self._lane is not None:
                self._lane.close()
                self._lane = None
            for xh in self._stale:
                try:
                    self.agent.release_xfer_handle(xh)
                except Exception:
                    pass
            self._stale.clear()
            for reg in self._reg_descs:
                try:
                    self.agent.deregister_memory(reg)
                except Exception:
                    pass
            self._reg_descs.clear()

    def prepare_only(self) -> None:
        """Benchmark mode (``pdbench transfer --prepare-only``), for good: every later
        READ/WRITE is built (``make_prepped_xfer``) and then released unposted, as if
        it completed at once; nothing moves, so ``TransferStats.prepare_us`` is the
        cost of preparing alone. Not for serving."""
        with self._lock:
            if not isinstance(self.agent, UnpostedAgent):
                self.agent = UnpostedAgent(self.agent)


def _bytes(regions: Sequence[Region], reg_idx: np.ndarray, nblocks: int,
           sl: tuple[int, int] | None) -> int:
    if sl is not None:
        return int(sl[1]) * int(reg_idx.size) * nblocks
    return sum(regions[i].block_len for i in reg_idx) * nblocks
