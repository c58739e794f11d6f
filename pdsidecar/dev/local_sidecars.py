"""Start a prefill and a decode sidecar as real subprocesses next to two local engines."""

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

    @property
    def prefill_url(self) -> str:
        return self.prefill.url

    @property
    def decode_url(self) -> str:
        return self.decode.url

    def stop(self) -> None:
        self.decode.stop()
        self.prefill.stop()


def start_sidecars(prefill: Engine, decode: Engine, args=None, decode_port: int | None = None,
                   extra_decode_args: list[str] | None = None) -> LocalSidecars:
    """A prefill sidecar fronting `prefill` and a decode sidecar fronting `decode`, on loopback.

    They share a random token; each allows only the other's host:port.
    """
    token = secrets.token_hex(16)
    log_dir = prefill.log_path.parent
    p_port = free_port()
    d_port = decode_port or getattr(args, "port", None) or free_port()
    common = ["--host", "127.0.0.1", "--auth-token", token, "--log-level", "warning"]
    p = SidecarProcess("prefill", [*common, "--port", str(p_port), "--vllm-url", prefill.url,
                                   "--advertise", f"127.0.0.1:{p_port}",
                                   "--allowed-peers", f"127.0.0.1:{d_port}"], p_port, Path(log_dir))
    d = None
    try:
        d = SidecarProcess("decode", [*common, "--port", str(d_port), "--vllm-url", decode.url,
                                      "--advertise", f"127.0.0.1:{d_port}",
                                      "--kv-transfer-target", f"127.0.0.1:{p_port}",
                                      "--allowed-peers", f"127.0.0.1:{p_port}",
                                      *(extra_decode_args or [])], d_port, Path(log_dir))
        p.wait_ready()
        d.wait_ready()
    except BaseException:
        if d is not None:
            d.stop()
        p.stop()
        raise
    return LocalSidecars(p, d)
