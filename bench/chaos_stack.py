"""`pdbench chaos`: the stack under test and how to read its state.

A prefill and a decode vLLM engine (`pdsidecar.dev.engines`), a prefill and a decode sidecar
as real `pdsidecar run` subprocesses, and a `FaultProxy` on loopback between the decode
sidecar and the prefill sidecar (the decode sidecar's KV_TRANSFER_TARGET is the proxy).
Also the load profiles and the metric probes (engine KV usage and running/waiting
requests, sidecar pending maps, RSS) the leak checks read. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.chaos_faults import FaultProxy
from pdsidecar.dev.engines import Engine, EngineConfig, pd_pair_configs, stock_nixl_config
from pdsidecar.dev.procs import free_port
from pdsidecar.dev.local_sidecars import SidecarProcess
from proxy.pending import UNREPORTED_LEASE_S


WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega cache block token layer expert "
         "router prefill decode transfer memory tensor vector matrix queue stream server client request river "
         "mountain forest story engine").split()


# --------------------------------------------------------------------------- #
# profiles


@dataclass(frozen=True)
class Profile:
    name: str
    load_n: int
    load_c: int
    fault_n: int
    fault_c: int
    cancel_n: int
    max_tokens: int = 8
    identity_sample: int = 12


PROFILES = {
    "short": Profile("short", load_n=60, load_c=16, fault_n=24, fault_c=6, cancel_n=16),
    "full": Profile("full", load_n=1000, load_c=64, fault_n=200, fault_c=32, cancel_n=100, identity_sample=40),
}


# --------------------------------------------------------------------------- #
# metrics helpers


def _get(url: str, timeout: float = 3.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def prom_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for fam in text_string_to_metric_families(_get(url + "/metrics").decode()):
        for s in fam.samples:
            out.append((s.name, dict(s.labels), s.value))
    return out


def engine_state(url: str) -> dict[str, float]:
    """running, waiting, kv usage (0..1) and total KV blocks of a vLLM engine."""
    st = {"running": 0.0, "waiting": 0.0, "usage": 0.0, "blocks": 0.0}
    for name, labels, v in prom_samples(url):
        if name == "vllm:num_requests_running":
            st["running"] += v
        elif name == "vllm:num_requests_waiting":
            st["waiting"] += v
        elif name == "vllm:kv_cache_usage_perc":
            st["usage"] = max(st["usage"], v)
        elif name == "vllm:cache_config_info" and labels.get("num_gpu_blocks", "").isdigit():
            st["blocks"] = float(labels["num_gpu_blocks"])
    return st


def sidecar_state(url: str) -> dict[str, Any]:
    """pending requests (stats + pd_pending_kv_requests gauge), in-flight, draining."""
    stats = json.loads(_get(url + "/pd/v1/stats"))
    gauge = sum(v for n, _, v in prom_samples(url) if n == "pd_pending_kv_requests")
    pend = stats.get("pending") or {}
    return {"pending": int(pend.get("requests", 0) or 0), "pending_gauge": gauge,
            "in_flight": int(stats.get("in_flight", 0) or 0), "draining": bool(stats.get("draining"))}


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


# --------------------------------------------------------------------------- #
# the stack


@dataclass
class StackOptions:
    connect_timeout_s: float = 1.0
    prefill_timeout_s: float = 10.0
    decode_timeout_s: float = 30.0
    total_timeout_s: float = 30.0
    drain_grace_s: float = 30.0
    kv_lease_s: int = 8  # stock NixlConnector: prefill frees unread KV after this (kv_lease_duration)
    client_slack_s: float = 10.0
    server_keepalive_s: float = 20.0
    log_level: str = "info"

    @property
    def client_bound_s(self) -> float:
        """A request not answered within this is *hung* (sidecar total timeout + slack)."""
        return self.total_timeout_s + self.client_slack_s


def chaos_connector_config(kind: str, opts: StackOptions | None = None) -> dict[str, Any]:
    """The engines' kv-transfer-config: stock NixlConnector (with a short KV lease and
    recompute on load failure, as a deployment would set them) or ours."""
    opts = opts or StackOptions()
    if kind == "ours":
        from pdsidecar.dev.local import connector_config

        return connector_config("ours")[1]
    cfg = stock_nixl_config()
    cfg["kv_load_failure_policy"] = "recompute"
    cfg["kv_connector_extra_config"] = {"kv_lease_duration": opts.kv_lease_s}
    return cfg


def chaos_engine_configs(model: str, connector: str, log_dir: str | None, opts: StackOptions | None = None
                         ) -> list[EngineConfig]:
    return pd_pair_configs(model, chaos_connector_config(connector, opts), stock=(connector == "stock"),
                           log_dir=log_dir)


class ChaosStack:
    """Engines + both sidecars (subprocesses) + a FaultProxy between the sidecars."""

    def __init__(self, engines: list[Engine], log_dir: str | Path, opts: StackOptions | None = None):
        self.prefill_engine, self.decode_engine = engines
        self.model = self.prefill_engine.model_name
        self.opts = opts or StackOptions()
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.p_port = free_port()
        self.d_port = free_port()
        self.proxy = FaultProxy(self.p_port)
        self.prefill: SidecarProcess | None = None
        self.decode: SidecarProcess | None = None
        self.owned_engines: list[Engine] = []
        self._incarnation = 0
        self.all_logs: list[Path] = []

    # --------------------------------------------------------------- sidecars
    def _common(self) -> list[str]:
        o = self.opts
        return ["--host", "127.0.0.1", "--auth-token", self.token, "--log-level", o.log_level,
                "--log-format", "json", "--connect-timeout", str(o.connect_timeout_s),
                "--prefill-timeout", str(o.prefill_timeout_s), "--decode-timeout", str(o.decode_timeout_s),
                "--total-timeout", str(o.total_timeout_s), "--drain-grace", str(o.drain_grace_s),
                "--server-keepalive", str(o.server_keepalive_s)]

    def _logdir(self, role: str) -> Path:
        self._incarnation += 1
        d = self.log_dir / f"{role}-{self._incarnation}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start_prefill_sidecar(self) -> SidecarProcess:
        d = self._logdir("prefill")
        self.prefill = SidecarProcess("prefill", [*self._common(), "--port", str(self.p_port),
                                                  "--vllm-url", self.prefill_engine.url,
                                                  "--advertise", f"127.0.0.1:{self.p_port}",
                                                  "--allowed-peers", f"127.0.0.1:{self.d_port}"],
                                                 self.p_port, d)
        self.all_logs.append(self.prefill.log_path)
        self.prefill.wait_ready()
        return self.prefill

    def start_decode_sidecar(self) -> SidecarProcess:
        d = self._logdir("decode")
        self.decode = SidecarProcess("decode", [*self._common(), "--port", str(self.d_port),
                                                "--vllm-url", self.decode_engine.url,
                                                "--advertise", f"127.0.0.1:{self.d_port}",
                                                "--kv-transfer-target", f"127.0.0.1:{self.proxy.port}",
                                                "--peer-stats-interval", "1"], self.d_port, d)
        self.all_logs.append(self.decode.log_path)
        self.decode.wait_ready()
        return self.decode

    def start(self) -> "ChaosStack":
        self.proxy.start()
        self.start_prefill_sidecar()
        self.start_decode_sidecar()
        return self

    @property
    def decode_url(self) -> str:
        return f"http://127.0.0.1:{self.d_port}"

    @property
    def prefill_url(self) -> str:
        return f"http://127.0.0.1:{self.p_port}"

    def ensure_up(self) -> None:
        """Restart whatever a scenario left stopped (sidecars, proxy mode)."""
        self.proxy.set_mode("pass")
        if self.prefill is None or self.prefill.proc.poll() is not None:
            self.start_prefill_sidecar()
        if self.decode is None or self.decode.proc.poll() is not None:
            self.start_decode_sidecar()

    def restart_prefill_engine(self) -> Engine:
        """A fresh prefill engine on the same port (new engine id): the decode engine must
        notice the stale peer and handshake again."""
        old = self.prefill_engine
        old.kill(signal.SIGKILL)
        old.stop()
        cfg = dataclasses.replace(old.config, port=old.port)
        new = Engine(cfg)
        new.start()
        new.wait_ready()
        self.owned_engines.append(new)
        self.prefill_engine = new
        return new

    def close(self) -> None:
        for sc in (self.decode, self.prefill):
            if sc is not None:
                try:
                    sc.stop(timeout_s=10)
                except Exception:
                    pass
        self.proxy.stop()
        for e in self.owned_engines:
            e.stop()

    def logs_text(self) -> str:
        out = []
        for p in self.all_logs:
            try:
                out.append(p.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)

    # ------------------------------------------------------------ settle/leaks
    def settle(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait until nothing is held anywhere; return the last observation.

        `leaked_blocks` = KV blocks still in use on both engines (usage x total blocks);
        `pending` = sidecar pending entries; `busy` = engine running+waiting requests."""
        o = self.opts
        # the prefill sidecar forgets pending KV at the engine's lease as its params say; the
        # stock connector says nothing, so the sidecar's UNREPORTED_LEASE_S applies
        timeout_s = timeout_s if timeout_s is not None else o.kv_lease_s + UNREPORTED_LEASE_S + 15
        end = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while True:
            try:
                dead = {"running": 0.0, "waiting": 0.0, "usage": 0.0, "blocks": 0.0}
                pe = engine_state(self.prefill_engine.url) if self.prefill_engine.alive() else dead
                de = engine_state(self.decode_engine.url)
                ps = sidecar_state(self.prefill_url) if self._alive(self.prefill) else {"pending": 0, "pending_gauge": 0, "in_flight": 0}
                ds = sidecar_state(self.decode_url) if self._alive(self.decode) else {"pending": 0, "pending_gauge": 0, "in_flight": 0}
                leaked = round(pe["usage"] * pe["blocks"]) + round(de["usage"] * de["blocks"])
                last = {"leaked_blocks": leaked, "prefill_usage": pe["usage"], "decode_usage": de["usage"],
                        "busy": int(pe["running"] + pe["waiting"] + de["running"] + de["waiting"]),
                        "pending": ps["pending"] + ds["pending"],
                        "pending_gauge": ps["pending_gauge"] + ds["pending_gauge"],
                        "in_flight": ps["in_flight"] + ds["in_flight"]}
                if (leaked == 0 and last["busy"] == 0 and last["pending"] == 0 and last["pending_gauge"] == 0
                        and last["in_flight"] == 0):
                    last["settled"] = True
                    return last
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = {**last, "error": f"{type(e).__name__}"}
            if time.monotonic() > end:
                last["settled"] = False
                return last
            time.sleep(0.5)

    @staticmethod
    def _alive(sc: SidecarProcess | None) -> bool:
        return sc is not None and sc.proc.poll() is None
