"""Push-mode write grants between real vLLM engines (issue 16).

One push pair whose connector wall clocks disagree by a minute
(``PDSIDECAR_TEST_CLOCK_OFFSET_S``: prefill +30 s, decode -30 s: with the old wall-clock
push deadline, set by the decode and judged by the prefill, every push was refused as
expired; the other sign let a prefill WRITE after the decode gave up). The decode waits
``push_wait_s`` = 10 s on its monotonic clock. Outputs are compared with aggregated
serving on the prefill engine (same weights).
"""

from __future__ import annotations

import urllib.request
import uuid

import pytest

from test_connector_engines import aggregated, failures, make_prompts, ours_config, post
from test_connector_push import control_addr, push_pair_request
from test_connector_lease_engines import skewed_pair_configs

pytestmark = pytest.mark.engines

PUSH_WAIT_S = 10.0


@pytest.fixture
def push_skew_pair(engine_pool, llama_dir):
    def configs():
        return skewed_pair_configs(llama_dir, ours_config(push_wait_s=PUSH_WAIT_S), engine_pool.log_dir,
                                   prefill_offset_s=30)
    return engine_pool.get("ours-llama-push-skew", configs)


def grants(engine, result: str) -> float:
    """``pd_connector_push_write_grants_total{result=...}`` of an engine."""
    text = urllib.request.urlopen(engine.url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pd_connector_push_write_grants_total{")
               and f'result="{result}"' in line)


def test_push_with_clocks_a_minute_apart_no_stale_no_false_expiry(push_skew_pair, llama_dir):
    """Every push is granted and lands (no `expired`/`timeout` recompute), and every
    answer equals aggregated serving."""
    pair = push_skew_pair
    d_addr = control_addr(pair[1])
    prompts = [make_prompts(llama_dir, seed=31)[i] for i in (1, 4, 8, 10, 11)]  # 17..1502
    granted0, refused0 = grants(pair[1], "granted"), grants(pair[1], "refused")
    false0 = failures(pair[1], "expired") + failures(pair[1], "timeout")
    for p in prompts:
        ref = aggregated(pair[0], p)
        (ds, d), (ps, pr) = push_pair_request(pair, p, d_addr)
        assert ds == 200 and ps == 200, (d, pr)
        assert pr["kv_transfer_params"]["pd_push"] == "sent", pr["kv_transfer_params"]
        t = d["kv_transfer_params"]["pd_transfer"]
        assert t["error"] == "" and t["mode"] == "push" and t["bytes"] > 0, t
        assert d["choices"][0]["text"] == ref, f"prompt of {len(p)} tokens differs"
    assert grants(pair[1], "granted") - granted0 >= len(prompts)
    assert grants(pair[1], "refused") == refused0
    assert failures(pair[1], "expired") + failures(pair[1], "timeout") == false0


def test_push_after_the_decode_gave_up_is_refused(push_skew_pair, llama_dir):
    """The decode leg alone: after push_wait_s it recomputes (correct output). The
    prefill leg that comes afterwards finds the registration but its write grant is
    refused: nothing is written, and the decode engine keeps answering correctly."""
    pair = push_skew_pair
    d_addr = control_addr(pair[1])
    prompt, other = make_prompts(llama_dir, seed=32)[8], make_prompts(llama_dir, seed=33)[9]
    ref, ref_other = aggregated(pair[0], prompt), aggregated(pair[0], other)
    refused0, timeouts0 = grants(pair[1], "refused"), failures(pair[1], "timeout")
    push_id = "push-" + uuid.uuid4().hex
    status, d = post(pair[1], {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                               "kv_transfer_params": {"do_remote_prefill": True,
                                                      "transfer_mode": "push",
                                                      "remote_request_id": push_id}})
    assert status == 200, d
    assert d["kv_transfer_params"]["pd_transfer"]["error"] == "timeout"
    assert d["choices"][0]["text"] == ref
    assert failures(pair[1], "timeout") == timeouts0 + 1
    # the late prefill leg (the decode keeps the finished registration for push_wait_s)
    status, pr = post(pair[0], {"prompt": prompt, "max_tokens": 1,
                                "kv_transfer_params": {"do_remote_decode": True,
                                                       "transfer_mode": "push",
                                                       "remote_request_id": push_id,
                                                       "push_target": d_addr}})
    assert status == 200, pr
    assert pr["kv_transfer_params"]["pd_push"] == "expired", pr["kv_transfer_params"]
    # the decode engine is unharmed: a normal push and a plain request (its prefix cache
    # holds the recomputed prompt) are still right
    (ds, d2), (ps, pr2) = push_pair_request(pair, other, d_addr)
    assert ds == 200 and d2["choices"][0]["text"] == ref_other
    assert d2["kv_transfer_params"]["pd_transfer"]["error"] == ""
    assert aggregated(pair[1], prompt) == ref
    # counted by the decode scheduler, published with the steps that followed
    assert grants(pair[1], "refused") == refused0 + 1
