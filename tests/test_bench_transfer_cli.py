"""`pdbench transfer` end to end on CPU: our engine and every baseline measure a case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nixl")

ROOT = Path(__file__).resolve().parents[1]


def test_every_dram_backend_measures_a_small_case(tmp_path: Path) -> None:
    out = tmp_path / "transfer.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.cli", "transfer", "--backends", "nixl,raw-nixl,torch,memcpy",
         "--ops", "read", "--block-bytes", "4096", "--blocks", "4", "--layers", "2",
         "--iters", "5", "--warmup", "1", "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert sorted(row["backend"] for row in rows) == ["memcpy", "nixl", "raw-nixl", "torch"]
    for row in rows:
        assert row["error"] == "" and row["iters"] == 5, row
        assert row["bytes"] == 2 * 4 * 4096 and row["gbps"] > 0, row
