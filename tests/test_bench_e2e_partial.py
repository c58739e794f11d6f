"""`pdbench e2e`: a configuration whose requests hang is stopped by --config-timeout and
recorded as `timeout`; the JSON is rewritten after every configuration (marked partial
until the end); the "where TTFT goes" breakdown from metric snapshots. No engines: real
HTTP servers that never answer a completion."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from bench import e2e_breakdown as bd

ROOT = Path(__file__).resolve().parents[1]


class HangingServer:
    """An OpenAI-looking server: /v1/models answers, /v1/completions never does."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.completions = 0
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        assert ready.wait(30)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def models(_r: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "hang"}]})

        async def completions(_r: web.Request) -> web.Response:
            self.completions += 1
            await asyncio.sleep(3600)
            return web.json_response({})

        async def start() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", models)
            app.router.add_post("/v1/completions", completions)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        self.loop.run_until_complete(start())
        ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def test_hanging_configs_time_out_and_json_is_written_after_each(llama_dir, tmp_path):
    a, d = HangingServer(), HangingServer()
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "-m", "bench.e2e", "--agg-url", a.url, "--decode-url", d.url, "--model", llama_dir,
           "--concurrency", "1", "--num-requests", "3", "--warmup", "0", "--config-timeout", "3",
           "--request-timeout", "60", "--prompt-len", "fixed:8", "--output-len", "fixed:2", "--long-fraction", "0",
           "--json", str(out), "--no-progress"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_partial = None
    try:
        while p.poll() is None:
            if out.exists():
                doc = json.loads(out.read_text())  # atomic rewrite: always whole JSON
                if doc["meta"]["partial"]:
                    seen_partial = doc
            time.sleep(0.05)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert "Traceback" not in stderr, stderr
    # after the first configuration: the JSON already held it, marked partial
    assert seen_partial is not None and list(seen_partial["configs"]) == ["agg"]
    assert seen_partial["configs"]["agg"]["status"] == "timeout"
    assert "partial: configurations still to run: pd" in stdout
    final = json.loads(out.read_text())
    assert final["meta"]["partial"] is False and list(final["configs"]) == ["agg", "pd"]
    for name, c in final["configs"].items():
        assert c["status"] == "timeout", (name, c.get("reason"))
        assert c["timeout"] == {"stage": "load", "config_timeout_s": 3.0, "requests_done": 0,
                                "sweep_requests_done": 0}
        assert "--config-timeout 3 s" in c["reason"]
    assert "TIMEOUT - stopped by --config-timeout" in stdout
    assert a.completions == 1 and d.completions == 1  # one request in flight each, then stopped
    assert p.returncode == 1  # nothing finished


def _snap(pairs: dict[str, tuple[float, float]], labels: tuple = ()) -> dict:
    out = {}
    for fam, (s, n) in pairs.items():
        out[(fam + "_sum", labels)] = s
        out[(fam + "_count", labels)] = n
    return out


def test_breakdown_delta_means_and_derived_gaps():
    before = {"decode_sidecar": _snap({"pd_prefill_leg_seconds": (1.0, 10), "pd_decode_leg_seconds": (2.0, 10)}),
              "prefill_engine": _snap({"vllm:e2e_request_latency_seconds": (0.5, 10)}),
              "decode_engine": _snap({"vllm:time_to_first_token_seconds": (1.0, 10),
                                      "vllm:request_queue_time_seconds": (0.2, 10)})}
    after = {"decode_sidecar": _snap({"pd_prefill_leg_seconds": (1.1, 11), "pd_decode_leg_seconds": (2.3, 11)}),
             "prefill_engine": _snap({"vllm:e2e_request_latency_seconds": (0.56, 11)}),
             "decode_engine": _snap({"vllm:time_to_first_token_seconds": (1.25, 11),
                                     "vllm:request_queue_time_seconds": (0.4, 11)})}
    b = bd.means(bd.delta(before, after))
    assert b["sc_prefill_leg"] == pytest.approx(0.1) and b["p_e2e"] == pytest.approx(0.06)
    assert b["d_queue"] == pytest.approx(0.2) and "psc_request" not in b  # source not scraped
    g = bd.derived(b, push=False, client_ttft=0.45)
    assert g["pre_hops"] == pytest.approx(0.04) and g["dec_hop"] == pytest.approx(0.05)
    assert g["rest"] == pytest.approx(0.05)  # 0.45 - (0.1 + 0.3)
    assert bd.derived(b, push=True, client_ttft=0.45)["rest"] == pytest.approx(0.15)  # legs overlap in push
    rows = bd.format_breakdown({"pd": {"status": "ok", "summary": {"ttft_s": {"mean": 0.45}}, "kv": {},
                                       "breakdown_mean": {**b, **g}}},
                               lambda c: True, lambda n, c: False)
    assert "Where TTFT goes" in rows and "load mean" in rows and "100.0" in rows


def test_breakdown_first_token_from_prefill_leaves_the_decode_leg_off_the_ttft_path():
    """A request whose first token the decode sidecar took from the prefill leg: its TTFT
    holds the prefill leg only, so "rest" is TTFT - prefill leg (never negative)."""
    def side(ttft_n: int, ft: float, dec: float) -> dict:
        snap = _snap({"pd_ttft_seconds": (0.1 * ttft_n, ttft_n), "pd_prefill_leg_seconds": (0.0, ttft_n),
                      "pd_decode_leg_seconds": (dec, ttft_n)})
        snap[("pd_first_token_from_prefill_total", (("api", "completions"),))] = ft
        return {"decode_sidecar": snap}
    b = bd.means(bd.delta(side(4, 3.0, 0.0), side(5, 4.0, 0.03)))  # one request: 30 ms decode leg
    assert b["sc_first_token"] == pytest.approx(1.0)
    b["sc_prefill_leg"] = 0.020
    assert bd.derived(b, push=False, client_ttft=0.025)["rest"] == pytest.approx(0.005)
    b["sc_first_token"] = 0.0  # the same request without: both legs on the path
    assert bd.derived(b, push=False, client_ttft=0.055)["rest"] == pytest.approx(0.005)
