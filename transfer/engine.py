"""Backend-agnostic transfer-engine interface, peer info, handles and stats.

A :class:`TransferEngine` owns local KV regions, knows peers by name (from their
:class:`PeerInfo`), and moves lists of block ids: ``read_blocks`` pulls remote blocks
into local ones, ``write_blocks`` pushes local blocks into remote ones. Both return a
:class:`TransferHandle` at once; completion is observed with the synchronous
``poll``/``wait`` (for vLLM's worker thread) or ``await wait_async`` (never blocks
the event loop). Every wait takes an explicit timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

try:
    import resource
except ImportError:  # not on this OS: thread_clock() reports nothing
    resource = None  # type: ignore[assignment]

from .errors import TransferError, TransferTimeoutError, UnknownPeerError
from .blocks import validate_block_id_pair
from .layout import Region

DEFAULT_WAIT_TIMEOUT_S = float(os.environ.get("PDSIDECAR_TRANSFER_TIMEOUT_S", "30"))
DEFAULT_POLL_INTERVAL_S = 0.0002
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)


def host_id() -> str:
    """Identifier of this host (hostname + boot id): equal ids mean one machine."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


@dataclass
class PeerInfo:
    """What a peer needs to transfer with us (sent in the handshake)."""

    name: str  # agent / engine-instance name, unique per rank
    backend: str  # "nixl", "ipc" or "multi"
    mem_type: str  # "DRAM" or "VRAM"
    regions: list[Region]
    host_id: str = field(default_factory=host_id)
    agent_metadata: bytes = b""  # NIXL agent blob
    ipc_handles: bytes = b""  # CUDA IPC handle message (transfer.ipc_handles; same host only)
    device_id: int = 0
    # local verdict, never sent: True only if the peer proved it shares this host
    # (``transfer.hostproof`` in the handshake); None = not from a handshake (in-process)
    same_host: bool | None = field(default=None, compare=False)

    @property
    def num_blocks(self) -> int:
        return min((r.num_blocks for r in self.regions), default=0)


@dataclass
class TransferStats:
    """Per-transfer numbers (one READ or WRITE of one block list)."""

    transfer_id: int
    request_id: str
    peer: str
    op: str  # "READ" or "WRITE"
    backend: str
    bytes: int
    descriptors: int
    num_blocks: int
    num_layers: int
    prepare_us: float
    post_us: float
    transfer_us: float = 0.0  # submit -> observed completion (prepare included)
    state: str = "PROC"  # PROC, DONE, ERR
    error: str = ""
    post_cpu_us: float = 0.0  # CPU time of the posting thread inside the post
    post_preempted: int = 0  # times that thread was preempted inside the post
    device_us: float = 0.0  # CUDA IPC with device timing: the copy on the device (events); 0: not timed
    nixl_xfer_us: float = 0.0  # NIXL with telemetry: its own xferDuration (post -> done seen); 0: none

    @property
    def xfer_us(self) -> float:
        """Post -> observed completion: ``transfer_us`` less ``prepare_us``, timed in
        Python around the post and the status check that sees it done."""
        return max(0.0, self.transfer_us - self.prepare_us) if self.transfer_us else 0.0

    @property
    def in_engine_us(self) -> float:
        """The in-engine transfer time PdConnector reports: NIXL's own ``xferDuration``
        when the agent captured it (post -> the status check that sees it done, timed
        inside NIXL: what vLLM's NixlConnector reports as ``vllm:nixl_xfer_time_seconds``),
        else :attr:`xfer_us`, the same span timed from Python (a few µs longer)."""
        return self.nixl_xfer_us if self.nixl_xfer_us > 0 else self.xfer_us

    @property
    def gbps(self) -> float:
        return self.bytes / (self.transfer_us * 1e3) if self.transfer_us > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gbps"] = self.gbps
        return d


_ids = itertools.count(1)


@dataclass
class TransferHandle:
    """An in-flight transfer. Treat as opaque; read ``stats`` and ``done``."""

    stats: TransferStats
    native: Any = None  # backend object (NIXL xfer handle, CUDA event)
    t_submit_ns: int = 0
    notif: bytes = b""
    done: bool = False
    extra: Any = None
    # NIXL WRITE from a CUDA cache: posted once this event (recorded on the caller's
    # stream, i.e. after the layer's cache write) has completed; see NixlTransferEngine
    post_after: Any = None

    @property
    def request_id(self) -> str:
        return self.stats.request_id


def new_transfer_id() -> int:
    return next(_ids)


def thread_clock() -> tuple[float, int]:
    """(CPU µs used by the calling thread, its involuntary context switches so far).

    Around a post, the differences tell the copy's own work from time the thread sat
    preempted on a shared core. ``(0.0, 0)`` where the OS has no per-thread usage.
    """
    if _RUSAGE_THREAD is None:
        return 0.0, 0
    return time.thread_time_ns() / 1e3, resource.getrusage(_RUSAGE_THREAD).ru_nivcsw


StatsListener = Callable[[TransferStats], None]


class TransferEngine(ABC):
    """Common interface of the NIXL and CUDA-IPC engines."""

    backend: str = "abstract"

    def __init__(self, name: str) -> None:
        self.name = name
        self.regions: list[Region] = []
        self.mem_type = "DRAM"
        self._stats_listeners: list[StatsListener] = []
        self._lock = threading.RLock()

    # -- registration and peers
    @abstractmethod
    def register_regions(self, regions: Sequence[Region], mem_type: str) -> None:
        """Register raw regions (addresses must stay valid until :meth:`close`)."""

    @abstractmethod
    def register_kv_caches(self, kv_caches: Mapping[str, Any],
                           num_blocks: int | None = None) -> list[Region]:
        """Register vLLM's ``{layer_name: tensor}``; returns the derived regions."""

    @abstractmethod
    def local_info(self) -> PeerInfo:
        """This engine's :class:`PeerInfo`, to send to peers."""

    @abstractmethod
    def add_peer(self, info: PeerInfo) -> str:
        """Make a peer known (import its metadata, prepare its descriptors once)."""

    @abstractmethod
    def remove_peer(self, name: str) -> None: ...

    @abstractmethod
    def peers(self) -> list[str]: ...

    # -- transfers
    @abstractmethod
    def read_blocks(self, peer: str, local_block_ids: Any, remote_block_ids: Any, *,
                    layers: Iterable[int] | None = None, notif: bytes | str | None = None,
                    request_id: str = "", local_slice: tuple[int, int] | None = None,
                    remote_slice: tuple[int, int] | None = None) -> TransferHandle:
        """Pull ``remote_block_ids`` of ``peer`` into ``local_block_ids`` (same order).

        ``layers`` limits the transfer to those layer indices; ``notif`` is delivered
        to the peer once the transfer completed; ``*_slice`` = ``(offset, length)``
        bytes inside each block (heterogeneous TP, see ``layout.tp_read_plan``).
        """

    @abstractmethod
    def write_blocks(self, peer: str, local_block_ids: Any, remote_block_ids: Any, *,
                     layers: Iterable[int] | None = None, notif: bytes | str | None = None,
                     request_id: str = "", local_slice: tuple[int, int] | None = None,
                     remote_slice: tuple[int, int] | None = None) -> TransferHandle:
        """Push ``local_block_ids`` into ``remote_block_ids`` of ``peer``."""

    @abstractmethod
    def poll(self, handle: TransferHandle) -> bool:
        """Non-blocking: True once done; raises ``TransferFailedError`` on failure."""

    @abstractmethod
    def get_new_notifs(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call, by sending peer name."""

    @abstractmethod
    def send_notif(self, peer: str, msg: bytes | str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    # -- shared helpers
    def wait(self, handle: TransferHandle, timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> TransferStats:
        """Block the calling (non-asyncio) thread until done; explicit timeout."""
        deadline = time.perf_counter() + timeout_s
        spins = 0
        while not self.poll(handle):
            if time.perf_counter() > deadline:
                self._on_timeout(handle)
                raise TransferTimeoutError(
                    f"transfer {handle.stats.transfer_id} ({handle.stats.op} "
                    f"{handle.stats.bytes} B, peer {handle.stats.peer!r}, request "
                    f"{handle.request_id!r}) not done after {timeout_s:.3f} s")
            spins += 1
            if spins > 200:
                time.sleep(DEFAULT_POLL_INTERVAL_S)
        return handle.stats

    async def wait_async(self, handle: TransferHandle, timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
                         poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> TransferStats:
        """Await completion from asyncio; polls with short sleeps, explicit timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.poll(handle):
            if loop.time() > deadline:
                self._on_timeout(handle)
                raise TransferTimeoutError(
                    f"transfer {handle.stats.transfer_id} (peer {handle.stats.peer!r}, "
                    f"request {handle.request_id!r}) not done after {timeout_s:.3f} s")
            await asyncio.sleep(poll_interval_s)
        return handle.stats

    def transfer(self, op: str, peer: str, local_block_ids: Any, remote_block_ids: Any,
                 timeout_s: float = DEFAULT_WAIT_TIMEOUT_S, **kw: Any) -> TransferStats:
        """Submit and wait (convenience for scripts and tests)."""
        fn = self.read_blocks if op.upper() == "READ" else self.write_blocks
        return self.wait(fn(peer, local_block_ids, remote_block_ids, **kw), timeout_s)

    def _on_timeout(self, handle: TransferHandle) -> None:
        """Backend hook: try to cancel/release a timed-out transfer (it may still run:
        ask :meth:`released` before reusing its memory)."""

    def released(self, handle: TransferHandle) -> bool:
        """True once ``handle`` can no longer touch memory (completed, failed for good,
        or cancelled and released by the backend); False while it may still write.
        Never blocks. A timed-out or failed transfer's destination must not be reused
        before this says True (or the peer was removed, see :meth:`remove_peer`).
        Default: the transfer's own completion (a CUDA copy cannot be cancelled, it
        ends by itself)."""
        try:
            return self.poll(handle)
        except TransferError:
            return True

    def add_stats_listener(self, fn: StatsListener) -> None:
        """Call ``fn(stats)`` for every finished (or failed) transfer."""
        self._stats_listeners.append(fn)

    def _publish(self, stats: TransferStats) -> None:
        for fn in list(self._stats_listeners):
            try:
                fn(stats)
            except Exception:  # a listener must not break the transfer path
                pass

    def __enter__(self) -> "TransferEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Plans kept per peer; more distinct keys than this clears the peer's :class:`PlanCache`.
MAX_PLANS_PER_PEER = 256


class PlanCache:
    """What transfers with one peer need per key (op, layers, slices), built on first
    use by the engine and reused; past :data:`MAX_PLANS_PER_PEER` keys it starts over."""

    def __init__(self) -> None:
        self._plans: dict[Any, Any] = {}

    def get(self, key: Any, build: Callable[[Any], Any]) -> Any:
        """The plan of ``key``; ``build(key)`` makes (and caches) it on a miss."""
        plan = self._plans.get(key)
        if plan is None:
            plan = build(key)
            if len(self._plans) >= MAX_PLANS_PER_PEER:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def __getitem__(self, key: Any) -> Any:
        return self._plans[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._plans

    def __len__(self) -> int:
        return len(self._plans)


class PeerTableEngine(TransferEngine):
    """A backend keeping its peers in ``self._peers`` and moving blocks via ``_submit``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._peers: dict[str, Any] = {}

    def peers(self) -> list[str]:
        return list(self._peers)

    def _peer(self, name: str) -> Any:
        try:
            return self._peers[name]
        except KeyError:
            raise UnknownPeerError(name, list(self._peers)) from None

    def _checked_ids(self, p: Any, local_ids: Any, remote_ids: Any, local_num_blocks: int,
                     remote_num_blocks: int) -> np.ndarray:
        """``2 x n`` ids of one transfer with peer ``p`` (see ``validate_block_id_pair``)."""
        return validate_block_id_pair(local_ids, remote_ids, local_num_blocks,
                                      remote_num_blocks, "local block ids",
                                      f"remote block ids (peer {p.info.name!r})")

    def read_blocks(self, peer: str, local_block_ids: Any, remote_block_ids: Any, *,
                    layers: Iterable[int] | None = None, notif: bytes | str | None = None,
                    request_id: str = "", local_slice: tuple[int, int] | None = None,
                    remote_slice: tuple[int, int] | None = None) -> TransferHandle:
        return self._submit("READ", peer, local_block_ids, remote_block_ids, layers,
                            notif, request_id, local_slice, remote_slice)

    def write_blocks(self, peer: str, local_block_ids: Any, remote_block_ids: Any, *,
                     layers: Iterable[int] | None = None, notif: bytes | str | None = None,
                     request_id: str = "", local_slice: tuple[int, int] | None = None,
                     remote_slice: tuple[int, int] | None = None) -> TransferHandle:
        return self._submit("WRITE", peer, local_block_ids, remote_block_ids, layers,
                            notif, request_id, local_slice, remote_slice)

    @abstractmethod
    def _submit(self, op: str, peer: str, local_ids: Any, remote_ids: Any,
                layers: Iterable[int] | None, notif: bytes | str | None, request_id: str,
                local_slice: tuple[int, int] | None,
                remote_slice: tuple[int, int] | None) -> TransferHandle:
        """Validate, post and return the handle of one READ or WRITE."""


def as_bytes(msg: bytes | str | None) -> bytes:
    if msg is None:
        return b""
    return msg.encode() if isinstance(msg, str) else bytes(msg)
