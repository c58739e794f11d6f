"""KV-cache transfer layer: layout math, NIXL and CUDA-IPC engines, gRPC control plane.

Import-cheap: NIXL, torch, triton and grpc load only when their modules are used
(``transfer.nixl_engine``, ``transfer.ipc``, ``transfer.control``).
"""

from .engine import PeerInfo, TransferEngine, TransferHandle, TransferStats, host_id
from .errors import (BackendUnavailableError, BlockIdError, HandshakeError,
                     HandshakeMismatchError, TransferError, TransferFailedError,
                     TransferTimeoutError, UnknownPeerError, UnregisteredMemoryError)
from .layout import (KVCacheSpec, Region, TPPlan, TPReadSlice, block_descriptors,
                     coalesce_runs, expected_notifications, regions_for_buffer,
                     regions_from_kv_caches, tp_read_plan)
from .select import create_engine, resolve_protocol

__all__ = [
    "PeerInfo", "TransferEngine", "TransferHandle", "TransferStats", "host_id",
    "BackendUnavailableError", "BlockIdError", "HandshakeError", "HandshakeMismatchError",
    "TransferError", "TransferFailedError", "TransferTimeoutError", "UnknownPeerError",
    "UnregisteredMemoryError", "KVCacheSpec", "Region", "TPPlan", "TPReadSlice",
    "block_descriptors", "coalesce_runs", "expected_notifications", "regions_for_buffer",
    "regions_from_kv_caches", "tp_read_plan", "create_engine", "resolve_protocol",
]
