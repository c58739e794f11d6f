"""Loopback-only fault injection for `pdbench chaos`: a delaying/dropping TCP proxy and a
connection detector.

`FaultProxy(target_port)` listens on 127.0.0.1 and forwards to 127.0.0.1:target_port in
a background thread (its own asyncio loop). Its mode can be changed at any time and
applies to connections already open:

- ``pass``      forward bytes as they come
- ``delay``     hold every chunk `delay_up_s` (client->target) / `delay_down_s` (target->client)
- ``blackhole`` accept, read and discard everything in both directions (nothing answers)
- ``reset``     close every open connection and each new one at once

`Detector()` is a listening socket on loopback that only counts connection attempts
(SSRF tests: "did the sidecar try to connect where it must not?").

Nothing here ever connects anywhere but a loopback address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from typing import Optional

MODES = ("pass", "delay", "blackhole", "reset")


def _require_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"chaos tools only talk to loopback addresses, not {host!r}")


class FaultProxy:
    """A TCP proxy on loopback whose behaviour can be switched while traffic flows."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", listen_host: str = "127.0.0.1",
                 listen_port: int = 0):
        _require_loopback(target_host)
        _require_loopback(listen_host)
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.port: int | None = None
        self.mode = "pass"
        self.delay_up_s = 0.0
        self.delay_down_s = 0.0
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[tuple[asyncio.StreamWriter, Optional[asyncio.StreamWriter]]] = set()
        self._ready = threading.Event()

    # -------------------------------------------------------------- control
    def set_mode(self, mode: str, *, delay_up_s: float = 0.0, delay_down_s: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.delay_up_s, self.delay_down_s = delay_up_s, delay_down_s
        self.mode = mode
        if mode == "reset" and self._loop is not None:
            self._loop.call_soon_threadsafe(self._reset_all)

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._run, name="chaos-fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            fut.result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None

    # -------------------------------------------------------------- internals
    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(
            asyncio.start_server(self._handle, self.listen_host, self.listen_port, reuse_address=True))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()

    def _reset_all(self) -> None:
        for down, up in list(self._conns):
            for w in (down, up):
                if w is not None:
                    try:
                        w.transport.abort()
                    except Exception:
                        pass
        self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "reset":
            writer.transport.abort()
            return
        if self.mode == "blackhole":
            # nothing connects upstream: read and discard until the client gives up
            entry = (writer, None)
            self._conns.add(entry)
            try:
                while await reader.read(65536):
                    pass
            except (ConnectionError, OSError):
                pass
            finally:
                self._conns.discard(entry)
                writer.close()
            return
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        entry = (writer, uw)
        self._conns.add(entry)
        try:
            await asyncio.gather(self._pipe(reader, uw, True), self._pipe(ur, writer, False))
        finally:
            self._conns.discard(entry)
            for w in (writer, uw):
                try:
                    w.transport.abort()
                except Exception:
                    pass

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                if self.mode == "delay":
                    d = self.delay_up_s if up else self.delay_down_s
                    if d > 0:
                        await asyncio.sleep(d)
                if self.mode == "blackhole":
                    continue  # swallowed
                if self.mode == "reset":
                    break
                w.write(data)
                await w.drain()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            # one side ended: end both (a half-open proxy would hide disconnects)
            try:
                w.transport.abort()
            except Exception:
                pass


class Detector:
    """A loopback listener that records every connection attempt (and closes it)."""

    def __init__(self, host: str = "127.0.0.1"):
        _require_loopback(host)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.hits: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="chaos-detector", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            c.settimeout(0.3)
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            self.hits.append((time.time(), data))
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.sock.close()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
