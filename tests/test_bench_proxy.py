"""`pdbench proxy` end to end on fake upstreams (real sidecar processes, a few requests)."""

from __future__ import annotations

import json

from bench import proxy as bench_proxy


def test_proxy_bench_reports_sidecar_and_bare_hop(tmp_path):
    out = tmp_path / "proxy.json"
    rc = bench_proxy.main(["--upstream", "fake", "--path", "local", "--concurrency", "2", "--requests", "6",
                           "--warmup", "1", "--hop-baseline", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    level = res["workers"]["1"]["paths"]["local"]["2"]
    for target in ("direct", "sidecar", "bare-hop"):
        assert level[target]["n"] == 6 and level[target]["ttfb_50_ms"] > 0
    assert set(level["added"]) == set(level["bare_hop_added"])


def test_proxy_bench_bad_lists_are_a_cli_error(capsys):
    assert bench_proxy.main(["--concurrency", "1,x"]) == 2
    assert "comma lists of integers" in capsys.readouterr().err
