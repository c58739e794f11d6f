"""Same-host fast path: CUDA IPC mapping of the peer's KV cache + batched copies.

At handshake each side exports one CUDA IPC handle per cache allocation
(``torch.multiprocessing.reductions.reduce_tensor`` on a byte view of the whole
storage); the peer maps them once and translates the peer's region addresses into
its own address space. A READ is then one Triton launch per layer group (all layers
of equal geometry) reading the peer's blocks into ours; a WRITE scatters ours into
the peer's. Completion = a CUDA event on a private stream; notifications go through
``notifier(peer, msg)`` (the NIXL agent, or the control plane) once the copy is done.

``ipc_handles`` are pickled torch reductions: exchange them only between trusted
processes of one deployment. CPU tensors work in one process (tests, the torch
fallback): peers registered in this process are mapped directly.
"""

from __future__ import annotations

import pickle
import threading
import time
import uuid
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .engine import (PeerInfo, TransferEngine, TransferHandle, TransferStats, as_bytes,
                     new_transfer_id)
from .errors import (BackendUnavailableError, BlockIdError, TransferError,
                     TransferFailedError, UnknownPeerError, UnregisteredMemoryError)
from .layout import Region, region_indices, regions_from_kv_caches, validate_block_ids

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
    tables: dict = field(default_factory=dict)  # cached device pointer tables


class IpcTransferEngine(TransferEngine):
    """:class:`TransferEngine` for two CUDA processes on one host (or one process)."""

    backend = "ipc"

    def __init__(self, name: str | None = None, *, use_triton: bool | None = None,
                 notifier: Notifier | None = None, chunk_words: int = 1024) -> None:
        super().__init__(name or f"pdx-ipc-{uuid.uuid4().hex[:12]}")
        self._torch = _torch()
        self.use_triton = use_triton
        self.notifier = notifier
        self.chunk_words = chunk_words
        self._storages: list[_Storage] = []
        self._views: list[Any] = []
        self._peers: dict[str, _MappedPeer] = {}
        self._inbox: dict[str, list[bytes]] = defaultdict(list)
        self._inbox_lock = threading.Lock()
        self._stream: Any = None
        self.device: Any = None
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
            if self.device.type == "cuda":
                self._stream = torch.cuda.Stream(device=self.device)
            if self.use_triton is None:
                from .ipc_kernels import triton_available
                self.use_triton = self.device.type == "cuda" and triton_available()

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
            from torch.multiprocessing.reductions import reduce_tensor
            handles = pickle.dumps([(s.ptr, s.nbytes, reduce_tensor(s.tensor))
                                    for s in self._storages])
        return PeerInfo(name=self.name, backend=self.backend, mem_type=self.mem_type,
                        regions=list(self.regions), ipc_handles=handles,
                        device_id=self.regions[0].device_id)

    def add_peer(self, info: PeerInfo) -> str:
        with self._lock:
            if info.ipc_handles:
                try:
                    raw = pickle.loads(info.ipc_handles)
                    storages = []
                    for ptr, nbytes, (fn, args) in raw:
                        storages.append(_Storage(ptr, nbytes, fn(*args)))
                except Exception as e:
                    raise TransferError(
                        f"cannot map CUDA IPC handles of peer {info.name!r}: {e}") from e
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
            self._peers[info.name] = _MappedPeer(info, storages, bases, views)
            return info.name

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

    def peers(self) -> list[str]:
        return list(self._peers)

    def _peer(self, name: str) -> _MappedPeer:
        try:
            return self._peers[name]
        except KeyError:
            raise UnknownPeerError(name, list(self._peers)) from None

    # ------------------------------------------------------------ transfers
    def read_blocks(self, peer: str, local_block_ids: Any, remote_block_ids: Any, *,
                    layers: Iterable[int] | None = None, notif: bytes | str | None = None,
                    request_id: str = "", local_slice: tuple[int, int] | None = None,
                    remote_slice: tuple[int, int] | None = None) -> TransferHandle:
        return self._submit("READ", peer, local_block_ids, remote_block_ids, layers, notif,
                            request_id, local_slice, remote_slice)

    def write_blocks(self, peer: str, local_block_ids: Any, remote_block_ids: Any, *,
                     layers: Iterable[int] | None = None, notif: bytes | str | None = None,
                     request_id: str = "", local_slice: tuple[int, int] | None = None,
                     remote_slice: tuple[int, int] | None = None) -> TransferHandle:
        return self._submit("WRITE", peer, local_block_ids, remote_block_ids, layers, notif,
                            request_id, local_slice, remote_slice)

    def _submit(self, op: str, peer: str, local_ids: Any, remote_ids: Any,
                layers: Iterable[int] | None, notif: bytes | str | None, request_id: str,
                local_slice: tuple[int, int] | None,
                remote_slice: tuple[int, int] | None) -> TransferHandle:
        torch = self._torch
        t0 = time.perf_counter_ns()
        with self._lock:
            if not self.regions:
                raise UnregisteredMemoryError("no local memory registered on this engine")
            p = self._peer(peer)
            lids = validate_block_ids(local_ids, min(r.num_blocks for r in self.regions),
                                      "local block ids")
            rids = validate_block_ids(remote_ids, p.info.num_blocks,
                                      f"remote block ids (peer {peer!r})")
            if lids.size != rids.size:
                raise BlockIdError(f"{lids.size} local block ids but {rids.size} remote ones")
            layer_list = None if layers is None else tuple(int(x) for x in layers)
            lreg = region_indices(self.regions, layer_list)
            rreg = region_indices(p.info.regions, layer_list)
            if lreg.size != rreg.size:
                raise TransferError(f"peer {peer!r} has {rreg.size} regions for these "
                                    f"layers, we have {lreg.size}")
            # source/destination sides
            if op == "READ":
                src = (p.info.regions, p.bases, p.views, rreg, rids, remote_slice)
                dst = (self.regions, [v.data_ptr() for v in self._views], self._views,
                       lreg, lids, local_slice)
            else:
                src = (self.regions, [v.data_ptr() for v in self._views], self._views,
                       lreg, lids, local_slice)
                dst = (p.info.regions, p.bases, p.views, rreg, rids, remote_slice)
            nbytes = 0
            stream_ctx = torch.cuda.stream(self._stream) if self._stream is not None \
                else _nullctx()
            t1 = time.perf_counter_ns()
            with stream_ctx:
                nbytes = self._launch(p, op, layer_list, src, dst)
                event = None
                if self._stream is not None:
                    event = torch.cuda.Event()
                    event.record(self._stream)
            t2 = time.perf_counter_ns()
        stats = TransferStats(
            transfer_id=new_transfer_id(), request_id=request_id, peer=peer, op=op,
            backend=self.backend + ("-triton" if self.use_triton else "-torch"),
            bytes=nbytes, descriptors=int(lreg.size * lids.size), num_blocks=int(lids.size),
            num_layers=len({self.regions[i].layer for i in lreg}),
            prepare_us=(t1 - t0) / 1e3, post_us=(t2 - t1) / 1e3)
        h = TransferHandle(stats=stats, native=event, t_submit_ns=t0, notif=as_bytes(notif))
        if event is None:
            self._complete(h)
        return h

    def _launch(self, p: _MappedPeer, op: str, layer_key: Any, src: tuple, dst: tuple) -> int:
        torch = self._torch
        s_regs, s_bases, s_views, s_idx, s_ids, s_sl = src
        d_regs, d_bases, d_views, d_idx, d_ids, d_sl = dst
        nbytes = 0
        if not self.use_triton:
            sid = torch.from_numpy(s_ids).to(self.device)
            did = torch.from_numpy(d_ids).to(self.device)
            for si, di in zip(s_idx, d_idx):
                sv, dv = _slice(s_views[si], s_sl), _slice(d_views[di], d_sl)
                if sv.shape[1] != dv.shape[1]:
                    raise TransferError(f"block sizes differ: {sv.shape[1]} vs {dv.shape[1]}")
                dv.index_copy_(0, did, sv.index_select(0, sid))
                nbytes += sv.shape[1] * s_ids.size
            return nbytes
        from .ipc_kernels import copy_blocks_triton
        # group layers of equal geometry: one launch per group
        key = (op, layer_key, s_sl, d_sl)
        groups = p.tables.get(key)
        if groups is None:
            groups = self._build_tables(s_regs, s_bases, s_idx, s_sl, d_regs, d_bases, d_idx,
                                        d_sl)
            p.tables[key] = groups
        ids = torch.from_numpy(np.stack([s_ids, d_ids]).astype(np.int32)).to(
            self.device, non_blocking=True)
        for g in groups:
            copy_blocks_triton(g["src_tab"], g["dst_tab"], ids[0], ids[1], g["src_stride"],
                               g["dst_stride"], g["src_off"], g["dst_off"], g["nwords"],
                               g["aligned16"], self.chunk_words)
            nbytes += g["nwords"] * 8 * g["nlayers"] * s_ids.size
        return nbytes

    def _build_tables(self, s_regs, s_bases, s_idx, s_sl, d_regs, d_bases, d_idx, d_sl):
        torch = self._torch
        groups: dict[tuple, dict] = {}
        for si, di in zip(s_idx, d_idx):
            sr, dr = s_regs[si], d_regs[di]
            soff, slen = s_sl if s_sl else (0, sr.block_len)
            doff, dlen = d_sl if d_sl else (0, dr.block_len)
            if slen != dlen:
                raise TransferError(f"block sizes differ: {slen} vs {dlen} bytes")
            vals = (s_bases[si], d_bases[di], sr.block_stride, dr.block_stride, soff, doff, slen)
            if any(v % 8 for v in vals):
                raise TransferError("IPC kernel needs 8-byte aligned blocks; use_triton=False")
            aligned16 = all(v % 16 == 0 for v in vals)
            k = (sr.block_stride, dr.block_stride, soff, doff, slen)
            g = groups.setdefault(k, {"src": [], "dst": [], "aligned16": True})
            g["src"].append(s_bases[si])
            g["dst"].append(d_bases[di])
            g["aligned16"] &= aligned16
        out = []
        for (ss, ds, so, do, ln), g in groups.items():
            out.append({
                "src_tab": torch.tensor(g["src"], dtype=torch.int64, device=self.device),
                "dst_tab": torch.tensor(g["dst"], dtype=torch.int64, device=self.device),
                "src_stride": ss // 8, "dst_stride": ds // 8, "src_off": so // 8,
                "dst_off": do // 8, "nwords": ln // 8, "nlayers": len(g["src"]),
                "aligned16": g["aligned16"],
            })
        return out

    def poll(self, handle: TransferHandle) -> bool:
        if handle.done:
            if handle.stats.state == "ERR":
                raise TransferFailedError(handle.stats.error)
            return True
        try:
            ready = handle.native.query()
        except Exception as e:  # CUDA error surfaced by the event
            handle.stats.state, handle.stats.error, handle.done = "ERR", str(e), True
            self._publish(handle.stats)
            raise TransferFailedError(f"IPC copy with {handle.stats.peer!r} failed: {e}") from e
        if not ready:
            return False
        self._complete(handle)
        return True

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
            _LOCAL_ENGINES.pop(self.name, None)


def _slice(view: Any, sl: tuple[int, int] | None) -> Any:
    return view if sl is None else view.narrow(1, sl[0], sl[1])


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None

