"""Connector-side helpers over the transfer layer's gRPC control plane (``transfer.control``).

The control server (``transfer.control.ControlServer``) runs in the engine-core
(scheduler) process and serves each worker's ``RankDescriptor`` through
``Handshake`` (keyed by dp/tp rank). The decode side frees prefill blocks it will
not read with ``Notify(sender=<decode engine id>, receiver=<prefill engine id>,
message=b"release:<remote_request_id>")``. grpc is imported lazily.
"""

from __future__ import annotations

import threading
from typing import Any

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def control_client(host: str, port: int, timeout_s: float) -> Any:
    """Cached ``transfer.control.ControlClient`` for ``host:port``."""
    from .control import ControlClient
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with _clients_lock:
        c = _clients.get(target)
        if c is None:
            c = _clients[target] = ControlClient(target, timeout_s=timeout_s)
        return c


def drop_client(host: str, port: int) -> None:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with _clients_lock:
        c = _clients.pop(target, None)
    if c is not None:
        c.close()


def send_release(host: str, port: int, sender: str, receiver: str, request_id: str,
                 timeout_s: float) -> None:
    send_notify(host, port, sender, receiver, f"release:{request_id}", timeout_s)


def send_notify(host: str, port: int, sender: str, receiver: str, message: str,
                timeout_s: float) -> None:
    """``Notify`` an engine's control server (``release:<rid>``, ``push-fail:<id>:<why>``)."""
    try:
        control_client(host, port, timeout_s).notify(
            sender, receiver, message.encode(), timeout_s=timeout_s)
    except Exception:
        drop_client(host, port)
        raise


def start_control_server(host: str, port: int, **kw: Any) -> Any:
    """Start ``transfer.control.ControlServer`` on ``host:port`` with an *exclusive* bind.

    gRPC binds with SO_REUSEPORT by default, so two engines on one host given the
    same ``control_port`` would both "bind" and share connections (a decode
    handshake could land on the decode engine itself). Adapter: the server is
    rebuilt with ``grpc.so_reuseport=0`` (``ControlServer`` takes no gRPC options
    yet). If the port is taken, fall back to an ephemeral port (it is advertised
    in the params) and log it. Returns the started server (``.port`` = bound port).
    """
    import logging
    from concurrent import futures

    import grpc

    from . import control as ctl

    def make(p: int) -> Any:
        addr = f"[{host}]:{p}" if ":" in host else f"{host}:{p}"
        srv = ctl.ControlServer(addr, **kw)
        srv._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="pd-control"),
            options=[("grpc.so_reuseport", 0)])
        ctl.pb_grpc.add_KVTransferControlServicer_to_server(ctl._Servicer(srv), srv._server)
        return srv

    srv = make(port)
    try:
        srv.start()
    except Exception:
        if port == 0:
            raise
        logging.getLogger("vllm.pdsidecar.connector").warning(
            "PdConnector: control port %d on %s is in use (another engine on this host?); "
            "using an ephemeral port instead", port, host)
        srv = make(0)
        srv.start()
    return srv
