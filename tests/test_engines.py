"""Engine harness: readiness, clear errors, no orphans after stop."""

from __future__ import annotations

import socket
import time

import pytest

from pdsidecar.dev.engines import Engine, EngineConfig, EngineError
from pdsidecar.dev.procs import _ephemeral_range, bind_cpus, free_port, group_members


def _pids_of_group(pgid: int) -> list[int]:
    return group_members(pgid)


def test_busy_port_is_a_clear_error(llama_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(EngineError, match=f"port {port} .* in use"):
            Engine(EngineConfig(model=llama_dir, port=port)).start()


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        Engine(EngineConfig(model=str(tmp_path / "nope"))).start()


@pytest.mark.engines
def test_bad_model_fails_fast_with_log_tail(tmp_path):
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    e = Engine(EngineConfig(model=str(bad), cpu_bind="0", startup_timeout_s=120))
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="exited with code") as info:
        e.start().wait_ready()
    assert time.monotonic() - t0 < 120
    assert "log" in str(info.value)
    assert e.proc is None


@pytest.mark.engines
def test_stop_leaves_no_process_behind(llama_dir, engine_pool):
    e = Engine(EngineConfig(model=llama_dir, cpu_bind="0", log_dir=engine_pool.log_dir))
    e.start().wait_ready()
    pgid = e.proc.pid
    members = _pids_of_group(pgid)
    assert len(members) >= 2  # api server + engine core (+ worker)
    # the engine core and its worker stay on the engine's core, not only the OMP
    # threads; the API server (the group leader) may float once the engine is ready
    affinities = {pid: _affinity(pid) for pid in members if pid != pgid}
    assert affinities and all(a in (None, {0}) for a in affinities.values()), affinities
    import os
    assert _affinity(pgid) == os.sched_getaffinity(0)
    e.stop()
    # Only live members count: in a container whose PID 1 does not reap, the
    # engine core's exited children stay zombies (and keep the group id alive)
    # until that init collects them, which is outside our control.
    assert _pids_of_group(pgid) == []
    assert e.proc is None


def _affinity(pid: int) -> set[int] | None:
    import os

    try:
        return os.sched_getaffinity(pid)
    except OSError:  # exited meanwhile
        return None


@pytest.mark.parametrize("spec,cpus", [
    ("0", {0}), ("0,2", {0, 2}), ("1-3", {1, 2, 3}), ("0|1", {0, 1}), ("0-1|4-5", {0, 1, 4, 5}),
    ("auto", None), ("nobind", None), ("", None), (None, None), ("0-x", None),
])
def test_bind_cpus_parses_vllm_bind_values(spec, cpus):
    assert bind_cpus(spec) == cpus


def test_child_is_confined_to_its_cores():
    """The engine's whole process (not only vLLM's OMP threads) runs on its cores."""
    import os
    import subprocess
    import sys

    from pdsidecar.dev.procs import child_setup

    core = sorted(os.sched_getaffinity(0))[-1]
    out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                         capture_output=True, text=True, preexec_fn=child_setup({core}), check=True)
    assert out.stdout.strip() == str([core])


def test_children_die_with_their_starter(tmp_path):
    """Engines run in their own session; a SIGKILLed starter must not leave them behind."""
    import signal
    import subprocess
    import sys

    pidfile = tmp_path / "child.pid"
    starter = (
        "import subprocess, time, pathlib\n"
        "from pdsidecar.dev.procs import die_with_parent\n"
        "p = subprocess.Popen(['sleep', '300'], start_new_session=True, preexec_fn=die_with_parent)\n"
        f"pathlib.Path({str(pidfile)!r}).write_text(str(p.pid))\n"
        "time.sleep(300)\n"
    )
    s = subprocess.Popen([sys.executable, "-c", starter])
    deadline = time.monotonic() + 60
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    s.send_signal(signal.SIGKILL)
    s.wait(10)
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "child outlived its SIGKILLed starter"


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_free_ports_sit_below_the_ephemeral_range_and_never_repeat():
    """A harness port from the kernel's ephemeral range can be taken as some outgoing
    connection's source port before its server binds (a CI run lost a sidecar to
    "address already in use" so): handed-out ports stay below it and are unique."""
    lo, _ = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if lo > 21000:
        assert all(20000 <= p < lo for p in ports)
    for p in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))

