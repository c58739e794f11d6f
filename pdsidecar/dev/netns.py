"""Private network namespaces for "pods on one machine" (root only).

Layout (nothing is added to the machine's root network namespace):

* one *outer* namespace per harness, ``pdpods-<pid>-<start>``: a bridge ``br0`` with
  the node address ``10.77.0.1/24`` (the harness's own clients talk from here);
* one namespace per pod, ``pdpods-<pid>-<start>-<pod>``: ``lo`` and ``eth0`` (a veth
  whose peer sits in the outer namespace on ``br0``) with the pod IP ``10.77.0.N/24``.

``<pid>-<start>`` is the harness process id and its start time (``/proc/<pid>/stat``
field 22), so a later run can tell a live harness from a dead one even after the pid
was reused. Cleanup, in order of what is guaranteed:

1. normal exit, an exception, SIGTERM turned into an exception: :meth:`PodNetwork.close`
   stops every process inside the namespaces, deletes them and their ``/etc/netns``
   files;
2. the harness killed outright (SIGKILL, OOM): the containers get SIGKILL from the
   kernel (parent-death signal, see ``pdsidecar.dev.pods``), and a *reaper* process
   started with the network (own session, so a group kill of the harness misses it)
   blocks reading a pipe only the harness holds; the pipe's EOF wakes it and it does
   step 1's work (kills whatever is still inside, deletes the namespaces);
3. harness and reaper both gone (e.g. both SIGKILLed): the next :class:`PodNetwork`
   (or ``python -m pdsidecar.dev.netns --sweep``) removes every ``pdpods-*`` namespace
   whose harness is dead before it creates its own. A reboot empties ``/run/netns``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "pdpods"
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
SUBNET = "10.77.0"  # /24 inside each harness's own outer namespace
NODE_IP = f"{SUBNET}.1"
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)(?:-[a-z0-9-]+)?$")
CLONE_NEWNET = 0x40000000


class NetnsError(Exception):
    """A namespace operation failed; the message says what to do."""


def can_create() -> str | None:
    """None when this process may create network namespaces, else why not (one line)."""
    if sys.platform != "linux":
        return "pods need Linux network namespaces"
    if os.geteuid() != 0:
        return ("pods need root (network namespaces, veth, bridge): run as root, e.g. "
                "`sudo .venv/bin/pdsidecar local --pods`, or drop --pods to run on 127.0.0.1")
    if shutil.which("ip") is None:
        return "pods need the `ip` tool (iproute2): apt-get install iproute2"
    if shutil.which("unshare") is None:
        return "pods need `unshare` (util-linux): apt-get install util-linux"
    return None


def ip(*args: str, timeout: float = 10.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS`` (raises NetnsError with ip's message on failure)."""
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {p.stderr.strip() or p.returncode}")
    return p


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2:].split()[19])


def owner_alive(name: str) -> bool:
    """Is the harness that created namespace ``name`` still running?"""
    m = _NAME_RE.match(name)
    if not m:
        return True  # not ours: never touch it
    return _start_time(int(m.group(1))) == int(m.group(2))


def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except OSError:
        return []


def processes_in(ns: str) -> list[int]:
    """Pids whose network namespace is the named namespace ``ns``."""
    try:
        st = os.stat(NETNS_DIR / ns)
    except OSError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            s = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (s.st_ino, s.st_dev) == (st.st_ino, st.st_dev):
            out.append(int(entry))
    return out


def kill_all_in(names: list[str], grace_s: float = 5.0) -> None:
    """SIGTERM every process inside the namespaces, SIGKILL what is left after grace_s."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        pids = [p for n in names for p in processes_in(n)]
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end and any(processes_in(n) for n in names):
            time.sleep(0.1)


def delete_namespaces(names: list[str]) -> None:
    """Stop the processes inside, then delete the namespaces and their /etc/netns files."""
    kill_all_in(names)
    for n in sorted(names, key=len, reverse=True):  # pods before their outer namespace
        ip("netns", "del", n, check=False)
        shutil.rmtree(ETC_NETNS / n, ignore_errors=True)


def sweep_stale() -> list[str]:
    """Delete every ``pdpods-*`` namespace whose harness is dead; returns their names."""
    stale = [n for n in list_namespaces() if _NAME_RE.match(n) and not owner_alive(n)]
    if stale:
        delete_namespaces(stale)
    return stale


_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(e)}")


@contextlib.contextmanager
def entered(ns: str):
    """Run the body with *this thread* in network namespace ``ns``.

    Sockets opened inside stay in ``ns`` for their whole life (open and use HTTP
    connections inside the block; don't keep pooled clients across blocks).
    """
    import threading

    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / ns, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


@dataclass
class PodNet:
    """One pod's namespace and address."""

    name: str  # pod name (e.g. "prefill")
    ns: str  # namespace name
    ip: str
    veth: str  # its peer end in the outer namespace (link down = pod unreachable)


class PodNetwork:
    """The harness's outer namespace with a bridge, and one namespace per pod."""

    def __init__(self) -> None:
        why = can_create()
        if why:
            raise NetnsError(why)
        sweep_stale()
        me = os.getpid()
        self.tag = f"{PREFIX}-{me}-{_start_time(me)}"
        self.outer = self.tag
        self.pods: dict[str, PodNet] = {}
        self._next = 2
        self._reaper: subprocess.Popen | None = None
        self._closed = False
        try:
            ip("netns", "add", self.outer)
            self._start_reaper()
            ip("-n", self.outer, "link", "set", "lo", "up")
            ip("-n", self.outer, "link", "add", "br0", "type", "bridge")
            ip("-n", self.outer, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
            ip("-n", self.outer, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _start_reaper(self) -> None:
        r, w = os.pipe()
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "pdsidecar.dev.netns", "--reap", self.tag],
            stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        os.close(r)
        os.set_inheritable(w, False)
        self._reaper_pipe = w

    def add_pod(self, name: str, ip_addr: str | None = None) -> PodNet:
        """A new pod namespace on the bridge (``name``: lowercase letters, digits, -)."""
        if not re.fullmatch(r"[a-z0-9-]{1,20}", name) or name in self.pods:
            raise NetnsError(f"bad or duplicate pod name {name!r}")
        addr = ip_addr or f"{SUBNET}.{self._next}"
        self._next += 1
        ns = f"{self.tag}-{name}"
        veth = f"v{len(self.pods)}-{name}"[:15]
        ip("netns", "add", ns)
        pod = PodNet(name, ns, addr, veth)
        self.pods[name] = pod
        ip("-n", self.outer, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.outer, "link", "set", veth, "master", "br0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        return pod

    def remove_pod(self, name: str) -> None:
        pod = self.pods.pop(name)
        delete_namespaces([pod.ns])

    def set_link(self, name: str, up: bool) -> None:
        """Pull (or plug back) the pod's cable: its veth peer on the bridge goes down."""
        ip("-n", self.outer, "link", "set", self.pods[name].veth, "up" if up else "down")

    def write_hosts(self, hosts: dict[str, str]) -> None:
        """``/etc/hosts`` as every pod sees it (``ip netns exec`` mounts
        /etc/netns/<ns>/hosts over /etc/hosts): the cluster DNS stand-in. Rewritten in
        place, so already-running pods see changes (glibc reads it on every lookup)."""
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{addr} {name}" for name, addr in sorted(hosts.items())]
        text = "\n".join(lines) + "\n"
        for pod in self.pods.values():
            d = ETC_NETNS / pod.ns
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "hosts", "a+") as f:  # same inode: bind mounts follow
                f.seek(0)
                f.truncate()
                f.write(text)

    def exec_prefix(self, name: str, *, isolate: bool = True, shm_size: str = "1g",
                    hostname: str | None = None) -> list[str]:
        """Command prefix that runs a program inside pod ``name``.

        ``isolate``: also its own IPC, PID and UTS namespaces (hostname = ``hostname``,
        default the pod name) and a private ``/dev/shm``, as pods on different hosts (or
        any two Kubernetes pods) have, so shared-memory transports (UCX sm/cma, CUDA IPC)
        cannot reach across pods and a "same host" check by hostname sees two hosts, as it
        does in Kubernetes. The program runs as
        pid 1 of its PID namespace under ``unshare`` (same process group; ``unshare``
        forwards nothing, so stop the group)."""
        prefix = ["ip", "netns", "exec", self.pods[name].ns]
        if not isolate:
            return prefix
        host = hostname or name
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{0,62}", host):
            raise NetnsError(f"bad hostname {host!r}")
        return prefix + ["unshare", "--ipc", "--pid", "--uts", "--fork", "--kill-child", "--mount-proc", "--",
                         "sh", "-c", f'mount -t tmpfs -o size={shm_size},mode=1777 podshm /dev/shm && '
                                     f'hostname {host} && exec "$@"', f"pod-{name}"]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        delete_namespaces([p.ns for p in self.pods.values()] + [self.outer])
        self.pods.clear()
        if self._reaper is not None:
            os.close(self._reaper_pipe)  # the reaper wakes, finds nothing, exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._reaper.wait(timeout=15)

    def __enter__(self) -> "PodNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reap(tag: str) -> int:
    """Reaper body: wait for the harness's pipe to close, then delete its namespaces."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the harness's terminal
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    names = [n for n in list_namespaces() if n == tag or n.startswith(tag + "-")]
    if names:
        delete_namespaces(names)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pdsidecar.dev.netns",
                                 description="clean up pod namespaces of dead harnesses")
    ap.add_argument("--sweep", action="store_true", help="delete pdpods-* namespaces whose harness is dead")
    ap.add_argument("--reap", metavar="TAG", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.reap:
        return _reap(ns.reap)
    for n in sweep_stale():
        print(f"deleted {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
