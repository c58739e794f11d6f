"""`pdbench e2e`: argument errors (fast, no engines), workload/report/plot units, and one
short real run on engines (agg vs pd-stock, plus pd-ours when our connector is importable)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def e2e(*argv: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.e2e", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=None if env is None else {**os.environ, **env})


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("argv, needle", [
    (["--configs", "agg,bogus"], "unknown configuration 'bogus'"),
    (["--configs", ""], "--configs"),
    (["--rate", "-2"], "--rate: must be > 0"),
    (["--rate", "0"], "--rate: must be > 0"),
    (["--rate", "fast"], "--rate: expected a number"),
    (["--concurrency", "-1"], "--concurrency: must be >= 1"),
    (["--num-requests", "-5"], "--num-requests: must be >= 0"),
    (["--duration", "-1"], "--duration: must be > 0"),
    (["--rate", "1", "--concurrency", "2"], "exclude each other"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "cannot read prompt file"),
    (["--prompt-len", "uniform:9-3"], "--prompt-len: bad distribution"),
    (["--output-len", "normal:5"], "--output-len: bad distribution"),
    (["--long-prompt-len", "fixed:0"], "--long-prompt-len: bad distribution"),
    (["--long-fraction", "1.5"], "--long-fraction"),
    (["--sweep-tokens", "128,abc"], "--sweep-tokens"),
    (["--sweep-tokens", "9000"], "--max-model-len"),
    (["--arch", "gpt"], "--arch"),
    (["--agg-url", "localhost:8000"], "--agg-url: expected an http"),
    (["--config-timeout", "0"], "--config-timeout: must be > 0"),
    (["--config-timeout", "soon"], "--config-timeout: expected a number"),
    (["--prefill-engine-url", "http://x:1"], "need --decode-url"),
    (["--gpu-sm-share", "60,40"], "--gpu-sm-share needs --gpu-util"),
    (["--gpu-util", "0.2", "--gpu-sm-share", "60"], "expected PREFILL,DECODE percentages"),
    (["--gpu-util", "0.2", "--gpu-sm-share", "0,100"], "expected PREFILL,DECODE percentages"),
])
def test_bad_arguments_one_line_error(argv, needle):
    r = e2e(*argv)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("content, needle", [
    ("not json\n", "line 1: not JSON"),
    ('{"text": "x"}\n', "non-empty string \"prompt\""),
    ('{"prompt": "a", "max_tokens": 0}\n', "max_tokens"),
    ("\n\n", "has no prompts"),
])
def test_bad_prompt_file(tmp_path, content, needle):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    r = e2e("--prompts", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sm_share_without_an_mps_daemon(tmp_path):
    r = e2e("--gpu-util", "0.2", "--gpu-sm-share", "60,40", env={"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "no CUDA MPS daemon" in r.stderr and str(tmp_path / "control") in r.stderr


def test_unreadable_prompt_file_directory(tmp_path):
    r = e2e("--prompts", str(tmp_path))
    assert r.returncode == 2 and "cannot read prompt file" in r.stderr and "Traceback" not in r.stderr


def test_subcommand_registered():
    sys.path.insert(0, str(ROOT))
    import argparse

    from bench import e2e as mod

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    mod.add_parser(sub)
    args = p.parse_args(["e2e", "--configs", "agg"])
    assert args.func is mod.run and args.configs == "agg"


# ------------------------------------------------------------------ units (no engines)
def test_distributions_and_arrivals():
    from bench.e2e_workload import UsageError, parse_dist, poisson_arrivals

    d = parse_dist("uniform:3-7")
    rng = random.Random(0)
    assert all(3 <= d.sample(rng) <= 7 for _ in range(200))
    assert parse_dist("fixed:5").sample(rng) == 5
    with pytest.raises(UsageError):
        parse_dist("uniform:7-3")
    a = poisson_arrivals(4.0, 1, 400, None)
    assert len(a) == 400 and a == sorted(a) and a == poisson_arrivals(4.0, 1, 400, None)
    assert 70 < a[-1] < 130  # ~100 s at 4 req/s
    assert all(t < 5 for t in poisson_arrivals(4.0, 1, None, 5.0))


def test_random_prompts_have_exact_token_counts(llama_dir):
    from bench.e2e_workload import Vocabulary, Workload, parse_dist

    v = Vocabulary.from_model(llama_dir)
    wl = Workload(3, parse_dist("uniform:10-40"), parse_dist("fixed:8"), parse_dist("fixed:300"),
                  parse_dist("fixed:2"), 0.5, v)
    reqs = [wl.request(i) for i in range(20)]
    assert {r.cls for r in reqs} == {"short", "long"}
    for r in reqs:
        assert v.count(r.prompt) == r.prompt_tokens
    # deterministic by (seed, index); distinct prompts (no shared prefix blocks)
    wl2 = Workload(3, wl.prompt_len, wl.output_len, wl.long_prompt_len, wl.long_output_len, 0.5, v)
    assert [wl2.request(i).prompt for i in range(20)] == [r.prompt for r in reqs]
    assert len({r.prompt.split()[:8].__str__() for r in reqs}) == 20


def test_linfit_and_tables_and_plots(tmp_path):
    from bench.e2e_plots import write_plots
    from bench.e2e_report import format_tables, kv_summary, linfit, ratios, summarize

    f = linfit([128, 512, 2048], [0.010, 0.040, 0.160])
    assert abs(f["slope"] * 1e6 - 78.125) < 1e-6 and f["r2"] > 0.999

    def recs(scale):
        out = []
        for i in range(10):
            cls = "long" if i % 4 == 0 else "short"
            out.append({"index": i, "cls": cls, "prompt_tokens": 1000 if cls == "long" else 50, "max_tokens": 8,
                        "error": None, "ttft_s": scale * (0.1 if cls == "long" else 0.02), "e2e_s": scale * 0.2,
                        "itl_s": [scale * 0.01] * 7, "output_tokens": 8, "tpot_s": scale * 0.01, "text": "x",
                        "kv_bytes": 2e6 if scale > 1 else None, "kv_seconds": 1e-3 if scale > 1 else None})
        return out

    result = {"meta": {"title": "unit"}, "configs": {}}
    for name, scale in (("agg", 1.0), ("pd-stock", 1.5)):
        s = summarize(recs(scale), 2.0)
        c = {"status": "ok", "summary": s, "requests": recs(scale), "connector": "x"}
        if name != "agg":
            c["kv"] = kv_summary({"bytes": 2e7, "seconds": 0.01, "transfers": 10},
                                 {"decode_leg_disagg": {"sum": 0.5, "count": 10}}, 10)
            assert abs(c["kv"]["decode_leg_not_transfer_s"] - 0.049) < 1e-9
        result["configs"][name] = c
    result["configs"]["pd-stock"]["ratios"] = {"vs_agg": ratios(result["configs"]["pd-stock"]["summary"],
                                                                result["configs"]["agg"]["summary"])}
    assert abs(result["configs"]["pd-stock"]["ratios"]["vs_agg"]["ttft_s.p50"] - 1.5) < 1e-9
    result["configs"]["pd-ours"] = {"status": "unavailable", "reason": "EngineError: boom"}
    text = format_tables(result)
    assert "pd-ours: UNAVAILABLE - EngineError: boom" in text and "Ratio to agg" in text
    files = write_plots(result, str(tmp_path))
    assert len(files) == 3 and all(Path(p).stat().st_size > 1000 for p in files)


# ------------------------------------------------------------------ real run
def _ours_importable() -> bool:
    return importlib.util.find_spec("transfer.connector") is not None


@pytest.mark.engines
def test_short_real_run_json_complete_and_greedy_outputs_match(llama_dir, tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("openai")
    configs = ["agg", "agg-sc", "pd-stock"] + (["pd-ours", "pd-ours-ft"] if _ours_importable() else [])
    out = tmp_path / "e2e.json"
    r = e2e("--model", llama_dir, "--configs", ",".join(configs), "--num-requests", "4", "--concurrency", "2",
            "--prompt-len", "fixed:24", "--output-len", "fixed:6", "--long-prompt-len", "fixed:384",
            "--long-output-len", "fixed:2", "--long-fraction", "0.5", "--warmup", "1", "--seed", "5",
            "--sweep-tokens", "64,512", "--sweep-n", "1", "--log-dir", str(tmp_path / "logs"),
            "--json", str(out), "--plot", str(tmp_path / "plots"), "--no-progress", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "Latency (ms" in r.stdout and "Ratio to agg" in r.stdout and "Where TTFT goes" in r.stdout
    res = json.loads(out.read_text())
    assert res["meta"]["partial"] is False
    assert set(res["configs"]) == set(configs)
    assert res["meta"]["machine"]["cpus"] >= 1 and res["workload"]["num_requests"] == 4
    ok = {n: c for n, c in res["configs"].items() if c["status"] == "ok"}
    assert {"agg", "agg-sc", "pd-stock"} <= set(ok), {n: c.get("reason") for n, c in res["configs"].items()}
    # the sweep's TTFT against both aggregated baselines, and the load's ratios to agg-sc
    assert "TTFT/agg " in r.stdout and "TTFT/agg-sc" in r.stdout and "Ratio to agg-sc" in r.stdout
    assert ok["agg-sc"]["summary"]["paths"] == {"local": 4}, ok["agg-sc"]["summary"]["paths"]
    assert "warnings" not in ok["agg-sc"], ok["agg-sc"]["warnings"]
    assert ok["agg-sc"]["ratios"]["vs_agg"]["ttft_s.p50"] > 0 and ok["agg-sc"]["ratios"]["vs_agg_sc"] is None
    if "pd-ours" not in ok:  # reported, with a reason, and the rest still ran
        assert res["configs"]["pd-ours"]["reason"]
    if "pd-ours-ft" in ok:  # every first token from the prefill leg; pd-ours: none
        assert ok["pd-ours-ft"]["breakdown_mean"]["sc_first_token"] == 1.0, ok["pd-ours-ft"]["breakdown_mean"]
        assert ok["pd-ours-ft"]["label"].endswith("first token from the prefill leg, sidecars")
        if "pd-ours" in ok:
            assert ok["pd-ours"]["breakdown_mean"].get("sc_first_token", 0.0) == 0.0
    for name, c in ok.items():
        s = c["summary"]
        assert s["ok"] == s["requests"] == 4, c.get("warnings")
        for key in ("throughput_req_s", "throughput_out_tok_s", "wall_s"):
            assert s[key] > 0, (name, key)
        for d in ("ttft_s", "e2e_s", "tpot_s", "itl_s"):
            for q in ("p50", "p90", "p99", "mean"):
                assert s[d][q] > 0, (name, d, q)
        assert set(s["by_class"]) == {"short", "long"}
        for rec in c["requests"]:
            assert rec["ttft_s"] > 0 and rec["e2e_s"] >= rec["ttft_s"] and rec["output_tokens"] == rec["max_tokens"]
            assert rec["prompt_tokens_server"] == rec["prompt_tokens"]
        sw = c["sweep"]
        assert [p["tokens"] for p in sw["points"]] == [64, 512] and sw["fit_ttft"]["n"] == 2
        # where TTFT goes: every hop's metrics read around each sweep request
        need = {"d_ttft", "d_queue", "d_compute"} | ({"sc_prefill_leg", "sc_decode_leg", "p_e2e", "p_compute",
                                                     "pre_hops", "dec_hop", "rest"} if name.startswith("pd") else set())
        for p in sw["points"]:
            bm = p["breakdown_median"]
            assert need <= set(bm), (name, sorted(bm))
            assert 0 < bm["d_ttft"] <= p["ttft_s_median"] * 1.5, (name, bm)
        assert need - {"pre_hops", "dec_hop", "rest"} <= set(c["breakdown_mean"]), (name, c["breakdown_mean"])
        if name.startswith("pd"):
            assert s["paths"] == {"disagg": 4}
            k = c["kv"]
            for key in ("bytes_total", "seconds_total", "transfers", "bytes_per_request", "gbps",
                        "decode_leg_mean_s", "prefill_leg_mean_s"):
                assert k[key] > 0, (name, key)
            assert "decode_leg_not_transfer_s" in k
            assert c["ratios"]["vs_agg"]["ttft_s.p50"] > 0 and c["ratios"]["vs_agg_sc"]["ttft_s.p50"] > 0
            assert all(p["kv_bytes_median"] > 0 and p["kv_seconds_median"] > 0 for p in sw["points"])
            big, small = sw["points"][1]["kv_bytes_median"], sw["points"][0]["kv_bytes_median"]
            assert big > small  # KV grows with the prompt
            assert sw["fit_transfer"] is not None
    g = res["greedy_match"]
    assert g["reference"] == "agg" and g["compared"] >= 6 * (len(ok) - 1)
    assert g["matched"] == g["compared"], g["mismatches"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "cdf_ttft_itl.png", "transfer_gbps_vs_bytes.png", "ttft_vs_prompt.png"]


def test_report_from_saved_json(tmp_path):
    bad = e2e("--report", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and "cannot read report" in bad.stderr and "Traceback" not in bad.stderr
    rec = {"index": 0, "cls": "sweep", "prompt_tokens": 128, "sweep_tokens": 128, "max_tokens": 4, "error": None,
           "ttft_s": 0.02, "e2e_s": 0.05, "itl_s": [0.01] * 3, "output_tokens": 4, "tpot_s": 0.01, "text": "a",
           "kv_bytes": 1e6, "kv_seconds": 1e-4}
    rec2 = dict(rec, index=1, prompt_tokens=1024, sweep_tokens=1024, ttft_s=0.09, kv_bytes=8e6, kv_seconds=5e-4)
    res = {"meta": {"title": "t"}, "configs": {"pd-stock": {
        "status": "ok", "connector": "x", "requests": [dict(rec, cls="short")],
        "summary": __import__("bench.e2e_report", fromlist=["summarize"]).summarize([dict(rec, cls="short")], 1.0),
        "sweep": {"requests": [rec, rec2]}}}}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(res))
    r = e2e("--report", str(f))
    assert r.returncode == 0, r.stderr
    assert "Prompt-length sweep" in r.stdout and "pd-stock" in r.stdout
