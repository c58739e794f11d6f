"""A failed KV load is never counted as disaggregated (sidecar side, fake upstreams;
tests/test_pods.py checks the same against real engines across pods)."""

from __future__ import annotations

import json

import pytest

from proxy.kv_report import load_failure
from test_proxy_unit import post, stack, val


def _kv(error: str, nbytes: int = 0) -> dict:
    return {"pd_transfer": {"bytes": nbytes, "ms": 1.0, "blocks": 1, "backend": "UCX", "error": error}}


@pytest.mark.parametrize("kv,expected", [
    (_kv(""), None),
    (_kv("transfer_failed"), "transfer_failed"),
    (_kv("timeout"), "timeout"),
    (_kv("something new"), "other"),
    ({"pd_transfer": {"error": 7}}, "other"),
    (None, None),  # stock NixlConnector: the decode answer carries nothing
    ({"pd_transfer": "x"}, None),
])
def test_load_failure_reason(kv, expected):
    assert load_failure(kv) == expected


async def test_failed_load_is_labelled_recompute_not_disagg():
    s = await stack(d_kw={"decode_kv": _kv("transfer_failed")})
    try:
        status, h, data = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 200 and h["x-pd-path"] == "recompute"
        assert json.loads(data)["choices"]
        assert val(s.dec, "pd_kv_load_failures_total", reason="transfer_failed") == 1
        assert val(s.dec, "pd_requests_total", role="decode", api="completions", path="recompute") == 1
        assert val(s.dec, "pd_requests_total", role="decode", api="completions", path="disagg") == 0
        assert val(s.dec, "pd_kv_transfer_bytes_count") == 0
    finally:
        await s.stop()


async def test_successful_load_stays_disagg():
    s = await stack(d_kw={"decode_kv": _kv("", 4096)})
    try:
        status, h, _ = await post(s.dec.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 200 and h["x-pd-path"] == "disagg"
        assert val(s.dec, "pd_requests_total", role="decode", api="completions", path="disagg") == 1
        assert val(s.dec, "pd_kv_load_failures_total", reason="transfer_failed") == 0
    finally:
        await s.stop()
