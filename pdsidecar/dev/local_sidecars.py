"""Start a prefill and a decode sidecar as real subprocesses next to two local engines
(or one decode sidecar alone in front of one engine)."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pdsidecar.dev.engines import Engine, EngineError
from pdsidecar.dev.procs import free_port


class SidecarProcess:
    """One `pdsidecar run` subprocess with readiness wait and clean stop."""

    def __init__(self, role: str, argv: list[str], port: int, log_dir: Path):
        self.role = role
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"sidecar-{role}-{port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "pdsidecar", "run", "--role", role, *argv],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"{self.role} sidecar exited with code {self.proc.returncode}; log "
                                  f"{self.log_path}:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise EngineError(f"{self.role} sidecar not ready after {timeout_s:.0f}s; log {self.log_path}")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@dataclass
class LocalSidecars:
    prefill: SidecarProcess
    decode: SidecarProcess
    decode2: SidecarProcess | None = None  # a second decode sidecar (other options, same engine)

    @property
    def prefill_url(self) -> str:
        return self.prefill.url

    @property
    def decode_url(self) -> str:
        return self.decode.url

    def stop(self) -> None:
        if self.decode2 is not None:
            self.decode2.stop()
        self.decode.stop()
        self.prefill.stop()


def start_sidecars(prefill: Engine, decode: Engine, args=None, decode_port: int | None = None,
                   extra_decode_args: list[str] | None = None,
                   second_decode_args: list[str] | None = None) -> LocalSidecars:
    """A prefill sidecar fronting `prefill` and a decode sidecar fronting `decode`, on loopback.

    They share a random token; each allows only the other's host:port. `second_decode_args`:
    also a second decode sidecar in front of `decode` with these extra options (the prefill
    sidecar allows both).
    """
    token = secrets.token_hex(16)
    log_dir = prefill.log_path.parent
    p_port = free_port()
    d_port = decode_port or getattr(args, "port", None) or free_port()
    d2_port = free_port() if second_decode_args is not None else None
    allowed = ",".join(f"127.0.0.1:{x}" for x in (d_port, d2_port) if x is not None)
    common = ["--host", "127.0.0.1", "--auth-token", token, "--log-level", "warning"]
    p = SidecarProcess("prefill", [*common, "--port", str(p_port), "--vllm-url", prefill.url,
                                   "--advertise", f"127.0.0.1:{p_port}",
                                   "--allowed-peers", allowed], p_port, Path(log_dir))
    decodes: list[SidecarProcess] = []

    def decode_sidecar(port: int, extra: list[str]) -> SidecarProcess:
        return SidecarProcess("decode", [*common, "--port", str(port), "--vllm-url", decode.url,
                                         "--advertise", f"127.0.0.1:{port}",
                                         "--kv-transfer-target", f"127.0.0.1:{p_port}",
                                         "--allowed-peers", f"127.0.0.1:{p_port}", *extra], port, Path(log_dir))
    try:
        decodes.append(decode_sidecar(d_port, extra_decode_args or []))
        if d2_port is not None:
            decodes.append(decode_sidecar(d2_port, [*(extra_decode_args or []), *(second_decode_args or [])]))
        for sc in (p, *decodes):
            sc.wait_ready()
    except BaseException:
        for sc in decodes:
            sc.stop()
        p.stop()
        raise
    return LocalSidecars(p, decodes[0], decodes[1] if len(decodes) > 1 else None)


def start_local_sidecar(engine: Engine, extra_args: list[str] | None = None) -> SidecarProcess:
    """A decode sidecar with no prefill peer in front of `engine`, on loopback: every request
    takes its local path (`x-pd-path: local`, reason `no_peer`), the engine serves it whole."""
    port = free_port()
    sc = SidecarProcess("decode", ["--host", "127.0.0.1", "--port", str(port), "--vllm-url", engine.url,
                                   "--advertise", f"127.0.0.1:{port}", "--log-level", "warning",
                                   *(extra_args or [])], port, engine.log_path.parent)
    try:
        sc.wait_ready()
    except BaseException:
        sc.stop()
        raise
    return sc
