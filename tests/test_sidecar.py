"""`python -m pdsidecar.sidecar` as a real process: env contract, probes, metrics port, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pdsidecar.dev.procs import free_port

REPO = Path(__file__).resolve().parents[1]
TOKEN = "sidecar-test-token-0123456789"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_process_env_contract_probes_and_sigterm(tmp_path):
    port, mport = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFILL_MODE="true", PDSIDECAR_PORT=str(port),
               PDSIDECAR_HOST="127.0.0.1", PDSIDECAR_METRICS_PORT=str(mport), PDSIDECAR_AUTH_TOKEN=TOKEN,
               KV_TRANSFER_TARGET="127.0.0.1:9", KV_TRANSFER_PROTOCOL="tcp",
               PDSIDECAR_VLLM_URL=f"http://127.0.0.1:{free_port()}")  # no vLLM there
    out = subprocess.run([sys.executable, "-m", "pdsidecar.sidecar", "--print-config"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and TOKEN not in out.stdout
    assert '"prefill"  # env PREFILL_MODE' in out.stdout and '"tcp"  # env KV_TRANSFER_PROTOCOL' in out.stdout
    log = open(tmp_path / "log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "pdsidecar.sidecar"], env=env, stdout=log, stderr=log)
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if get(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        status, body = get(f"http://127.0.0.1:{port}/health")
        assert status == 200 and json.loads(body)["role"] == "prefill"
        assert get(f"http://127.0.0.1:{port}/ready")[0] == 503  # local vLLM is down
        status, body = get(f"http://127.0.0.1:{mport}/metrics")
        assert status == 200 and b'pd_info{protocol="tcp",role="prefill",version=' in body
        status, body = get(f"http://127.0.0.1:{port}/pd/v1/stats")
        assert json.loads(body)["pending"]["requests"] == 0
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        log.close()
    lines = [json.loads(x) for x in (tmp_path / "log").read_text().splitlines() if x.startswith("{")]
    assert {"sidecar listening", "draining", "stopped"} <= {x["msg"] for x in lines}
    assert TOKEN not in (tmp_path / "log").read_text()


def test_process_bad_config_exit_2():
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFILL_MODE="false", KV_TRANSFER_TARGET="http://x:1")
    out = subprocess.run([sys.executable, "-m", "pdsidecar.sidecar"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("pdsidecar run: error: ") and "KV_TRANSFER_TARGET" in out.stderr
