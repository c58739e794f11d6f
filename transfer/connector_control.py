"""Thin gRPC control plane of the PdConnector (replaces vLLM's ZMQ side channel).

Adapter note: the transfer layer's ``transfer/control.proto`` service was not
available when this was written, so this uses gRPC *generic* handlers with JSON
bodies (no generated stubs, no protoc at build time). Service
``pdsidecar.PdConnectorControl``, unary methods:

* ``GetMetadata``  {} -> {engine_id, protocol_version, dp_rank, tp_size, compat, workers: {tp_rank: peer}}
* ``Release``      {request_ids: [...], reason} -> {released: n}: decode side frees
  prefill blocks it will not read (full local prefix hit, abort, failed read).
* ``Ping``         {} -> {engine_id, time}

grpc is imported lazily (only the engine-core/worker processes pay for it).
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent import futures
from typing import Any, Callable

SERVICE = "pdsidecar.PdConnectorControl"
log = logging.getLogger("pdsidecar.connector")

Handler = Callable[[dict], dict]


def _ser(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _de(data: bytes) -> dict:
    obj = json.loads(data.decode() or "{}")
    if not isinstance(obj, dict):
        raise ValueError("control message must be a JSON object")
    return obj


class ControlServer:
    """gRPC server on ``host:port`` (port 0 = ephemeral; ``.port`` is the bound one)."""

    def __init__(self, host: str, port: int, handlers: dict[str, Handler],
                 max_workers: int = 4) -> None:
        import grpc

        def wrap(fn: Handler):
            def call(request: dict, context: Any) -> dict:
                try:
                    return fn(request)
                except Exception as e:  # a bad request never kills the engine
                    log.warning("PdConnector control %s failed: %s", fn.__name__, e)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return grpc.unary_unary_rpc_method_handler(call, request_deserializer=_de,
                                                       response_serializer=_ser)

        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pd-ctl"),
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20),
                     ("grpc.max_send_message_length", 64 << 20)])
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {k: wrap(v) for k, v in handlers.items()}),))
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self._server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"PdConnector: cannot bind control server to {bind} (port in use?)")
        self.host = host
        self._server.start()

    def stop(self, grace: float = 0.5) -> None:
        self._server.stop(grace)


class ControlClient:
    """Cached channels to peers' control servers; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[str, Any] = {}

    def call(self, host: str, port: int, method: str, request: dict,
             timeout_s: float = 5.0) -> dict:
        import grpc
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        with self._lock:
            ch = self._channels.get(target)
            if ch is None:
                ch = grpc.insecure_channel(target, options=[
                    ("grpc.max_receive_message_length", 64 << 20)])
                self._channels[target] = ch
        fn = ch.unary_unary(f"/{SERVICE}/{method}", request_serializer=_ser,
                            response_deserializer=_de)
        try:
            return fn(request, timeout=timeout_s)
        except grpc.RpcError:
            with self._lock:  # drop a possibly broken channel; next call reconnects
                if self._channels.get(target) is ch:
                    del self._channels[target]
                    ch.close()
            raise

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
