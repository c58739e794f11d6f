"""Copy plans and id staging of the CUDA-IPC engine (:mod:`transfer.ipc`).

A plan is everything a transfer of one (op, layers, slices) with one peer needs --
per region pair the source/destination views, and on CUDA the word-copy kernels'
device tables (:mod:`transfer.ipc_kernels`) -- built once per peer and kept in its
:class:`~transfer.engine.PlanCache`. Id staging: pinned host + device slots that
carry one transfer's ``(src, dst)`` block ids to the kernel, reused round-robin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import TransferError
from .ipc_kernels import next_pow2
from .blocks import region_indices


@dataclass
class IpcPlan:
    """Everything a transfer of one (op, layers, slices) needs, built once per peer."""

    groups: list | None  # GatherLaunchers (device tables + compiled kernel); None: torch
    src_views: list
    dst_views: list
    bytes_per_block: int  # over all regions of the plan
    nregions: int
    nlayers: int


@dataclass
class _Slot:
    """Pinned staging + device copy of one transfer's (src, dst) id pairs, + its event."""

    host: Any  # numpy int32 view of pinned memory
    host_view: Any  # the same as a torch tensor
    host_ptr: int
    dev_view: Any
    dev_ptr: int
    ev: Any  # completion event (recorded after the copy)
    ev_start: Any = None  # only when timing device work
    seq: int = 0
    inflight: bool = False


_NSLOTS = 16


def plan_groups(pairs: Sequence[tuple[int, int, int, int, int, int, int]]) -> list | None:
    """Group ``(src_base, dst_base, src_stride, dst_stride, src_off, dst_off, length)``
    (bytes) by geometry for the word-copy kernel; ``None`` if any is not 8-byte aligned.
    Returned strides/offsets/lengths are in 8-byte words."""
    groups: dict[tuple, dict] = {}
    for sb, db, ss, ds, so, do, ln in pairs:
        vals = (sb, db, ss, ds, so, do, ln)
        if any(v % 8 for v in vals):
            return None
        g = groups.setdefault((ss, ds, so, do, ln), {"src": [], "dst": [], "aligned16": True})
        g["src"].append(sb)
        g["dst"].append(db)
        g["aligned16"] &= all(v % 16 == 0 for v in vals)
    return [{"src": g["src"], "dst": g["dst"], "src_stride": ss // 8, "dst_stride": ds // 8,
             "src_off": so // 8, "dst_off": do // 8, "nwords": ln // 8,
             "aligned16": g["aligned16"]}
            for (ss, ds, so, do, ln), g in groups.items()]


class IpcPlanning:
    """Plan building, torch fallback copies and id staging; a part of
    :class:`transfer.ipc.IpcTransferEngine` (uses its regions, views, stream, ops)."""

    # ------------------------------------------------------------ plans (cached per peer)
    def _build_plan(self, p: Any, op: str, layer_key: Any,
                    local_slice: tuple[int, int] | None,
                    remote_slice: tuple[int, int] | None) -> IpcPlan:
        torch = self._torch
        lreg = region_indices(self.regions, layer_key)
        rreg = region_indices(p.info.regions, layer_key)
        if lreg.size != rreg.size:
            raise TransferError(f"peer {p.info.name!r} has {rreg.size} regions for these "
                                f"layers, we have {lreg.size}")
        local = (self.regions, [v.data_ptr() for v in self._views], self._views, lreg,
                 local_slice)
        remote = (p.info.regions, p.bases, p.views, rreg, remote_slice)
        src, dst = (remote, local) if op == "READ" else (local, remote)
        s_regs, s_bases, s_views, s_idx, s_sl = src
        d_regs, d_bases, d_views, d_idx, d_sl = dst
        pairs, sv, dv, per_block = [], [], [], 0
        for si, di in zip(s_idx, d_idx):
            sr, dr = s_regs[si], d_regs[di]
            soff, slen = s_sl if s_sl else (0, sr.block_len)
            doff, dlen = d_sl if d_sl else (0, dr.block_len)
            if slen != dlen:
                raise TransferError(f"block sizes differ: {slen} vs {dlen} bytes")
            pairs.append((s_bases[si], d_bases[di], sr.block_stride, dr.block_stride, soff,
                          doff, slen))
            sv.append(_slice(s_views[si], s_sl))
            dv.append(_slice(d_views[di], d_sl))
            per_block += slen
        groups = None
        specs = plan_groups(pairs)
        if self.use_triton and self.device.type == "cuda" and specs is not None:
            from .ipc_kernels import GatherLauncher
            groups = []
            slot, _ = self._take_slot(1)
            for g in specs:
                st = torch.tensor(g["src"], dtype=torch.int64, device=self.device)
                dt = torch.tensor(g["dst"], dtype=torch.int64, device=self.device)
                gl = GatherLauncher(st, dt, g["src_stride"], g["dst_stride"], g["src_off"],
                                    g["dst_off"], g["nwords"], g["aligned16"],
                                    self.chunk_words, self.num_warps)
                gl.compile(slot.dev_view)
                groups.append(gl)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return IpcPlan(groups=groups, src_views=sv, dst_views=dv, bytes_per_block=per_block,
                     nregions=len(pairs), nlayers=len({self.regions[i].layer for i in lreg}))

    def _copy_torch(self, plan: IpcPlan, sids: np.ndarray, dids: np.ndarray) -> None:
        torch = self._torch
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else nullctx()
        if self._stream is not None:
            self._wait_for_compute()
        with ctx:
            sid = torch.from_numpy(sids).to(self.device)
            did = torch.from_numpy(dids).to(self.device)
            for sv, dv in zip(plan.src_views, plan.dst_views):
                dv.index_copy_(0, did, sv.index_select(0, sid))

    def _wait_for_compute(self) -> None:
        """Order the copy after the work already queued on the caller's stream.

        From ``save_kv_layer`` that is the layer's cache write, still running on the
        compute stream: the copy stream waits for it on the device (an event), so a
        push never sends half-written KV and the host never blocks the forward pass.
        """
        cur = self._torch.cuda.current_stream(self.device)
        if self._driver:
            self._ops.record(self._dep_ev, int(cur.cuda_stream))
            self._ops.stream_wait(self._stream_handle, self._dep_ev)
        else:
            self._stream.wait_stream(cur)

    # ------------------------------------------------------------ id staging slots
    def _init_device_path(self) -> None:
        from .ipc_cuda import DriverOps, make_ops
        torch = self._torch
        self._stream = torch.cuda.Stream(device=self.device)
        self._stream_handle = int(self._stream.cuda_stream)
        self._ops = make_ops(self.device)
        self._driver = isinstance(self._ops, DriverOps)
        self._dep_ev = self._ops.new_event(False) if self._driver else None
        self._alloc_slots(256)

    def _alloc_slots(self, cap: int) -> None:
        torch = self._torch
        for s in self._slots:  # growing: everything staged so far must be consumed
            if s.inflight:
                self._ops.synchronize(s.ev)
            s.inflight = False
        words = 2 * cap
        host = torch.empty(_NSLOTS * words, dtype=torch.int32, pin_memory=True)
        dev = torch.empty(_NSLOTS * words, dtype=torch.int32, device=self.device)
        host_np = host.numpy()
        old = self._slots
        self._slots = []
        for i in range(_NSLOTS):
            o = i * words
            hv, dvw = host[o:o + words], dev[o:o + words]
            ev = old[i].ev if old else self._ops.new_event(self.time_device)
            evs = old[i].ev_start if old else (
                self._ops.new_event(True) if self.time_device else None)
            seq = old[i].seq if old else 0
            self._slots.append(_Slot(host=host_np[o:o + words], host_view=hv,
                                     host_ptr=hv.data_ptr(), dev_view=dvw,
                                     dev_ptr=dvw.data_ptr(), ev=ev, ev_start=evs, seq=seq))
        self._slot_buffers = (host, dev)
        self._slot_cap = cap

    def _take_slot(self, n: int) -> tuple["_Slot", int]:
        if n > self._slot_cap:
            self._alloc_slots(next_pow2(n))
        i = self._next_slot
        self._next_slot = (i + 1) % _NSLOTS
        s = self._slots[i]
        if s.inflight:  # staged ids of an older transfer may still be read by its H2D
            if not self._ops.query(s.ev):
                self._ops.synchronize(s.ev)
            s.inflight = False
        s.seq += 1
        return s, s.seq


def _slice(view: Any, sl: tuple[int, int] | None) -> Any:
    return view if sl is None else view.narrow(1, sl[0], sl[1])


class nullctx:
    """A no-op context manager (no CUDA stream to enter)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None

