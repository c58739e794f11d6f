"""Backend selection (``KV_TRANSFER_PROTOCOL``) and the routing engine.

* ``rdma``: NIXL/UCX, UCX picks transports (default for CPU memory).
* ``tcp``: NIXL with UCX forced onto TCP (``UCX_TLS=tcp,self``).
* ``ipc``: CUDA IPC + batched copies; peers must be CUDA on this host.
* ``auto``: IPC for peers that are CUDA on the same host (proven in the handshake,
  ``transfer.hostproof``), NIXL otherwise.

:func:`create_engine` returns one :class:`~transfer.engine.TransferEngine` whatever
the choice, so callers stay backend-agnostic.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from .engine import PeerInfo, TransferEngine, TransferHandle, host_id
from .errors import BackendUnavailableError, TransferError, UnknownPeerError
from .layout import Region

PROTOCOLS = ("rdma", "tcp", "ipc", "auto")
ENV_PROTOCOL = "KV_TRANSFER_PROTOCOL"


def resolve_protocol(protocol: str | None = None) -> str:
    """The protocol to use: argument, else ``$KV_TRANSFER_PROTOCOL``, else ``auto``."""
    p = (protocol or os.environ.get(ENV_PROTOCOL) or "auto").strip().lower()
    if p not in PROTOCOLS:
        raise ValueError(f"{ENV_PROTOCOL}={p!r}: expected one of {', '.join(PROTOCOLS)}")
    return p


def peer_backend(protocol: str, local: PeerInfo, remote: PeerInfo) -> str:
    """``"ipc"`` or ``"nixl"`` for one peer, given both sides' info."""
    same_host_cuda = (same_host(local, remote) and local.mem_type == "VRAM"
                      and remote.mem_type == "VRAM" and bool(remote.ipc_handles))
    if protocol == "ipc":
        if not same_host_cuda:
            raise TransferError(
                f"protocol ipc needs a CUDA peer on this host; peer {remote.name!r} is "
                f"{remote.mem_type} on host {remote.host_id!r} (we: {local.host_id!r})")
        return "ipc"
    if protocol == "auto" and same_host_cuda:
        return "ipc"
    return "nixl"


def same_host(local: PeerInfo, remote: PeerInfo) -> bool:
    """Whether ``remote`` is on this host: its handshake's verified host proof; the
    claimed ``host_id`` counts only for info that never crossed the wire."""
    if remote.same_host is not None:
        return remote.same_host
    return local.host_id == remote.host_id


def create_engine(protocol: str | None = None, name: str | None = None,
                  device: str = "cpu", **nixl_kw: Any) -> TransferEngine:
    """Engine for ``protocol`` (see module doc); ``device`` is where the cache lives."""
    p = resolve_protocol(protocol)
    if p in ("rdma", "tcp") or (p == "auto" and not device.startswith("cuda")):
        from .nixl_engine import NixlTransferEngine
        return NixlTransferEngine(name, protocol="tcp" if p == "tcp" else "rdma", **nixl_kw)
    return RoutingTransferEngine(name, protocol=p, **nixl_kw)


class RoutingTransferEngine(TransferEngine):
    """CUDA caches: CUDA IPC for same-host peers, NIXL for the others.

    Notifications of IPC transfers travel over the NIXL agent when NIXL is present
    (``ipc`` mode also works without NIXL; then wire ``ipc.notifier`` yourself).
    """

    backend = "multi"

    def __init__(self, name: str | None = None, *, protocol: str = "auto",
                 **nixl_kw: Any) -> None:
        from .ipc import IpcTransferEngine
        self.nixl = None
        try:
            from .nixl_engine import NixlTransferEngine
            self.nixl = NixlTransferEngine(name, **nixl_kw)
        except BackendUnavailableError:
            if protocol != "ipc":
                raise
        super().__init__(self.nixl.name if self.nixl else (name or ""))
        notifier = self.nixl.send_notif if self.nixl else None
        # device timing (two CUDA events per copy): the KV move's own time, apart from
        # when a later step sees it done (the connector's stages_ms["device_copy"])
        self.ipc = IpcTransferEngine(self.name or None, notifier=notifier, time_device=True)
        self.name = self.ipc.name if not self.name else self.name
        self.protocol = protocol
        self._route: dict[str, TransferEngine] = {}

    def _engines(self) -> list[TransferEngine]:
        return [e for e in (self.nixl, self.ipc) if e is not None]

    def register_regions(self, regions: Sequence[Region], mem_type: str) -> None:
        raise TransferError("RoutingTransferEngine needs tensors: use register_kv_caches")

    def register_kv_caches(self, kv_caches: Mapping[str, Any],
                           num_blocks: int | None = None) -> list[Region]:
        regions = self.ipc.register_kv_caches(kv_caches, num_blocks)
        if self.nixl is not None:
            self.nixl.register_kv_caches(kv_caches, num_blocks)
        self.regions, self.mem_type = regions, self.ipc.mem_type
        return regions

    def local_info(self) -> PeerInfo:
        ipc = self.ipc.local_info()
        meta = self.nixl.local_info().agent_metadata if self.nixl else b""
        return PeerInfo(name=self.name, backend=self.backend, mem_type=ipc.mem_type,
                        regions=ipc.regions, host_id=host_id(), agent_metadata=meta,
                        ipc_handles=ipc.ipc_handles, device_id=ipc.device_id)

    def add_peer(self, info: PeerInfo) -> str:
        choice = peer_backend(self.protocol, self.local_info(), info)
        if self.nixl is not None and info.agent_metadata:
            self.nixl.add_peer(info)  # always: notifications, and the fallback path
        if choice == "ipc":
            try:  # the handles opening on our GPU is what proves "same host"
                self.ipc.add_peer(info)
            except TransferError:
                if self.protocol == "ipc" or self.nixl is None:
                    raise
                choice = "nixl"
        if choice == "ipc":
            self._route[info.name] = self.ipc
        else:
            if self.nixl is None:
                raise BackendUnavailableError("peer needs NIXL but NIXL is unavailable")
            self._route[info.name] = self.nixl
        return info.name

    def backend_for(self, peer: str) -> str:
        """Which backend serves ``peer`` (``"ipc"`` or ``"nixl"``)."""
        return self._engine(peer).backend

    def _engine(self, peer: str) -> TransferEngine:
        try:
            return self._route[peer]
        except KeyError:
            raise UnknownPeerError(peer, list(self._route)) from None

    def remove_peer(self, name: str) -> None:
        self._engine(name)
        for e in self._engines():
            if name in e.peers():
                e.remove_peer(name)
        del self._route[name]

    def peers(self) -> list[str]:
        return list(self._route)

    def read_blocks(self, peer: str, local_block_ids: Any, remote_block_ids: Any,
                    **kw: Any) -> TransferHandle:
        h = self._engine(peer).read_blocks(peer, local_block_ids, remote_block_ids, **kw)
        h.extra = self._engine(peer)
        return h

    def write_blocks(self, peer: str, local_block_ids: Any, remote_block_ids: Any,
                     **kw: Any) -> TransferHandle:
        h = self._engine(peer).write_blocks(peer, local_block_ids, remote_block_ids, **kw)
        h.extra = self._engine(peer)
        return h

    def poll(self, handle: TransferHandle) -> bool:
        return handle.extra.poll(handle)

    def released(self, handle: TransferHandle) -> bool:
        eng = handle.extra  # the sub-engine that moves it
        return eng.released(handle) if isinstance(eng, TransferEngine) else handle.done

    def _on_timeout(self, handle: TransferHandle) -> None:
        eng = handle.extra
        if isinstance(eng, TransferEngine):
            eng._on_timeout(handle)

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for e in self._engines():
            for k, v in e.get_new_notifs().items():
                out.setdefault(k, []).extend(v)
        return out

    def send_notif(self, peer: str, msg: bytes | str) -> None:
        (self.nixl if self.nixl is not None else self._engine(peer)).send_notif(peer, msg)

    def add_stats_listener(self, fn: Any) -> None:
        for e in self._engines():
            e.add_stats_listener(fn)

    def close(self) -> None:
        for e in self._engines():
            e.close()


