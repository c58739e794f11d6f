"""CUDA IPC handles as a plain, versioned, length-checked message (never pickle).

What a peer receives to map our KV cache: per exported allocation the owner's
address of the exported range (``ptr``), its length, its offset inside the CUDA
allocation, and the raw 64-byte ``CUipcMemHandle`` of that allocation; plus the UUID
of the owner's GPU. Decoding checks magic, version, counts and every length before
anything is used; nothing in the message is executed or unpickled. Whether the peer
really is on this host is proven only by the handle opening on a local device
(:meth:`transfer.ipc_cuda.IpcMemApi.open`), not by anything the peer claims.

Layout (little endian)::

    b"PDIPC" | u16 version | 16-byte device UUID | u16 count |
    count x (u64 ptr | u64 nbytes | u64 offset | 64-byte handle)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import TransferError

MAGIC = b"PDIPC"
VERSION = 1
HANDLE_BYTES = 64  # sizeof(CUipcMemHandle)
UUID_BYTES = 16
MAX_ENTRIES = 4096
_HEAD = struct.Struct(f"<{len(MAGIC)}sH{UUID_BYTES}sH")
_ENTRY = struct.Struct(f"<QQQ{HANDLE_BYTES}s")


class IpcHandleError(TransferError):
    """A peer's IPC handle message is malformed or of another version."""


@dataclass(frozen=True)
class IpcExport:
    """One exported range: ``[ptr, ptr + nbytes)`` in the owner's address space,
    ``offset`` bytes into the CUDA allocation that ``handle`` names."""

    ptr: int
    nbytes: int
    offset: int
    handle: bytes


def encode(device_uuid: bytes, exports: list[IpcExport]) -> bytes:
    if len(device_uuid) != UUID_BYTES:
        raise ValueError(f"device UUID must be {UUID_BYTES} bytes")
    if not 0 < len(exports) <= MAX_ENTRIES:
        raise ValueError(f"1-{MAX_ENTRIES} exports, got {len(exports)}")
    out = [_HEAD.pack(MAGIC, VERSION, device_uuid, len(exports))]
    for e in exports:
        if len(e.handle) != HANDLE_BYTES:
            raise ValueError(f"IPC handle must be {HANDLE_BYTES} bytes")
        out.append(_ENTRY.pack(e.ptr, e.nbytes, e.offset, e.handle))
    return b"".join(out)


def decode(data: bytes) -> tuple[bytes, list[IpcExport]]:
    """``(device_uuid, exports)``; :class:`IpcHandleError` on anything unexpected."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < _HEAD.size:
        raise IpcHandleError("IPC handle message too short")
    magic, version, uuid, count = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise IpcHandleError("not an IPC handle message (bad magic)")
    if version != VERSION:
        raise IpcHandleError(f"IPC handle message version {version}, expected {VERSION}")
    if not 0 < count <= MAX_ENTRIES:
        raise IpcHandleError(f"IPC handle message with {count} entries")
    if len(data) != _HEAD.size + count * _ENTRY.size:
        raise IpcHandleError(f"IPC handle message of {len(data)} bytes for {count} entries")
    exports = []
    for i in range(count):
        ptr, nbytes, offset, handle = _ENTRY.unpack_from(data, _HEAD.size + i * _ENTRY.size)
        if nbytes == 0 or ptr + nbytes > 2 ** 64 - 1:
            raise IpcHandleError(f"IPC export {i}: bad range")
        exports.append(IpcExport(ptr, nbytes, offset, bytes(handle)))
    return bytes(uuid), exports
