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

`RoguePeer(mode)` answers prefill legs the way an impostor on a prefill peer's address
would (unsigned, signed with the wrong key, replaying a genuine answer it relayed once,
30 MiB, or - given the key, like a lying prefill engine behind a genuine sidecar - naming
a foreign engine address); put it behind the FaultProxy with `FaultProxy.retarget`.

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

    def retarget(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        """New connections go to another loopback port; open ones are closed."""
        _require_loopback(target_host)
        self.target = (target_host, target_port)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._reset_all)

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


ROGUE_MODES = ("unsigned", "forged", "replayed", "oversized", "foreign_host")


class RoguePeer:
    """A loopback HTTP server posing as a prefill sidecar (see the module docstring).

    Its answers name `kv_host:kv_port` (a Detector, so a connection attempt shows) as
    the engine to read KV from. `relay_port` is the genuine prefill sidecar ("replayed"
    relays the first leg there and replays that signed answer for every later leg);
    `token` is the shared key ("foreign_host" signs correctly but names 198.51.100.7)."""

    def __init__(self, mode: str, kv_port: int, kv_host: str = "127.0.0.1", relay_port: int | None = None,
                 token: str | None = None):
        import json
        import urllib.request
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from proxy import auth

        if mode not in ROGUE_MODES:
            raise ValueError(f"mode must be one of {ROGUE_MODES}")
        _require_loopback(kv_host)
        self.mode, self.legs = mode, 0
        captured: dict = {}
        self.captured = captured  # "replayed": the genuine signed answer once relayed
        rogue = self

        def relay(path: str, raw: bytes, headers) -> tuple[bytes, dict[str, str]]:
            hs = {k: v for k, v in headers.items() if k.lower().startswith("x-")}
            req = urllib.request.Request(f"http://127.0.0.1:{relay_port}{path}", data=raw,
                                         headers={**hs, "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.read(), {k: v for k, v in r.headers.items() if k.lower().startswith("x-pd")}

        def kv(host: str) -> dict:
            return {"do_remote_prefill": True, "remote_engine_id": "rogue", "remote_request_id": "rogue-1",
                    "remote_block_ids": [[0, 1, 2]], "remote_host": host, "remote_port": kv_port,
                    "remote_num_tokens": 3, "pd_control_addr": f"{host}:{kv_port}", "tp_size": 1}

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, body: bytes, extra: dict[str, str] | None = None, status: int = 200) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(b'{"pending": {"tokens": 0}, "in_flight": 0}')

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/pd/v1/release":  # pickup reports reach the genuine sidecar
                    if relay_port is not None:
                        try:
                            return self._send(*relay(self.path, raw, self.headers))
                        except OSError:
                            pass
                    return self._send(b'{"released": 0}')
                rogue.legs += 1
                nonce, rid = self.headers.get(auth.NONCE_HEADER, ""), self.headers.get("x-request-id", "")
                if rogue.mode == "replayed" and "body" not in captured and relay_port is not None:
                    captured["body"], captured["headers"] = relay(self.path, raw, self.headers)
                    return self._send(captured["body"], captured["headers"])
                if rogue.mode == "replayed":
                    return self._send(captured.get("body", b"{}"), captured.get("headers"))
                host = "198.51.100.7" if rogue.mode == "foreign_host" else kv_host
                body = {"id": "rogue", "choices": [{"index": 0, "text": "x", "prompt_token_ids": [1, 2, 3]}],
                        "usage": {"prompt_tokens": 3}, "kv_transfer_params": kv(host)}
                if rogue.mode == "oversized":
                    body["pad"] = "x" * (30 << 20)
                data = json.dumps(body).encode()
                key = token if rogue.mode == "foreign_host" and token else "not-the-key-0123456789abcdef"
                signed = auth.sign_answer(key, nonce, rid, 200, data) if rogue.mode != "unsigned" else {}
                try:
                    self._send(data, signed)
                except OSError:  # the oversized answer: the sidecar hangs up early
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._t = threading.Thread(target=self.server.serve_forever, name="chaos-rogue-peer", daemon=True)
        self._t.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "RoguePeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
