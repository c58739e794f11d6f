"""Connector-side helpers over the transfer layer's gRPC control plane (``transfer.control``).

The control server (``transfer.control.ControlServer``) runs in the engine-core
(scheduler) process and serves each worker's ``RankDescriptor`` through
``Handshake`` (keyed by dp/tp rank). The decode side frees prefill blocks it will
not read with ``Notify(sender=<decode engine id>, receiver=<prefill engine id>,
message=b"release:<remote_request_id>")``. grpc is imported lazily.

Authentication: :func:`configure_auth` (called by both connector halves with the
token from ``PdConfig``) sets the :class:`transfer.control_auth.ControlAuth` every
client and server of this process uses; without it, ``$PDSIDECAR_AUTH_TOKEN(_FILE)``
of this process is used if set, else calls go unauthenticated.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("vllm.pdsidecar.connector")  # vLLM's handlers and format

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()
_auth: Any = None
_auth_set = False
_tls: Any = None


def configure_auth(token: str | None, tls: Any = None) -> None:
    """Use ``token`` (None = no authentication) and ``tls`` (a ``TlsFiles``, None =
    plaintext) for this process's control calls and servers."""
    global _auth, _auth_set, _tls
    from ..control_auth import ControlAuth
    with _clients_lock:
        _auth = ControlAuth(token) if token else None
        _tls = tls
        _auth_set = True
        for c in _clients.values():
            c.close()
        _clients.clear()


def control_auth() -> Any:
    """The process's ``ControlAuth`` (see :func:`configure_auth`), or None."""
    global _auth, _auth_set, _tls
    if not _auth_set:
        from ..control_auth import ControlAuth, load_tls, load_token
        token, tls = load_token(), load_tls()
        with _clients_lock:
            if not _auth_set:
                _auth = ControlAuth(token) if token else None
                _tls = tls
                _auth_set = True
    return _auth


def control_client(host: str, port: int, timeout_s: float) -> Any:
    """Cached ``transfer.control.ControlClient`` for ``host:port``."""
    from ..control import ControlClient
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    auth = control_auth()
    with _clients_lock:
        c = _clients.get(target)
        if c is None:
            c = _clients[target] = ControlClient(target, timeout_s=timeout_s, auth=auth,
                                                 tls=_tls)
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


def grant_failure(exc: BaseException) -> "FailureReason":
    """The failure reason of a load whose ``read:`` (or ``write:``) grant raised ``exc``:
    the peer's refusal reason when it names one we act on, else ``unreachable``."""
    from ..errors import FailureReason, reason_of
    r = reason_of(exc)
    return r if r in (FailureReason.EXPIRED, FailureReason.UNKNOWN_ENGINE) \
        else FailureReason.UNREACHABLE


def send_read(src: Any, sender: str, timeout_s: float) -> None:
    """``read:<remote request id>`` to the prefill engine ``src`` (a ``RemoteSource``)
    names; raises :class:`~transfer.errors.PeerRefused` (``EXPIRED``) when its lease is over."""
    send_notify(src.host, src.port, sender, src.engine_id, f"read:{src.request_id}", timeout_s)


def send_notify(host: str, port: int, sender: str, receiver: str, message: str,
                timeout_s: float) -> None:
    """``Notify`` an engine's control server (``release:<rid>``, ``push-fail:<id>:<why>``,
    ``write:<push id>``). A refusal (:class:`~transfer.errors.PeerRefused`, e.g. a grant
    that is over) is raised as is; any other failure drops the cached client first."""
    from ..errors import PeerRefused
    try:
        control_client(host, port, timeout_s).notify(
            sender, receiver, message.encode(), timeout_s=timeout_s)
    except PeerRefused:
        raise
    except Exception:
        drop_client(host, port)
        raise


class ControlNotifier:
    """Best-effort ``Notify`` calls of one engine, off the engine thread: the one path
    both connector halves use for releases and push-fail notifications. Each call runs
    on a small pool of its own, with ``timeout_s``; a failure is logged, never raised
    (the receiver's lease covers a lost release)."""

    def __init__(self, sender: str, timeout_s: float, workers: int = 4) -> None:
        self.sender = sender
        self.timeout_s = timeout_s
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> ThreadPoolExecutor:
        """The pool the notifications run on (made on first use)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="pd-notify")
            return self._pool

    def notify(self, host: str, port: int, receiver: str, message: str) -> None:
        """Queue ``message`` for the engine ``receiver`` at ``host:port``; returns at once."""
        try:
            self.executor().submit(self._send, host, port, receiver, message)
        except RuntimeError:  # shut down: the engine is stopping
            pass

    def release(self, host: str, port: int, receiver: str, request_id: str) -> None:
        """Free the prefill blocks of ``request_id`` (``release:<id>``) without reading them."""
        self.notify(host, port, receiver, f"release:{request_id}")

    def _send(self, host: str, port: int, receiver: str, message: str) -> None:
        try:
            send_notify(host, port, self.sender, receiver, message, self.timeout_s)
        except Exception as e:  # the other engine is gone or unreachable
            log.info("PdConnector: notification %r to %s:%s failed: %s", message[:80],
                     host, port, e)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def start_control_server(host: str, port: int, **kw: Any) -> Any:
    """Start ``transfer.control.ControlServer`` on ``host:port`` with an *exclusive* bind.

    gRPC binds with SO_REUSEPORT by default, so two engines on one host given the
    same ``control_port`` would both "bind" and share connections (a decode
    handshake could land on the decode engine itself): the server is built with
    ``grpc.so_reuseport=0``. If the port is taken, fall back to an ephemeral port
    (it is advertised in the params) and log it. The server authenticates calls
    with :func:`control_auth` (a loud warning when there is none). Returns the
    started server (``.port`` = bound port; ``.refused`` counts refused calls).
    """
    from .. import control as ctl

    auth = control_auth()
    logger = log

    def make(p: int) -> Any:
        addr = f"[{host}]:{p}" if ":" in host else f"{host}:{p}"
        return ctl.ControlServer(addr, auth=auth, tls=_tls, grpc_options=(("grpc.so_reuseport", 0),),
                                 thread_name_prefix="pd-control", **kw)

    srv = make(port)
    try:
        srv.start()
    except Exception:
        if port == 0:
            raise
        logger.warning(
            "PdConnector: control port %d on %s is in use (another engine on this host?); "
            "using an ephemeral port instead", port, host)
        srv = make(0)
        srv.start()
    if auth is None and _tls is None:
        logger.warning(
            "PdConnector: the control plane on %s:%d is UNAUTHENTICATED: anyone who reaches "
            "it can release this engine's KV blocks, read push targets or handshake. Give "
            "every engine the shared token (PDSIDECAR_AUTH_TOKEN_FILE / PDSIDECAR_AUTH_TOKEN "
            "or kv_connector_extra_config control_token_file, and/or control_tls_dir for mutual "
            "TLS; require_control_auth: true refuses to start without one)", host, srv.port)
    return srv
