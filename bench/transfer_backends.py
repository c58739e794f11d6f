"""``pdbench transfer``: one backend bound to the initiator's cache and the target peer.

Our engines (``nixl``, ``ipc``, ``ipc-torch``) are driven through the public
:class:`~transfer.engine.TransferEngine` API; ``raw-nixl``, ``torch`` and ``memcpy``
are the baselines (see ``bench.transfer``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.transfer_plan import Plan


class Runner:
    """One backend bound to the initiator's cache and the target peer."""

    def __init__(self, kind: str, plan: Plan, caches: dict, buf: Any, peer: Any) -> None:
        self.kind = kind
        self.buf = buf
        self.peer = peer
        self.plan = plan
        if kind == "nixl":
            from transfer.nixl_engine import NixlTransferEngine
            self.eng = NixlTransferEngine(f"bench-nixl-{os.getpid()}", protocol=plan.protocol)
            self.eng.register_kv_caches(caches)
            self.eng.add_peer(peer.info)
            if plan.prepare_only:
                self.eng.prepare_only()
        elif kind in ("ipc", "ipc-torch"):
            from transfer.ipc import IpcTransferEngine
            self.eng = IpcTransferEngine(f"bench-{kind}-{os.getpid()}",
                                         use_triton=(kind == "ipc"),
                                         time_device=(kind == "ipc"))
            self.eng.register_kv_caches(caches)
            self.eng.add_peer(peer.info)
        elif kind == "raw-nixl":
            from nixl._api import nixl_agent, nixl_agent_config
            self.agent = nixl_agent(f"bench-raw-{os.getpid()}",
                                    nixl_agent_config(backends=["UCX"]))
            nb = buf.shape[1]
            self.reg = self.agent.register_memory(
                [(buf.data_ptr(), buf.numel(), buf.device.index or 0, "")], plan.mem)
            self.remote = self.agent.add_remote_agent(peer.info.agent_metadata)
            self.local_regions = [(buf[i].data_ptr(), buf.shape[2]) for i in range(buf.shape[0])]
            self.remote_regions = [(r.base_addr, r.block_stride) for r in peer.info.regions]
            self.dev = buf.device.index or 0
            self.rdev = peer.info.device_id
            del nb
        elif kind == "torch":
            import torch
            self.src = torch.empty_like(buf).copy_(buf)
        elif kind == "memcpy":
            import torch
            self.flat_src = buf.reshape(-1)
            self.flat_dst = torch.empty_like(self.flat_src)
        self.block_len = buf.shape[2]

    def submit(self, op: str, layers: int, lids: Any, rids: Any) -> tuple[Any, float, float, int]:
        """Start one transfer: (handle, prepare_us, post_us, descriptors)."""
        if self.kind in ("nixl", "ipc", "ipc-torch"):
            fn = self.eng.read_blocks if op == "read" else self.eng.write_blocks
            h = fn(self.peer.name, lids, rids, layers=range(layers))
            return h, h.stats.prepare_us, h.stats.post_us, h.stats.descriptors
        if self.kind == "raw-nixl":
            t0 = time.perf_counter_ns()
            bl = self.block_len
            local = [(base + int(b) * bl, bl, self.dev)
                     for base, _ in self.local_regions[:layers] for b in lids]
            remote = [(base + int(b) * stride, bl, self.rdev)
                      for base, stride in self.remote_regions[:layers] for b in rids]
            ld = self.agent.get_xfer_descs(local, self.plan.mem)
            rd = self.agent.get_xfer_descs(remote, self.plan.mem)
            h = self.agent.initialize_xfer(op.upper(), ld, rd, self.remote)
            t1 = time.perf_counter_ns()
            if self.plan.prepare_only:
                self.agent.release_xfer_handle(h)
                return None, (t1 - t0) / 1e3, 0.0, len(local)
            st = self.agent.transfer(h)
            t2 = time.perf_counter_ns()
            if st == "ERR":
                raise RuntimeError("raw NIXL post failed")
            return h, (t1 - t0) / 1e3, (t2 - t1) / 1e3, len(local)
        import torch
        if self.kind == "memcpy":
            t0 = time.perf_counter_ns()
            nb = layers * len(lids) * self.block_len
            self.flat_dst[:nb].copy_(self.flat_src[:nb])
            ev = torch.cuda.Event() if self.buf.device.type == "cuda" else None
            if ev is not None:
                ev.record()
            t1 = time.perf_counter_ns()
            return ev, 0.0, (t1 - t0) / 1e3, 1
        # torch: in-process copy, no peer
        t0 = time.perf_counter_ns()
        dev = self.buf.device
        li = torch.as_tensor(lids, device=dev)
        ri = torch.as_tensor(rids, device=dev)
        t1 = time.perf_counter_ns()
        for l in range(layers):
            self.buf[l].index_copy_(0, li, self.src[l].index_select(0, ri))
        if dev.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
        else:
            ev = None
        t2 = time.perf_counter_ns()
        return ev, (t1 - t0) / 1e3, (t2 - t1) / 1e3, layers * len(lids)

    def wait(self, h: Any, timeout: float) -> None:
        if self.kind in ("nixl", "ipc", "ipc-torch"):
            self.eng.wait(h, timeout)
            return
        deadline = time.perf_counter() + timeout
        if self.kind == "raw-nixl":
            if h is None:  # --prepare-only: released unposted
                return
            while True:
                st = self.agent.check_xfer_state(h)
                if st == "DONE":
                    break
                if st == "ERR" or time.perf_counter() > deadline:
                    raise RuntimeError(f"raw NIXL transfer {st}")
            self.agent.release_xfer_handle(h)
            return
        if h is not None:
            while not h.query():
                if time.perf_counter() > deadline:
                    raise RuntimeError("torch copy timed out")

    def close(self) -> None:
        if self.kind in ("nixl", "ipc", "ipc-torch"):
            self.eng.close()
        elif self.kind == "raw-nixl":
            try:
                self.agent.remove_remote_agent(self.remote)
                self.agent.deregister_memory(self.reg)
            except Exception:
                pass
