"""gRPC control plane of the transfer layer: handshake, status, stats, notify.

The server runs in its own thread pool (``grpc.server``), so it fits processes with
no asyncio loop (vLLM's engine core / scheduler). One server can serve many ranks,
keyed ``(dp_rank, tp_rank)``. Clients use explicit per-call timeouts.

Authentication (``transfer.control_auth``): with a :class:`ControlAuth` (the shared
token) the server refuses unsigned, forged and replayed calls before any handler
runs and signs its answers; the client signs its calls and checks the answers.
Without one the plane is open to anyone who reaches the port (dev only; the
connector warns). "Same host" is proven with ``transfer.hostproof`` in the handshake,
never taken from the claimed ``host_id``.

Generated code: ``control_pb2.py`` / ``control_pb2_grpc.py`` are committed; the
regeneration command is at the top of ``control.proto`` (needs grpcio-tools; the
generated code requires grpcio >= 1.85.1 and protobuf >= 7.35.1 at run time).
"""

from __future__ import annotations

import queue
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpc

from . import control_pb2 as pb
from . import control_pb2_grpc as pb_grpc
from . import hostproof
from .control_auth import AUTH_KEY, RESP_KEY, AuthError, AuthInterceptor, ControlAuth, \
    RefusalCounter, TlsFiles, metadata_value
from .engine import TransferStats
from .errors import (FailureReason, HandshakeError, HandshakeMismatchError, PeerRefused,
                     ReasonError)
from .control_messages import (PushRegistry, PushTarget, RankDescriptor, check_compat,
                               proven_info, proves_same_host)

SERVICE = "/pdsidecar.transfer.v1.KVTransferControl/"
DEFAULT_RPC_TIMEOUT_S = 5.0


@dataclass
class _Status:
    state: str = "UNKNOWN"
    bytes: int = 0
    error: str = ""
    notifications: int = 0


HandshakeHook = Callable[[RankDescriptor], None]
NotifyHook = Callable[[str, str, bytes], None]


#: ``TransferStatus`` history kept per server (oldest forgotten first).
MAX_STATUSES = 4096

#: Longest one ``PushTarget`` call waits for a registration before answering "not found".
PUSH_TARGET_MAX_WAIT_MS = 1000


class _Servicer(pb_grpc.KVTransferControlServicer):
    def __init__(self, server: "ControlServer") -> None:
        self.s = server

    def Handshake(self, request: pb.HandshakeRequest, context: Any) -> pb.HandshakeResponse:
        key = (request.target_dp_rank, request.target_tp_rank)
        target = self.s.ranks.get(key)
        if target is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no rank dp={key[0]} tp={key[1]} on this server "
                          f"(serving {sorted(self.s.ranks)})")
        remote = RankDescriptor.from_proto(request.initiator)
        remote.peer.same_host = proves_same_host(request.initiator, hostproof.ROLE_INITIATOR,
                                                 request.host_challenge)
        try:
            check_compat(target, remote)
        except HandshakeMismatchError as e:
            context.set_trailing_metadata((("mismatch-field", e.field),
                                           ("local", repr(e.remote)),
                                           ("remote", repr(e.local))))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if self.s.on_handshake is not None:
            try:
                self.s.on_handshake(remote)
            except Exception as e:  # the hook (e.g. add_peer) failed
                context.abort(grpc.StatusCode.INTERNAL, f"handshake hook failed: {e}")
        return pb.HandshakeResponse(target=proven_info(target, hostproof.ROLE_TARGET,
                                                       request.host_challenge))

    def TransferStatus(self, request: pb.TransferStatusRequest,
                       context: Any) -> pb.TransferStatusResponse:
        st = self.s.status(request.request_id)
        return pb.TransferStatusResponse(request_id=request.request_id, state=st.state,
                                         bytes=st.bytes, error=st.error,
                                         notifications=st.notifications)

    def StatsStream(self, request: pb.StatsRequest, context: Any) -> Iterator[pb.TransferStatsMsg]:
        q: "queue.Queue[TransferStats | None]" = queue.Queue(maxsize=10000)
        self.s._subscribe(q)
        try:
            while context.is_active() and not self.s._stopping.is_set():
                try:
                    st = q.get(timeout=0.25)
                except queue.Empty:
                    continue
                if st is None:
                    return
                yield _stats_msg(st)
        finally:
            self.s._unsubscribe(q)

    def Notify(self, request: pb.NotifyRequest, context: Any) -> pb.NotifyResponse:
        if self.s.on_notify is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server takes no notifications")
        try:
            self.s.on_notify(request.sender, request.receiver, request.message)
        except ReasonError as e:  # a refusal the caller acts on (e.g. a lease that is over)
            context.set_trailing_metadata((("refused-reason", str(e.reason)),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.NotifyResponse()


    def PushTarget(self, request: pb.PushTargetRequest, context: Any) -> pb.PushTargetResponse:
        # capped: a waiting lookup holds one of the server's threads (clients re-ask)
        wait_s = min(request.wait_ms, PUSH_TARGET_MAX_WAIT_MS) / 1e3
        t = self.s.push_targets.wait_for(request.push_id, wait_s)
        if t is None:
            return pb.PushTargetResponse(found=False)
        return pb.PushTargetResponse(found=True, **vars(t))


def _stats_msg(s: TransferStats) -> pb.TransferStatsMsg:
    return pb.TransferStatsMsg(
        transfer_id=s.transfer_id, request_id=s.request_id, peer=s.peer, op=s.op,
        backend=s.backend, bytes=s.bytes, descriptors=s.descriptors, num_blocks=s.num_blocks,
        num_layers=s.num_layers, prepare_us=s.prepare_us, post_us=s.post_us,
        transfer_us=s.transfer_us, gbps=s.gbps, state=s.state, error=s.error)


class ControlServer:
    """Threaded gRPC server for one process's ranks (``add_rank`` each of them).

    ``auth`` (a :class:`ControlAuth`) turns per-call authentication on; refused calls
    are counted in ``refused`` (by reason). ``tls`` (a :class:`TlsFiles`) serves mutual
    TLS instead of plaintext. ``grpc_options`` go to ``grpc.server``.
    ``on_handshake(remote)`` runs after a successful compatibility check (e.g. to
    ``engine.add_peer(remote.peer)`` for push mode); ``on_notify(sender, receiver,
    msg)`` receives ``Notify`` calls (IPC-only setups without NIXL notifications).
    Register :meth:`publish` as an engine stats listener to feed ``StatsStream``.
    """

    def __init__(self, address: str = "127.0.0.1:0", *, max_workers: int = 8,
                 on_handshake: HandshakeHook | None = None,
                 on_notify: NotifyHook | None = None, auth: ControlAuth | None = None,
                 tls: TlsFiles | None = None,
                 grpc_options: tuple[tuple[str, Any], ...] = (),
                 thread_name_prefix: str = "kvx-control") -> None:
        self.address = address
        self.auth = auth
        self.tls = tls
        self.refused = RefusalCounter()
        self.on_handshake = on_handshake
        self.on_notify = on_notify
        self.ranks: dict[tuple[int, int], RankDescriptor] = {}
        self.push_targets = PushRegistry()
        self._statuses: dict[str, _Status] = {}
        self._subs: list[queue.Queue] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        interceptors = [AuthInterceptor(auth, self.refused)] if auth is not None else []
        self._server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=thread_name_prefix),
            interceptors=interceptors, options=list(grpc_options))
        pb_grpc.add_KVTransferControlServicer_to_server(_Servicer(self), self._server)
        self.port = 0

    def add_rank(self, desc: RankDescriptor) -> None:
        self.ranks[(desc.dp_rank, desc.tp_rank)] = desc

    def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        if self.tls is not None:
            self.port = self._server.add_secure_port(self.address,
                                                     self.tls.server_credentials())
        else:
            self.port = self._server.add_insecure_port(self.address)
        if not self.port:
            raise HandshakeError(f"cannot bind control server to {self.address}")
        self._server.start()
        return self.port

    @property
    def target(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        self._stopping.set()
        with self._lock:
            for q in self._subs:
                try:
                    q.put_nowait(None)
                except queue.Full:
                    pass
        self._server.stop(grace_s).wait(grace_s + 1.0)

    # -- status and stats
    def _status_entry(self, request_id: str, state: str) -> _Status:
        """The request's entry (under the lock); the oldest go beyond MAX_STATUSES."""
        st = self._statuses.get(request_id)
        if st is None:
            while len(self._statuses) >= MAX_STATUSES:
                self._statuses.pop(next(iter(self._statuses)))
            st = self._statuses[request_id] = _Status(state=state)
        return st

    def set_status(self, request_id: str, state: str, bytes: int = 0, error: str = "") -> None:
        """Record a request's transfer state (``PENDING``, ``DONE``, ``FAILED``)."""
        with self._lock:
            st = self._status_entry(request_id, "UNKNOWN")
            st.state, st.bytes, st.error = state, bytes or st.bytes, error

    def note_notification(self, request_id: str) -> int:
        with self._lock:
            st = self._status_entry(request_id, "PENDING")
            st.notifications += 1
            return st.notifications

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._statuses.pop(request_id, None)

    def status(self, request_id: str) -> _Status:
        with self._lock:
            st = self._statuses.get(request_id)
            return _Status(**vars(st)) if st else _Status()

    def publish(self, stats: TransferStats) -> None:
        """Engine stats listener: fan ``stats`` out to ``StatsStream`` subscribers."""
        if stats.request_id:
            self.set_status(stats.request_id, "DONE" if stats.state == "DONE" else "FAILED",
                            stats.bytes, stats.error)
        with self._lock:
            for q in self._subs:
                try:
                    q.put_nowait(stats)
                except queue.Full:  # slow subscriber: drop, never block transfers
                    pass

    def _subscribe(self, q: queue.Queue) -> None:
        with self._lock:
            self._subs.append(q)

    def _unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)

    def __enter__(self) -> "ControlServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ControlClient:
    """Blocking client; every call has an explicit timeout (``timeout_s``).

    With ``auth`` every call is signed and every unary answer's signature checked
    (an unsigned or forged answer raises :class:`HandshakeError`). With ``tls`` the
    channel is mutual TLS (the server's certificate must carry ``tls.server_name``).
    """

    target: str
    timeout_s: float = DEFAULT_RPC_TIMEOUT_S
    auth: ControlAuth | None = field(default=None, repr=False)
    tls: TlsFiles | None = field(default=None, repr=False)
    _channel: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tls is not None:
            self._channel = grpc.secure_channel(
                self.target, self.tls.channel_credentials(),
                options=[("grpc.ssl_target_name_override", self.tls.server_name)])
        else:
            self._channel = grpc.insecure_channel(self.target)

    def _call(self, name: str, req: Any, resp_cls: Any, timeout_s: float) -> Any:
        """One unary call with the exact request bytes signed and the answer checked."""
        method = SERVICE + name
        body = req.SerializeToString()
        md, nonce = None, ""
        if self.auth is not None:
            value, nonce = self.auth.sign(method, body)
            md = ((AUTH_KEY, value),)
        fn = self._channel.unary_unary(method)  # bytes in, bytes out
        try:
            raw, call = fn.with_call(body, timeout=timeout_s, metadata=md)
        except grpc.RpcError as e:
            raise _map_rpc_error(e, self.target) from None
        if self.auth is not None:
            try:
                self.auth.check_response(method, nonce, raw,
                                         metadata_value(call.trailing_metadata(), RESP_KEY))
            except AuthError as e:
                raise HandshakeError(f"control answer from {self.target} refused: {e}") from None
        return resp_cls.FromString(raw)

    def handshake(self, local: RankDescriptor, target_dp_rank: int = 0,
                  target_tp_rank: int = 0, timeout_s: float | None = None) -> RankDescriptor:
        """Send our descriptor, get the target rank's; raise on any mismatch."""
        challenge = hostproof.new_challenge()
        req = pb.HandshakeRequest(
            initiator=proven_info(local, hostproof.ROLE_INITIATOR, challenge),
            target_dp_rank=target_dp_rank, target_tp_rank=target_tp_rank,
            host_challenge=challenge)
        resp = self._call("Handshake", req, pb.HandshakeResponse, timeout_s or self.timeout_s)
        remote = RankDescriptor.from_proto(resp.target)
        remote.peer.same_host = proves_same_host(resp.target, hostproof.ROLE_TARGET, challenge)
        check_compat(local, remote)
        return remote

    def push_target(self, push_id: str, wait_s: float = 0.0,
                    timeout_s: float | None = None) -> PushTarget | None:
        """The decode engine's registration for ``push_id``; None if not there in ``wait_s``."""
        req = pb.PushTargetRequest(push_id=push_id, wait_ms=int(max(0.0, wait_s) * 1e3))
        resp = self._call("PushTarget", req, pb.PushTargetResponse,
                          (timeout_s or self.timeout_s) + wait_s)
        return PushTarget.from_proto(resp) if resp.found else None

    def transfer_status(self, request_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        r = self._call("TransferStatus", pb.TransferStatusRequest(request_id=request_id),
                       pb.TransferStatusResponse, timeout_s or self.timeout_s)
        return {"request_id": r.request_id, "state": r.state, "bytes": r.bytes,
                "error": r.error, "notifications": r.notifications}

    def notify(self, sender: str, receiver: str, message: bytes,
               timeout_s: float | None = None) -> None:
        self._call("Notify", pb.NotifyRequest(sender=sender, receiver=receiver, message=message),
                   pb.NotifyResponse, timeout_s or self.timeout_s)

    def stats_stream(self, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield per-transfer stats dicts; the stream ends after ``timeout_s``."""
        method = SERVICE + "StatsStream"
        body = pb.StatsRequest().SerializeToString()
        md = ((AUTH_KEY, self.auth.sign(method, body)[0]),) if self.auth is not None else None
        fn = self._channel.unary_stream(method,
                                        response_deserializer=pb.TransferStatsMsg.FromString)
        call = fn(body, timeout=timeout_s, metadata=md)
        try:
            for m in call:
                yield {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields}
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _map_rpc_error(e, self.target) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map_rpc_error(e: grpc.RpcError, target: str) -> Exception:
    code, details = e.code(), e.details()
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        md = dict(e.trailing_metadata() or ())
        if "refused-reason" in md:
            return PeerRefused(FailureReason.parse(md["refused-reason"]), details)
        if "mismatch-field" in md:
            return HandshakeMismatchError(md["mismatch-field"], md.get("local"),
                                          md.get("remote"))
        return HandshakeError(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return HandshakeError(f"control server {target} refused the call ({details}); "
                              f"are both engines given the same control token?")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return HandshakeError(f"control server {target} unreachable ({code.name}): {details}")
    return HandshakeError(f"control call to {target} failed ({code.name}): {details}")
