"""`bench/itl_probe.py`: bad arguments end with a usage message before any engine starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, needle", [
    (["--leg-lengths", "128", "x"], "--leg-lengths: invalid int value: 'x'"),
    (["--leg-lengths", "128", "0"], "--leg-lengths: each length >= 1"),
    (["--leg-lengths", "8192", "--max-model-len", "8192"], "< --max-model-len"),
    (["-n", "0"], "-n >= 1"),
])
def test_bad_arguments_are_refused_before_engines_start(argv: list[str], needle: str) -> None:
    r = subprocess.run([sys.executable, "-m", "bench.itl_probe", *argv], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
