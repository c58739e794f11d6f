"""PdConnector push mode on real vLLM engines (tiny Llama, CPU).

Both legs run at once, linked by a push id: the decode engine registers its block
ids in its control plane; the prefill engine finds them and WRITEs each layer's
blocks from ``save_kv_layer``. Outputs must equal aggregated serving; failures
(no prefill leg, mismatched prompt) must end in a recompute, never a hang.
"""

from __future__ import annotations

import threading
import uuid

import pytest

from test_connector_engines import (aggregated, make_prompts, metric, ours_pair,  # noqa: F401
                                    post, wait_metric)

pytestmark = pytest.mark.engines


def control_addr(engine) -> str:
    """An engine's control-plane address, read off a 1-token prefill it serves."""
    status, r = post(engine, {"prompt": [11, 12, 13], "max_tokens": 1,
                              "kv_transfer_params": {"do_remote_decode": True}})
    assert status == 200, r
    params = r["kv_transfer_params"]
    from pdsidecar.dev.engines import harness_token
    from transfer.connector.control_client import configure_auth, send_release
    configure_auth(harness_token())  # the engines' control-plane token
    host, port = params["remote_host"], params["remote_port"]
    send_release(host, port, "test", params["remote_engine_id"], params["remote_request_id"], 5.0)
    return params["pd_control_addr"]


def push_pair_request(pair, prompt, d_addr, *, prefill_prompt=None, prefill=True,
                      max_tokens=8, extra: dict | None = None
                      ) -> tuple[tuple[int, dict], tuple[int, dict] | None]:
    """Decode leg and (optionally) prefill leg at once, linked by a fresh push id;
    ``extra``: more fields of the decode leg's body (e.g. ``logprobs``)."""
    push_id = "push-" + uuid.uuid4().hex
    out: dict = {}

    def decode_leg() -> None:
        out["d"] = post(pair[1], {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                  **(extra or {}),
                                  "kv_transfer_params": {"do_remote_prefill": True,
                                                         "transfer_mode": "push",
                                                         "remote_request_id": push_id}})

    def prefill_leg() -> None:
        out["p"] = post(pair[0], {"prompt": prefill_prompt or prompt, "max_tokens": 1,
                                  "kv_transfer_params": {"do_remote_decode": True,
                                                         "transfer_mode": "push",
                                                         "remote_request_id": push_id,
                                                         "push_target": d_addr}})

    threads = [threading.Thread(target=decode_leg)]
    if prefill:
        threads.append(threading.Thread(target=prefill_leg))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(not t.is_alive() for t in threads), "a leg hung"
    return out["d"], out.get("p")


def test_push_outputs_identical_and_kv_arrives(ours_pair, llama_dir):
    d_addr = control_addr(ours_pair[1])
    prompts = make_prompts(llama_dir, seed=7)[:12]  # 3 .. 1502 tokens
    before = metric(ours_pair[1], "pd_connector_bytes_transferred_total")
    pushed = 0
    for p in prompts:
        ref = aggregated(ours_pair[0], p)
        (ds, d), (ps, pr) = push_pair_request(ours_pair, p, d_addr)
        assert ds == 200 and ps == 200, (d, pr)
        assert d["choices"][0]["text"] == ref, f"prompt of {len(p)} tokens differs"
        assert pr["kv_transfer_params"]["pd_push"] == "sent"
        t = d["kv_transfer_params"]["pd_transfer"]
        assert t["error"] == "" and t["mode"] == "push", t
        pushed += t["bytes"]
    assert pushed > 0
    # the prefill side ends every push by itself: nothing held, nothing pending
    assert wait_metric(ours_pair[0], "pd_connector_blocks_pending_pickup", 0) == 0
    assert wait_metric(ours_pair[1], "pd_connector_recv_blocks_inflight", 0) == 0
    assert metric(ours_pair[1], "pd_connector_bytes_transferred_total") > before


def test_push_mismatch_and_missing_prefill_recompute(ours_pair, llama_dir):
    d_addr = control_addr(ours_pair[1])
    p = make_prompts(llama_dir, seed=8)[8]  # 515 tokens
    ref = aggregated(ours_pair[0], p)
    # the prefill leg computes another prompt: it must not push, the decode recomputes
    (ds, d), (ps, pr) = push_pair_request(ours_pair, p, d_addr, prefill_prompt=p[:-5])
    assert ds == 200 and ps == 200
    assert d["choices"][0]["text"] == ref
    assert d["kv_transfer_params"]["pd_transfer"]["error"] == "mismatch"
    assert pr["kv_transfer_params"]["pd_push"] == "mismatch"


def test_push_without_prefill_leg_times_out_and_recomputes(ours_pair, llama_dir):
    p = make_prompts(llama_dir, seed=9)[5]
    ref = aggregated(ours_pair[0], p)
    (ds, d), _ = push_pair_request(ours_pair, p, "unused:1", prefill=False)
    assert ds == 200 and d["choices"][0]["text"] == ref
    assert d["kv_transfer_params"]["pd_transfer"]["error"] == "timeout"
