"""`pdsidecar local` end to end: real engines, real sidecars (when installed), real client."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.engines
def test_local_short_prints_pd_completion_equal_to_aggregated(llama_dir, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pdsidecar", "local", "--short", "--model", llama_dir, "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "identical to aggregated: yes" in out
    moved = re.findall(r"KV moved: (\d+) bytes", out)
    assert moved and all(int(b) > 0 for b in moved), out
    assert "Traceback" not in out


def test_local_port_in_use_is_one_line_error(llama_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pdsidecar", "local", "--port", str(port), "--model", llama_dir],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"port {port} is in use" in r.stderr and "Traceback" not in r.stderr
