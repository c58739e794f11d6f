"""Run the rendered ``dev-cpu`` pods as network-namespace pods on this machine (root).

:class:`PodCluster` renders an overlay, makes the harness's private network
(:class:`pdsidecar.dev.netns.PodNetwork`), and starts pods from the LeaderWorkerSets'
leader templates: init containers to completion, then sidecar init containers (waiting
for their startup probe), then the main containers, then every readiness probe, probed
like the kubelet does (HTTP to the pod IP, from the node's side of the bridge).

What the harness adds to what the manifests say (all of it here, nowhere else):

* the command mapping of :mod:`pdsidecar.dev.podspec` (images -> this Python);
* the ``models`` volume is this machine's tiny-model cache (shared by all pods);
* a random ``pdsidecar-auth`` token per cluster (the overlay's dev token is not used);
* the engine's CPU placement: ``VLLM_CPU_OMP_THREADS_BIND`` = the pod's own cores and
  the engine processes started on them (what a CPU manager would give a pod);
* the base environment is this process's, minus anything the manifests own
  (``PD_*``, ``PDSIDECAR_*``, ``KV_TRANSFER_*``, ``VLLM_*``, ``UCX_*``, ``POD_*``);
* DNS: ``/etc/hosts`` of each pod names the Services and LWS pods (see
  ``podspec.service_hosts``); rewritten when a pod comes back with a new IP.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets as _secrets
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pdsidecar.dev import netns
from pdsidecar.dev.podspec import ContainerSpec, PodSpec, pod_spec, render_overlay, service_hosts
from pdsidecar.dev.procs import bind_cpus, child_setup, cpu_slices, group_members, unpin_threads
from pdsidecar.parent_death import set_parent_death_signal

REPO = Path(__file__).resolve().parent.parent.parent
DEV_CPU = REPO / "deploy" / "overlays" / "dev-cpu"
_OWNED_PREFIXES = ("PD_", "PDSIDECAR_", "KV_TRANSFER_", "VLLM_", "UCX_", "POD_", "LWS_")


def _container_setup(cpus: set[int] | None, isolate: bool):
    """In the child before exec: die with the harness, start on the pod's cores.

    Isolated containers run under ``unshare --fork``, which ignores SIGTERM while it waits,
    so their death signal is SIGKILL (``--kill-child`` passes it on to the container)."""
    if not isolate:
        return child_setup(cpus)

    def setup() -> None:
        set_parent_death_signal(signal.SIGKILL)
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)
    return setup


class PodError(Exception):
    """A pod did not start or a container failed; the message carries the log tail."""


class Container:
    """One running container: a process group inside the pod's network namespace."""

    def __init__(self, spec: ContainerSpec, pod: "Pod", env: dict[str, str], cpus: set[int] | None):
        self.spec = spec
        self.pod = pod
        self.log_path = pod.log_dir / f"{pod.spec.name}-{spec.name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            pod.cluster.net.exec_prefix(pod.key, isolate=pod.cluster.isolate, hostname=pod.spec.name) + spec.argv,
            env=env, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_container_setup(cpus, pod.cluster.isolate))
        self.cpus = cpus

    def alive(self) -> bool:
        return self.proc.poll() is None

    def main_pid(self) -> int:
        """The container's own process (under ``unshare`` when pods are isolated)."""
        if not self.pod.cluster.isolate:
            return self.proc.pid
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            kids = []
        return int(kids[0]) if kids else self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def first_error(self) -> str | None:
        """The first ``SomeError: message`` line of the log (the root cause vLLM logs
        before its generic "Engine core initialization failed")."""
        import re

        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        m = re.search(r"^\s*(?:\w+\.)*(\w+(?:Error|Exception): .+)$", text, re.M)
        return m.group(1).strip()[:500] if m else None

    def stop(self, timeout_s: float = 20.0) -> None:
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            if not group_members(pgid) and self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            end = time.monotonic() + wait
            while time.monotonic() < end and group_members(pgid):
                self.proc.poll()
                time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()


class Pod:
    """A started pod: its namespace, address and containers."""

    def __init__(self, cluster: "PodCluster", key: str, spec: PodSpec, cpus: set[int] | None):
        self.cluster = cluster
        self.key = key  # namespace-level pod name (role, or role-N after a restart)
        self.spec = spec
        self.cpus = cpus
        self.log_dir = cluster.log_dir
        self.containers: dict[str, Container] = {}

    @property
    def ip(self) -> str:
        return self.spec.ip

    @property
    def ns(self) -> str:
        return self.cluster.net.pods[self.key].ns

    def url(self, port_name: str, container: str = "pdsidecar") -> str:
        return f"http://{self.ip}:{self.spec.container(container).ports[port_name]}"

    @property
    def engine(self) -> ContainerSpec:
        return next(c for c in self.spec.containers if c.is_engine)

    def _env(self, c: ContainerSpec) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_OWNED_PREFIXES) or k.startswith("PDSIDECAR_TEST_")}
        env.update(c.env)
        if c.is_engine and self.cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(self.cpus)))
        site = REPO / "pdsidecar" / "engine_site"  # the engine harness's start-up hooks (AMX), where present
        if c.is_engine and site.is_dir():
            env["PYTHONPATH"] = os.pathsep.join([str(site)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def launch(self, timeout_s: float) -> "Pod":
        """Run init containers, start sidecars (up to their startup probe) and the main
        containers; :meth:`wait_ready` next. Call from a long-lived thread: children get
        SIGTERM when the thread that started them ends (PR_SET_PDEATHSIG)."""
        self._deadline = time.monotonic() + timeout_s
        try:
            for c in self.spec.containers:
                cont = Container(c, self, self._env(c), self.cpus if c.is_engine else None)
                self.containers[c.name] = cont
                if c.kind == "init":
                    self._wait_exit(cont, self._deadline)
                elif c.kind == "sidecar" and c.startup is not None:
                    self._wait_probe(cont, c.startup, self._deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> "Pod":
        """Wait for every readiness probe (stops the pod and raises on failure)."""
        try:
            for cont in self.containers.values():
                if cont.spec.kind != "init" and cont.spec.probe is not None:
                    self._wait_probe(cont, cont.spec.probe, self._deadline)
                    if cont.spec.is_engine and self.cpus:
                        unpin_threads(cont.main_pid())  # like engines.Engine: API server floats once ready
        except BaseException:
            self.stop()
            raise
        return self

    def _fail(self, cont: Container, why: str) -> PodError:
        cause = cont.first_error()
        return PodError(f"pod {self.spec.name} ({self.ip}) container {cont.spec.name} {why}"
                        + (f"; first error: {cause}" if cause else "")
                        + f"; log {cont.log_path}:\n{cont.log_tail()}")

    def _wait_exit(self, cont: Container, deadline: float) -> None:
        while time.monotonic() < deadline:
            rc = cont.proc.poll()
            if rc is not None:
                if rc != 0:
                    raise self._fail(cont, f"(init) exited with code {rc}")
                return
            time.sleep(0.2)
        raise self._fail(cont, "(init) did not finish in time")

    def _wait_probe(self, cont: Container, probe, deadline: float) -> None:
        what = " ".join(probe.argv[-1:]) if probe.argv else f"http://{self.ip}:{probe.port}{probe.path}"
        while time.monotonic() < deadline:
            for other in self.containers.values():
                if other.spec.kind != "init" and not other.alive():
                    raise self._fail(other, f"exited with code {other.proc.returncode} before {what} answered")
            if self._probe_ok(probe):
                return
            time.sleep(0.3)
        raise self._fail(cont, f"not ready: {what} did not succeed in time")

    def _probe_ok(self, probe) -> bool:
        if probe.argv is None:
            url = f"http://{self.ip}:{probe.port}{probe.path}"
            return self.cluster.http_status(url, timeout=2.0) == 200
        try:  # exec probe: inside the pod's network namespace, like the kubelet's
            r = subprocess.run(self.cluster.net.exec_prefix(self.key, isolate=False) + probe.argv,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=probe.timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0

    def stop(self) -> None:
        # main containers first, then sidecars (reverse start order), like the kubelet
        for cont in reversed(list(self.containers.values())):
            cont.stop()
        self.containers.clear()


class PodCluster:
    """The dev-cpu pods of one overlay in this harness's own network namespaces."""

    def __init__(self, overlay: str | Path = DEV_CPU, *, model_cache: str | Path | None = None,
                 log_dir: str | Path | None = None, docs: list[dict] | None = None,
                 startup_timeout_s: float = 300.0, isolate: bool = True):
        from pdsidecar.dev.local import DEFAULT_CACHE

        self.docs = docs if docs is not None else render_overlay(overlay)
        self.model_cache = str(model_cache or DEFAULT_CACHE / "models")
        Path(self.model_cache).mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pdsidecar-pods-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token = _secrets.token_hex(24)
        self.startup_timeout_s = startup_timeout_s
        self.isolate = isolate  # own IPC/PID namespaces and /dev/shm per container (netns.exec_prefix)
        self.pods: dict[str, Pod] = {}  # role -> pod
        # each role's engine on its own cores (what a CPU manager would give the pod)
        self._cores = dict(zip(("prefill", "decode"), (bind_cpus(s) for s in cpu_slices(2))))
        self._restarts = 0
        self.net = netns.PodNetwork()

    @property
    def outer(self) -> str:
        return self.net.outer

    def start(self, role: str, docs: list[dict] | None = None, *, ip: str | None = None) -> Pod:
        """Create pod ``pd-<role>-0`` (a fresh namespace and IP) and start its containers."""
        return self.start_many([role], docs, ip=ip)[0]

    def start_many(self, roles: list[str], docs: list[dict] | None = None, *, ip: str | None = None
                   ) -> list[Pod]:
        """Start several pods; their engines load in parallel. On failure every pod of
        this call is removed again and PodError names the failing container."""
        pods: list[Pod] = []
        try:
            # every pod gets its namespace and IP first, so Services resolve to all of them
            # from the start (the decode Service is headless with publishNotReadyAddresses)
            for role in roles:
                pods.append(self._create(role, docs, ip))
            self._write_hosts()
            for pod in pods:
                pod.launch(self.startup_timeout_s)
            for pod in pods:
                pod.wait_ready()
        except BaseException:
            for pod in pods:
                self._remove(pod)
            raise
        return pods

    def _create(self, role: str, docs: list[dict] | None, ip: str | None) -> Pod:
        key = role if role not in self.net.pods else f"{role}-{self._restarts}"
        net_pod = self.net.add_pod(key, ip)
        spec = pod_spec(docs if docs is not None else self.docs, role, net_pod.ip,
                        secrets={"pdsidecar-auth": {"token": self.token}},
                        volume_dirs={"models": self.model_cache})
        pod = Pod(self, key, spec, self._cores.get(role))
        self.pods[role] = pod
        return pod

    def _remove(self, pod: Pod) -> None:
        pod.stop()
        if self.pods.get(pod.spec.role) is pod:
            del self.pods[pod.spec.role]
        if pod.key in self.net.pods:
            self.net.remove_pod(pod.key)
        self._write_hosts()

    def stop(self, role: str) -> None:
        """Delete pod ``role``: stop its containers, remove its namespace."""
        self._remove(self.pods[role])

    def restart(self, role: str, docs: list[dict] | None = None) -> Pod:
        """The pod comes back as a new pod with a new IP (Kubernetes semantics);
        ``docs``: changed manifests for the new pod."""
        self.stop(role)
        self._restarts += 1
        return self.start(role, docs)

    def _write_hosts(self) -> None:
        self.net.write_hosts(service_hosts(self.docs, {r: p.ip for r, p in self.pods.items()}))

    # ------------------------------------------------------------ client side
    def http_status(self, url: str, timeout: float = 5.0) -> int | None:
        """GET ``url`` from the node's side of the bridge; the status or None."""
        try:
            with netns.entered(self.outer), urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def get(self, url: str, timeout: float = 10.0, ns: str | None = None) -> str:
        with netns.entered(ns or self.outer), urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()

    def post_json(self, url: str, body: dict[str, Any], timeout: float = 120.0, ns: str | None = None
                  ) -> tuple[int, dict[str, str], dict]:
        req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with netns.entered(ns or self.outer):
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    return r.status, dict(r.headers), json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), json.loads(e.read() or b"{}")

    @contextlib.contextmanager
    def client_ns(self, ns: str | None = None):
        """Run the body (e.g. an ``openai`` client's calls) from the node side of the bridge."""
        with netns.entered(ns or self.outer):
            yield

    def close(self) -> None:
        for role in list(self.pods):
            with contextlib.suppress(Exception):
                self.pods.pop(role).stop()
        self.net.close()

    def __enter__(self) -> "PodCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
