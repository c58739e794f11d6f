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
    try:
        control_client(host, port, timeout_s).notify(
            sender, receiver, f"release:{request_id}".encode(), timeout_s=timeout_s)
    except Exception:
        drop_client(host, port)
        raise
