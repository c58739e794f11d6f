"""KV-cache transfer layer: layout math, NIXL and CUDA-IPC engines, gRPC control plane.

Import-cheap: NIXL, torch, triton and grpc load only when their modules are used
(``transfer.nixl_engine``, ``transfer.ipc``, ``transfer.control``). The vLLM
connector plugin is the package :mod:`transfer.connector`.
"""

from .engine import PeerInfo, TransferEngine, TransferHandle, TransferStats, host_id
from .connector.tp_mapping import TPPlan, TPReadSlice, expected_notifications, tp_read_plan
from .errors import (BackendUnavailableError, BlockIdError, FailureReason, HandshakeError,
                     HandshakeMismatchError, TransferError, TransferFailedError,
                     TransferTimeoutError, UnknownPeerError, UnregisteredMemoryError)
from .blocks import block_descriptors, coalesce_runs
from .layout import KVCacheSpec, Region, regions_for_buffer, regions_from_kv_caches
from .select import create_engine, resolve_protocol

__all__ = [
    "PeerInfo", "TransferEngine", "TransferHandle", "TransferStats", "host_id",
    "BackendUnavailableError", "BlockIdError", "FailureReason", "HandshakeError", "HandshakeMismatchError",
    "TransferError", "TransferFailedError", "TransferTimeoutError", "UnknownPeerError",
    "UnregisteredMemoryError", "KVCacheSpec", "Region", "TPPlan", "TPReadSlice",
    "block_descriptors", "coalesce_runs", "expected_notifications", "regions_for_buffer",
    "regions_from_kv_caches", "tp_read_plan", "create_engine", "resolve_protocol",
]
