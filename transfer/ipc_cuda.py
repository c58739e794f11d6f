"""Thin CUDA stream/event/copy helpers for the IPC fast path.

Two implementations of one tiny interface (``h2d``, ``new_event``, ``record``,
``query``, ``synchronize``, ``elapsed_ms``):

* :class:`DriverOps`: the CUDA driver API through ``ctypes`` (``libcuda.so.1``, always
  present where a GPU is): ~1 µs per call, no tensor objects.
* :class:`TorchOps`: the same through torch (slower per call, always works).

Events are raw handles (``int``) for ``DriverOps`` and ``torch.cuda.Event`` for
``TorchOps``; callers treat them as opaque.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_READY = 600
CU_EVENT_DISABLE_TIMING = 0x2


class CudaCallError(RuntimeError):
    pass


def _check_rc(err_str: Any, rc: int, what: str) -> None:
    """Raise :class:`CudaCallError` naming ``what`` unless ``rc`` is CUDA_SUCCESS."""
    if rc != CUDA_SUCCESS:
        s = ctypes.c_char_p()
        err_str(rc, ctypes.byref(s))
        raise CudaCallError(f"{what} failed: CUDA error {rc} ({(s.value or b'?').decode()})")


class DriverOps:
    kind = "driver"

    def __init__(self, device: Any) -> None:
        import torch
        self._torch = torch
        self.device = device
        lib = ctypes.CDLL("libcuda.so.1")
        vp, u64, sz = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t
        self._memcpy = lib.cuMemcpyHtoDAsync_v2
        self._memcpy.argtypes = [u64, vp, sz, vp]
        self._ev_create = lib.cuEventCreate
        self._ev_create.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        self._ev_record = lib.cuEventRecord
        self._ev_record.argtypes = [vp, vp]
        self._ev_query = lib.cuEventQuery
        self._ev_query.argtypes = [vp]
        self._ev_sync = lib.cuEventSynchronize
        self._ev_sync.argtypes = [vp]
        self._ev_destroy = lib.cuEventDestroy_v2
        self._ev_destroy.argtypes = [vp]
        try:
            self._ev_elapsed = lib.cuEventElapsedTime_v2
        except AttributeError:
            self._ev_elapsed = lib.cuEventElapsedTime
        self._ev_elapsed.argtypes = [ctypes.POINTER(ctypes.c_float), vp, vp]
        self._wait_ev = lib.cuStreamWaitEvent
        self._wait_ev.argtypes = [vp, vp, ctypes.c_uint]
        self._ctx_get = lib.cuCtxGetCurrent
        self._ctx_get.argtypes = [ctypes.POINTER(vp)]
        self._err_str = lib.cuGetErrorString
        self._err_str.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for f in (self._memcpy, self._ev_create, self._ev_record, self._ev_query,
                  self._ev_sync, self._ev_destroy, self._ev_elapsed, self._ctx_get,
                  self._wait_ev):
            f.restype = ctypes.c_int
        self._ctx = ctypes.c_void_p()
        self.ensure_context()

    def _check(self, rc: int, what: str) -> None:
        _check_rc(self._err_str, rc, what)

    def ensure_context(self) -> None:
        """Make the device's primary context current on this thread (torch's one)."""
        self._ctx_get(ctypes.byref(self._ctx))
        if not self._ctx.value:
            self._torch.cuda.set_device(self.device)
            self._torch.cuda.current_stream(self.device)  # initializes the runtime here
            self._ctx_get(ctypes.byref(self._ctx))
            if not self._ctx.value:
                raise CudaCallError("no CUDA context current on this thread")

    def h2d(self, dst_ptr: int, src_ptr: int, nbytes: int, stream: int) -> None:
        rc = self._memcpy(dst_ptr, src_ptr, nbytes, stream)
        if rc:
            self._check(rc, "cuMemcpyHtoDAsync")

    def new_event(self, timing: bool = False) -> Any:
        ev = ctypes.c_void_p()
        self._check(self._ev_create(ctypes.byref(ev), 0 if timing else CU_EVENT_DISABLE_TIMING),
                    "cuEventCreate")
        return ev.value

    def record(self, ev: Any, stream: int) -> None:
        rc = self._ev_record(ev, stream)
        if rc:
            self._check(rc, "cuEventRecord")

    def stream_wait(self, stream: int, ev: Any) -> None:
        """Work queued on ``stream`` from now on waits for ``ev`` (device side)."""
        rc = self._wait_ev(stream, ev, 0)
        if rc:
            self._check(rc, "cuStreamWaitEvent")

    def query(self, ev: Any) -> bool:
        rc = self._ev_query(ev)
        if rc == CUDA_SUCCESS:
            return True
        if rc == CUDA_ERROR_NOT_READY:
            return False
        self._check(rc, "cuEventQuery")
        return False

    def synchronize(self, ev: Any) -> None:
        self._check(self._ev_sync(ev), "cuEventSynchronize")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        ms = ctypes.c_float()
        self._check(self._ev_elapsed(ctypes.byref(ms), start, end), "cuEventElapsedTime")
        return float(ms.value)

    def destroy(self, ev: Any) -> None:
        if ev:
            self._ev_destroy(ev)


class TorchOps:
    kind = "torch"

    def __init__(self, device: Any) -> None:
        import torch
        self._torch = torch
        self.device = device

    def ensure_context(self) -> None:
        pass

    def h2d(self, dst_ptr: int, src_ptr: int, nbytes: int, stream: int) -> None:
        raise NotImplementedError  # the engine uses tensor copies with TorchOps

    def new_event(self, timing: bool = False) -> Any:
        return self._torch.cuda.Event(enable_timing=timing)

    def record(self, ev: Any, stream: Any) -> None:
        ev.record(stream)

    def query(self, ev: Any) -> bool:
        return bool(ev.query())

    def synchronize(self, ev: Any) -> None:
        ev.synchronize()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))

    def destroy(self, ev: Any) -> None:
        pass


def make_ops(device: Any) -> Any:
    """``DriverOps`` unless unavailable or ``PDSIDECAR_IPC_TORCH_OPS=1``."""
    if os.environ.get("PDSIDECAR_IPC_TORCH_OPS", "") != "1":
        try:
            return DriverOps(device)
        except Exception:
            pass
    return TorchOps(device)


CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1


class _IpcHandle(ctypes.Structure):
    """``CUipcMemHandle``: 64 bytes, passed *by value* to ``cuIpcOpenMemHandle``."""

    _fields_ = [("reserved", ctypes.c_char * 64)]


class IpcMemApi:
    """CUDA IPC through the driver API: export a device range as a raw 64-byte handle,
    open a peer's handle (this is what proves the peer shares this host's GPUs)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        vp, u64 = ctypes.c_void_p, ctypes.c_uint64
        self._range = getattr(lib, "cuMemGetAddressRange_v2", None) or lib.cuMemGetAddressRange
        self._range.argtypes = [ctypes.POINTER(u64), ctypes.POINTER(ctypes.c_size_t), u64]
        self._get = lib.cuIpcGetMemHandle
        self._get.argtypes = [ctypes.c_char_p, u64]
        self._open = getattr(lib, "cuIpcOpenMemHandle_v2", None) or lib.cuIpcOpenMemHandle
        self._open.argtypes = [ctypes.POINTER(u64), _IpcHandle, ctypes.c_uint]
        self._close = lib.cuIpcCloseMemHandle
        self._close.argtypes = [u64]
        self._err_str = lib.cuGetErrorString
        self._err_str.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for f in (self._range, self._get, self._open, self._close):
            f.restype = ctypes.c_int
        del vp

    def _check(self, rc: int, what: str) -> None:
        _check_rc(self._err_str, rc, what)

    def export(self, ptr: int) -> tuple[int, bytes]:
        """``(offset of ptr in its allocation, handle of that allocation)``."""
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._check(self._range(ctypes.byref(base), ctypes.byref(size), ptr),
                    "cuMemGetAddressRange")
        buf = ctypes.create_string_buffer(64)
        self._check(self._get(buf, base.value), "cuIpcGetMemHandle")
        return ptr - base.value, buf.raw

    def open(self, handle: bytes) -> int:
        """Map a peer's allocation; returns its base address in this process."""
        h = _IpcHandle.from_buffer_copy(handle)
        out = ctypes.c_uint64()
        self._check(self._open(ctypes.byref(out), h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                    "cuIpcOpenMemHandle")
        return int(out.value)

    def close(self, base: int) -> None:
        self._check(self._close(base), "cuIpcCloseMemHandle")


def device_uuid(device: Any) -> bytes:
    """16-byte UUID of a torch CUDA device."""
    import torch
    u = torch.cuda.get_device_properties(device).uuid
    raw = getattr(u, "bytes", None)
    if isinstance(raw, (bytes, bytearray)) and len(raw) >= 16:
        return bytes(raw[:16])
    return bytes.fromhex(str(u).removeprefix("GPU-").replace("-", ""))[:16]


def local_device_uuids() -> dict[bytes, int]:
    """UUID -> device index of every GPU this process can see."""
    import torch
    return {device_uuid(i): i for i in range(torch.cuda.device_count())}


class _CudaArray:
    """``__cuda_array_interface__`` over a raw device range (to view it as a tensor)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3}


def byte_tensor(ptr: int, nbytes: int, device: Any) -> Any:
    """A uint8 torch tensor viewing ``nbytes`` at device address ``ptr`` (no copy)."""
    import torch
    return torch.as_tensor(_CudaArray(ptr, nbytes), device=device)
