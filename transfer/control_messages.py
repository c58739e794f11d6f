"""What the control plane carries, in Python: a rank's handshake content
(:class:`RankDescriptor`, its compatibility check and same-host proof) and push
targets (:class:`PushTarget`, kept in a :class:`PushRegistry` by push id). The gRPC
server and client are :mod:`transfer.control`."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from . import control_pb2 as pb
from . import hostproof
from .engine import PeerInfo
from .errors import HandshakeMismatchError
from .layout import Region

PROTOCOL_VERSION = 1

#: fields that must be equal on both sides of a handshake, in check order
COMPAT_FIELDS = ("protocol_version", "model_name", "dtype", "block_size", "kv_layout",
                 "num_layers", "num_kv_heads", "head_size", "is_mla")


@dataclass
class RankDescriptor:
    """One rank's handshake content: compatibility fields plus its :class:`PeerInfo`."""

    engine_id: str
    peer: PeerInfo
    model_name: str
    dtype: str
    block_size: int
    kv_layout: str = "HND"
    num_layers: int = 0
    num_kv_heads: int = 0
    head_size: int = 0
    is_mla: bool = False
    dp_rank: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    protocol_version: int = PROTOCOL_VERSION

    def to_proto(self) -> pb.RankInfo:
        p = self.peer
        return pb.RankInfo(
            protocol_version=self.protocol_version, engine_id=self.engine_id,
            dp_rank=self.dp_rank, tp_rank=self.tp_rank, tp_size=self.tp_size,
            model_name=self.model_name, dtype=self.dtype, block_size=self.block_size,
            kv_layout=self.kv_layout, host_id=p.host_id, agent_name=p.name,
            agent_metadata=p.agent_metadata, ipc_handles=p.ipc_handles,
            regions=[pb.Region(**r.to_dict()) for r in p.regions], mem_type=p.mem_type,
            backend=p.backend, num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
            head_size=self.head_size, is_mla=self.is_mla, device_id=p.device_id)

    @classmethod
    def from_proto(cls, m: pb.RankInfo) -> "RankDescriptor":
        regions = [Region(name=r.name, base_addr=r.base_addr, block_len=r.block_len,
                          block_stride=r.block_stride, num_blocks=r.num_blocks,
                          device_id=r.device_id, layer=r.layer) for r in m.regions]
        peer = PeerInfo(name=m.agent_name, backend=m.backend, mem_type=m.mem_type,
                        regions=regions, host_id=m.host_id, agent_metadata=m.agent_metadata,
                        ipc_handles=m.ipc_handles, device_id=m.device_id,
                        same_host=False)  # until a host proof is verified
        return cls(engine_id=m.engine_id, peer=peer, model_name=m.model_name, dtype=m.dtype,
                   block_size=m.block_size, kv_layout=m.kv_layout, num_layers=m.num_layers,
                   num_kv_heads=m.num_kv_heads, head_size=m.head_size, is_mla=m.is_mla,
                   dp_rank=m.dp_rank, tp_rank=m.tp_rank, tp_size=m.tp_size,
                   protocol_version=m.protocol_version)


def _content_digest(m: pb.RankInfo) -> bytes:
    """Digest of a RankInfo without its host_proof (what the proof is bound to)."""
    c = pb.RankInfo()
    c.CopyFrom(m)
    c.host_proof = b""
    return hostproof.digest(c.SerializeToString(deterministic=True))


def proven_info(desc: "RankDescriptor", role: bytes, challenge: bytes) -> pb.RankInfo:
    """``desc`` as a RankInfo carrying our host proof for ``challenge``."""
    m = desc.to_proto()
    m.host_proof = hostproof.prove(role, challenge, _content_digest(m))
    return m


def proves_same_host(m: pb.RankInfo, role: bytes, challenge: bytes) -> bool:
    return hostproof.verify(m.host_proof, role, challenge, _content_digest(m))


def check_compat(local: RankDescriptor, remote: RankDescriptor) -> None:
    """Raise :class:`HandshakeMismatchError` naming the first field that differs."""
    for f in COMPAT_FIELDS:
        a, b = getattr(local, f), getattr(remote, f)
        if a != b:
            raise HandshakeMismatchError(f, a, b)
    for d in (local, remote):
        if not 0 <= d.tp_rank < max(d.tp_size, 1):
            raise HandshakeMismatchError("tp_rank", d.tp_rank, f"< tp_size {d.tp_size}")
    if local.peer.regions and remote.peer.regions and \
            len(local.peer.regions) != len(remote.peer.regions):
        raise HandshakeMismatchError("regions", len(local.peer.regions),
                                     len(remote.peer.regions))


@dataclass
class PushTarget:
    """Where the decode engine wants a pushed request's KV (one DP rank)."""

    engine_id: str
    dp_rank: int
    tp_size: int
    block_size: int
    num_tokens: int
    first_block: int
    block_ids: list[int]
    # seconds a granted ``write:`` lets the prefill WRITE (its own monotonic clock);
    # 0 = a decode that grants no writes (then nothing is pushed)
    write_lease_s: float = 0.0
    request_id: str = ""

    @classmethod
    def from_proto(cls, m: pb.PushTargetResponse) -> "PushTarget":
        return cls(engine_id=m.engine_id, dp_rank=m.dp_rank, tp_size=m.tp_size,
                   block_size=m.block_size, num_tokens=m.num_tokens,
                   first_block=m.first_block, block_ids=list(m.block_ids),
                   write_lease_s=m.write_lease_s, request_id=m.request_id)


class PushRegistry:
    """Push targets by push id, with a bounded wait for ones not registered yet."""

    def __init__(self, max_entries: int = 65536) -> None:
        self._targets: dict[str, PushTarget] = {}
        self._cond = threading.Condition()
        self._max = max_entries

    def register(self, push_id: str, target: PushTarget) -> None:
        with self._cond:
            self._targets[push_id] = target
            while len(self._targets) > self._max:  # oldest first
                self._targets.pop(next(iter(self._targets)))
            self._cond.notify_all()

    def drop(self, push_id: str) -> None:
        with self._cond:
            self._targets.pop(push_id, None)

    def get(self, push_id: str) -> PushTarget | None:
        with self._cond:
            return self._targets.get(push_id)

    def wait_for(self, push_id: str, timeout_s: float) -> PushTarget | None:
        with self._cond:
            self._cond.wait_for(lambda: push_id in self._targets, timeout=max(0.0, timeout_s))
            return self._targets.get(push_id)

    def __len__(self) -> int:
        return len(self._targets)
