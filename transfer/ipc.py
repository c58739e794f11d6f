"""Same-host fast path: CUDA IPC mapping of the peer's KV cache + batched copies.

At handshake each side exports one CUDA IPC handle per cache allocation
(``torch.multiprocessing.reductions.reduce_tensor`` on a byte view of the whole
storage); the peer maps them once and translates the peer's region addresses into
its own address space. A READ is then one Triton launch per layer group (all layers
of equal geometry) reading the peer's blocks into ours; a WRITE scatters ours into
the peer's. Completion = a CUDA event on a private stream; notifications go through
``notifier(peer, msg)`` (the NIXL agent, or the control plane) once the copy is done.

``ipc_handles`` is a plain message of raw ``CUipcMemHandle`` bytes
(:mod:`transfer.ipc_handles`): nothing from a peer is unpickled or called, and a
peer counts as same-host only once its handles open on one of our GPUs. CPU tensors
work in one process (tests, the torch fallback): peers registered in this process
are mapped directly.
"""

from __future__ import annotations

import threading
import time
import uuid
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping, Sequence


from .engine import (DEFAULT_WAIT_TIMEOUT_S, PeerInfo, PeerTableEngine, PlanCache,
                     TransferHandle, TransferStats, as_bytes, new_transfer_id)
from .errors import (BackendUnavailableError, TransferError,
                     TransferFailedError, TransferTimeoutError, UnknownPeerError,
                     UnregisteredMemoryError)
from .ipc_plan import IpcPlanning, nullctx
from .layout import Region, regions_from_kv_caches

Notifier = Callable[[str, bytes], None]

# engines of this process by name: "mapping" a same-process peer needs no IPC
_LOCAL_ENGINES: "weakref.WeakValueDictionary[str, IpcTransferEngine]" = \
    weakref.WeakValueDictionary()


def _torch() -> Any:
    try:
        import torch
    except Exception as e:
        raise BackendUnavailableError(f"torch is not importable: {e}") from e
    return torch


@dataclass
class _Storage:
    ptr: int  # base address in the owner's address space
    nbytes: int
    tensor: Any  # uint8 view of the whole storage (local or mapped)


@dataclass
class _MappedPeer:
    info: PeerInfo
    storages: list[_Storage]
    bases: list[int]  # per peer region: base address in *our* address space
    views: list[Any]  # per peer region: [num_blocks, block_len] uint8 view
    plans: PlanCache = field(default_factory=PlanCache)  # (op, layers, slices) -> ipc_plan.IpcPlan


class IpcTransferEngine(IpcPlanning, PeerTableEngine):
    """:class:`TransferEngine` for two CUDA processes on one host (or one process)."""

    backend = "ipc"

    def __init__(self, name: str | None = None, *, use_triton: bool | None = None,
                 notifier: Notifier | None = None, chunk_words: int | None = None,
                 num_warps: int | None = None, time_device: bool = False) -> None:
        super().__init__(name or f"pdx-ipc-{uuid.uuid4().hex[:12]}")
        self._torch = _torch()
        self.use_triton = use_triton
        self.notifier = notifier
        self.chunk_words = chunk_words
        self.num_warps = num_warps
        self.time_device = time_device  # record start events: handle.stats.device_us
        self._storages: list[_Storage] = []
        self._views: list[Any] = []
        self._inbox: dict[str, list[bytes]] = defaultdict(list)
        self._inbox_lock = threading.Lock()
        self._stream: Any = None
        self._stream_handle = 0
        self._ops: Any = None
        self._driver = False
        self._slots: list[Any] = []  # ipc_plan._Slot
        self._slot_cap = 0
        self._next_slot = 0
        self._local_nblocks = 0
        self._all_layers: tuple = ()
        self.device: Any = None
        self._handles = b""  # our exported IPC handle message (VRAM only)
        self._ipc_api: Any = None
        self._mapped: dict[str, list[int]] = {}  # peer -> opened allocation bases
        _LOCAL_ENGINES[self.name] = self

    # ------------------------------------------------------------ registration
    def register_kv_caches(self, kv_caches: Mapping[str, Any],
                           num_blocks: int | None = None) -> list[Region]:
        regions = regions_from_kv_caches(kv_caches, num_blocks)
        tensors = list(kv_caches.values())
        self._register(regions, tensors)
        return regions

    def register_regions(self, regions: Sequence[Region], mem_type: str = "VRAM") -> None:
        raise TransferError("the IPC engine needs tensors: use register_kv_caches or "
                            "register_tensors")

    def register_tensors(self, regions: Sequence[Region], tensors: Sequence[Any]) -> None:
        """Register regions that lie inside the storages of ``tensors``."""
        self._register(list(regions), list(tensors))

    def _register(self, regions: list[Region], tensors: list[Any]) -> None:
        torch = self._torch
        with self._lock:
            if self.regions:
                raise TransferError("regions already registered on this engine")
            storages: dict[int, _Storage] = {}
            for t in tensors:
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in storages:
                    flat = torch.empty(0, dtype=torch.uint8, device=t.device)
                    flat.set_(st, 0, (st.nbytes(),), (1,))
                    storages[ptr] = _Storage(ptr, st.nbytes(), flat)
            self._storages = list(storages.values())
            self.device = tensors[0].device
            self.mem_type = "VRAM" if self.device.type == "cuda" else "DRAM"
            self._views = [self._view(self._storages, r.base_addr, r) for r in regions]
            self.regions = regions
            self._local_nblocks = min(r.num_blocks for r in regions)
            self._all_layers = tuple(sorted({r.layer for r in regions}))
            if self.use_triton is None:
                from .ipc_kernels import triton_available
                self.use_triton = self.device.type == "cuda" and triton_available()
            if self.device.type == "cuda":
                self._init_device_path()
                self._warm_kernels()

    def _warm_kernels(self) -> None:
        """Compile the block-copy kernel for this cache's geometry now (engine start-up),
        not at the first peer's handshake: a same-model peer's plan then finds it in
        Triton's cache instead of JIT-compiling (~1 s) in front of the first request."""
        me = SimpleNamespace(info=SimpleNamespace(name=self.name, regions=self.regions),
                             bases=[v.data_ptr() for v in self._views], views=self._views)
        try:
            self._build_plan(me, "READ", None, None, None)
        except TransferError:
            pass  # no kernel for this geometry: the torch path needs none

    def _view(self, storages: Sequence[_Storage], addr: int, r: Region) -> Any:
        for s in storages:
            if s.ptr <= addr and addr + (r.num_blocks - 1) * r.block_stride + r.block_len \
                    <= s.ptr + s.nbytes:
                return self._torch.as_strided(s.tensor, (r.num_blocks, r.block_len),
                                              (r.block_stride, 1), addr - s.ptr)
        raise UnregisteredMemoryError(
            f"region {r.name!r} at {addr:#x} is outside the registered allocations")

    # ------------------------------------------------------------ peers
    def local_info(self) -> PeerInfo:
        if not self.regions:
            raise UnregisteredMemoryError("no memory registered: call register_* first")
        handles = b""
        if self.mem_type == "VRAM":
            handles = self._export_handles()
        return PeerInfo(name=self.name, backend=self.backend, mem_type=self.mem_type,
                        regions=list(self.regions), ipc_handles=handles,
                        device_id=self.regions[0].device_id)

    def add_peer(self, info: PeerInfo) -> str:
        with self._lock:
            if info.name in _LOCAL_ENGINES and _LOCAL_ENGINES[info.name] is not self \
                    and info.ipc_handles == _LOCAL_ENGINES[info.name]._handles:
                # a peer of this very process (tests): its memory is ours already
                owner = _LOCAL_ENGINES[info.name]
                storages = [_Storage(s.ptr, s.nbytes, s.tensor) for s in owner._storages]
            elif info.ipc_handles:
                storages = self._open_handles(info)
            else:
                owner = _LOCAL_ENGINES.get(info.name)
                if owner is None:
                    raise TransferError(
                        f"peer {info.name!r} sent no CUDA IPC handles and is not in this "
                        f"process (IPC needs CUDA memory on the same host)")
                storages = [_Storage(s.ptr, s.nbytes, s.tensor) for s in owner._storages]
            views, bases = [], []
            for r in info.regions:
                v = self._view_remote(storages, r)
                views.append(v)
                bases.append(v.data_ptr())
            mp = _MappedPeer(info, storages, bases, views)
            self._peers[info.name] = mp
            if self.regions and self.device.type == "cuda":
                # handshake-time work: device pointer tables + compiled kernels
                for op in ("READ", "WRITE"):
                    try:
                        mp.plans.get((op, None, None, None), lambda k: self._build_plan(mp, *k))
                    except TransferError:
                        pass  # geometry mismatch: reported by the first transfer
            return info.name

    def _export_handles(self) -> bytes:
        """Our allocations as an :mod:`transfer.ipc_handles` message (made once)."""
        if self._handles:
            return self._handles
        from . import ipc_handles
        from .ipc_cuda import IpcMemApi, device_uuid
        api = self._ipc_api or IpcMemApi()
        self._ipc_api = api
        exports = []
        for s in self._storages:
            offset, handle = api.export(s.ptr)
            exports.append(ipc_handles.IpcExport(s.ptr, s.nbytes, offset, handle))
        self._handles = ipc_handles.encode(device_uuid(self.device), exports)
        return self._handles

    def _open_handles(self, info: PeerInfo) -> list[_Storage]:
        """Map a peer's exported allocations; fails unless they open on our GPUs."""
        from . import ipc_handles
        try:
            uuid_, exports = ipc_handles.decode(info.ipc_handles)
        except ipc_handles.IpcHandleError as e:
            raise TransferError(f"peer {info.name!r}: {e}") from e
        if self.device is None or self.device.type != "cuda":
            raise TransferError(f"peer {info.name!r} is CUDA memory; ours is not")
        from .ipc_cuda import IpcMemApi, byte_tensor, local_device_uuids
        if uuid_ not in local_device_uuids():
            raise TransferError(f"peer {info.name!r}: its GPU is not one of this host's")
        api = self._ipc_api or IpcMemApi()
        self._ipc_api = api
        storages, opened = [], []
        try:
            for e in exports:
                base = api.open(e.handle)
                opened.append(base)
                storages.append(_Storage(e.ptr, e.nbytes,
                                         byte_tensor(base + e.offset, e.nbytes, self.device)))
        except Exception as e:
            for base in opened:
                try:
                    api.close(base)
                except Exception:
                    pass
            raise TransferError(f"cannot map CUDA IPC handles of peer {info.name!r}: {e}") \
                from e
        self._mapped[info.name] = opened
        return storages

    def _unmap(self, name: str) -> None:
        for base in self._mapped.pop(name, ()):
            try:
                self._ipc_api.close(base)
            except Exception:
                pass

    def _view_remote(self, storages: Sequence[_Storage], r: Region) -> Any:
        for s in storages:
            if s.ptr <= r.base_addr < s.ptr + s.nbytes:
                local_addr = s.tensor.data_ptr() + (r.base_addr - s.ptr)
                local = _Storage(s.tensor.data_ptr(), s.nbytes, s.tensor)
                return self._view([local], local_addr, r)
        raise UnregisteredMemoryError(
            f"peer region {r.name!r} at {r.base_addr:#x} is not in an exported allocation")

    def remove_peer(self, name: str) -> None:
        with self._lock:
            if self._peers.pop(name, None) is None:
                raise UnknownPeerError(name, list(self._peers))
            if self._stream is not None:
                self._stream.synchronize()  # no copy may still touch the mapping
            self._unmap(name)

    # ------------------------------------------------------------ transfers
    def _submit(self, op: str, peer: str, local_ids: Any, remote_ids: Any,
                layers: Iterable[int] | None, notif: bytes | str | None, request_id: str,
                local_slice: tuple[int, int] | None,
                remote_slice: tuple[int, int] | None) -> TransferHandle:
        t0 = time.perf_counter_ns()
        with self._lock:
            if not self.regions:
                raise UnregisteredMemoryError("no local memory registered on this engine")
            p = self._peer(peer)
            lids, rids = self._checked_ids(p, local_ids, remote_ids, self._local_nblocks,
                                           p.info.num_blocks)
            n = lids.size
            lk = None if layers is None else tuple(layers)
            if lk is not None and lk == self._all_layers:
                lk = None
            key = (op, lk, local_slice, remote_slice)
            plan = p.plans.get(key, lambda k: self._build_plan(p, *k))
            sids, dids = (rids, lids) if op == "READ" else (lids, rids)
            slot = seq = None
            if plan.groups is not None:  # fast path: one H2D + one launch per group
                slot, seq = self._take_slot(n)
                h = slot.host
                h[0:2 * n:2] = sids
                h[1:2 * n:2] = dids
                t1 = time.perf_counter_ns()
                ops, stream = self._ops, self._stream_handle
                rec = stream if self._driver else self._stream
                ops.ensure_context()  # this thread may not have used CUDA yet
                self._wait_for_compute()
                if slot.ev_start is not None:
                    ops.record(slot.ev_start, rec)
                if self._driver:
                    ops.h2d(slot.dev_ptr, slot.host_ptr, 8 * n, stream)
                else:
                    with self._torch.cuda.stream(self._stream):
                        slot.dev_view[:2 * n].copy_(slot.host_view[:2 * n], non_blocking=True)
                for g in plan.groups:
                    g.launch(n, slot.dev_ptr, slot.dev_view, stream)
                ops.record(slot.ev, rec)
                slot.inflight = True
            else:
                t1 = time.perf_counter_ns()
                self._copy_torch(plan, sids, dids)
                if self._stream is not None:
                    slot, seq = self._take_slot(0)
                    rec = self._stream_handle if self._driver else self._stream
                    if slot.ev_start is not None:  # device time of this path: not timed
                        self._ops.record(slot.ev_start, rec)
                    self._ops.record(slot.ev, rec)
                    slot.inflight = True
            t2 = time.perf_counter_ns()
        stats = TransferStats(
            transfer_id=new_transfer_id(), request_id=request_id, peer=peer, op=op,
            backend=self.backend + ("-triton" if plan.groups is not None else "-torch"),
            bytes=plan.bytes_per_block * n, descriptors=plan.nregions * n, num_blocks=n,
            num_layers=plan.nlayers, prepare_us=(t1 - t0) / 1e3, post_us=(t2 - t1) / 1e3)
        h = TransferHandle(stats=stats, native=(slot, seq) if slot is not None else None,
                           t_submit_ns=t0, notif=as_bytes(notif))
        if slot is None:
            self._complete(h)
        return h

    # ------------------------------------------------------------ completion
    def poll(self, handle: TransferHandle) -> bool:
        if handle.done:
            if handle.stats.state == "ERR":
                raise TransferFailedError(handle.stats.error)
            return True
        slot, seq = handle.native
        if slot.seq == seq:  # else the slot was reused: this transfer completed before
            try:
                ready = self._ops.query(slot.ev)
            except Exception as e:  # CUDA error surfaced by the event
                handle.stats.state, handle.stats.error, handle.done = "ERR", str(e), True
                self._publish(handle.stats)
                raise TransferFailedError(
                    f"IPC copy with {handle.stats.peer!r} failed: {e}") from e
            if not ready:
                return False
            if slot.ev_start is not None and slot.seq == seq:
                try:
                    handle.stats.device_us = 1e3 * self._ops.elapsed_ms(slot.ev_start, slot.ev)
                except Exception:
                    pass
        self._complete(handle)
        return True

    def wait(self, handle: TransferHandle, timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
             ) -> TransferStats:
        """Spin on the completion event (copies take µs to ms), then back off."""
        t_end = time.perf_counter() + timeout_s
        t_spin = time.perf_counter() + 0.005
        while not self.poll(handle):
            now = time.perf_counter()
            if now > t_end:
                self._on_timeout(handle)
                raise TransferTimeoutError(
                    f"transfer {handle.stats.transfer_id} ({handle.stats.op} "
                    f"{handle.stats.bytes} B, peer {handle.stats.peer!r}, request "
                    f"{handle.request_id!r}) not done after {timeout_s:.3f} s")
            if now > t_spin:
                time.sleep(0.00005)
        return handle.stats

    def _complete(self, h: TransferHandle) -> None:
        h.stats.transfer_us = (time.perf_counter_ns() - h.t_submit_ns) / 1e3
        h.stats.state = "DONE"
        h.done = True
        h.native = None
        if h.notif:
            self._notify(h.stats.peer, h.notif)
        self._publish(h.stats)

    # ------------------------------------------------------------ notifications
    def _notify(self, peer: str, msg: bytes) -> None:
        if self.notifier is not None:
            self.notifier(peer, msg)
            return
        owner = _LOCAL_ENGINES.get(peer)
        if owner is None:
            raise TransferFailedError(f"no notification channel to peer {peer!r}")
        owner.deliver_notif(self.name, msg)

    def deliver_notif(self, sender: str, msg: bytes) -> None:
        """Queue a notification from ``sender`` (the control plane calls this)."""
        with self._inbox_lock:
            self._inbox[sender].append(msg)

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        with self._inbox_lock:
            out = dict(self._inbox)
            self._inbox.clear()
        return out

    def send_notif(self, peer: str, msg: bytes | str) -> None:
        self._peer(peer)
        self._notify(peer, as_bytes(msg))

    def close(self) -> None:
        with self._lock:
            self._peers.clear()
            if self._stream is not None:
                self._stream.synchronize()
            for name in list(self._mapped):
                self._unmap(name)
            _LOCAL_ENGINES.pop(self.name, None)
