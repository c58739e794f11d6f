"""Benchmark: what the PdConnector worker's hooks cost one engine step, no engines.

Two worker halves over real NIXL agents in one process (prefill and decode, TP 1, a
CPU-layout cache like the tiny Llama's: 2 layers, 4 KV heads of 64, fp16, 16-token
blocks); the decode half finds the prefill half through a real control server
(``transfer.control.ControlServer``), as in serving, on an untimed first load; only
the workers' public hooks are called. Per step the decode worker runs what vLLM calls
around a forward: ``start_load_kv`` + ``wait_for_save`` + ``get_transfer_results``.
Timed per call:

- idle: no transfer anywhere;
- post: the step that posts one request's READ (``--blocks`` blocks) and, if it
  completed inside the post, reports it;
- in flight: steps while a READ is outstanding (``--tcp``: UCX over TCP, where a
  READ outlives its post; over CMA/shared memory it never does).

    python -m bench.steps_worker --blocks 8 128 --spin-us 0 3000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make(engine_id: str, spin_us: float, seed: int, nb: int) -> tuple[Any, dict[str, Any]]:
    """A worker half with its registered cache (keep the cache for the worker's lifetime)."""
    import torch
    from transfer.connector.config import PdConfig
    from transfer.connector.worker import PdConnectorWorker
    compat = {"model": "Bench", "dtype": "float16", "block_size": 16, "num_kv_heads": 4,
              "head_size": 64, "is_mla": False, "kv_layout": "HND"}
    cfg = PdConfig.from_extra({"protocol": "rdma", "spin_wait_us": spin_us}, env={})
    w = PdConnectorWorker(cfg, engine_id=engine_id, tp_rank=0, tp_size=1, compat=compat)
    g = torch.Generator().manual_seed(seed)
    caches = {f"model.layers.{i}.attn": torch.randn(nb, 4, 16, 128, generator=g).half()
              for i in range(2)}
    w.register_kv_caches(caches)
    return w, caches  # registered memory must outlive the engine


def step(w, meta, done: set[str] | None = None) -> float:
    """One engine step's connector hooks; µs. Adds the loads reported done (or failed) to `done`."""
    t0 = time.perf_counter()
    w.start_load_kv(meta)
    w.end_step(meta)
    _, recving, failed = w.get_transfer_results(set())
    us = (time.perf_counter() - t0) * 1e6
    if done is not None:
        done |= recving | failed
    return us


def load_meta(rid: str, ids: list[int], port: int, blocks: int):
    """Step metadata of one request that loads `ids` of the prefill worker into `ids`."""
    from transfer.connector.metadata import PdConnectorMetadata, RecvJob, RemoteSource
    src = RemoteSource(engine_id="P", request_id=rid, host="127.0.0.1", port=port,
                       block_ids=tuple(ids), num_tokens=16 * blocks, tp_size=1,
                       dp_rank=0, lease_s=60.0, block_size=16)
    return PdConnectorMetadata(recv={rid: RecvJob(rid, src, ids, ids)})


def until_reported(w, rid: str, done: set[str], timeout_s: float = 30.0) -> list[float]:
    """Steps (µs each) until `rid` is reported; the load must end within `timeout_s`."""
    steps: list[float] = []
    deadline = time.monotonic() + timeout_s
    while rid not in done:
        if time.monotonic() > deadline:
            raise RuntimeError(f"load {rid} not reported within {timeout_s} s")
        steps.append(step(w, None, done))
    return steps


def run(blocks: int, spin_us: float, n: int) -> dict:
    from transfer.control import ControlServer
    nb = max(256, 2 * blocks + 2)
    (p, p_cache), (d, d_cache) = make("P", 0, 1, nb), make("D", spin_us, 2, nb)
    # the prefill engine's control plane, as in vLLM; it grants every read: (leases are
    # not what this measures)
    server = ControlServer("127.0.0.1:0", on_notify=lambda sender, receiver, message: None)
    try:
        server.add_rank(p.desc)
        port = server.start()
        # untimed: the decode worker's first load handshakes with the prefill (as in serving)
        done: set[str] = set()
        step(d, load_meta("warm", list(range(blocks)), port, blocks), done)
        until_reported(d, "warm", done)
        d.take_worker_meta()
        idle = [step(d, None) for _ in range(n)]
        post, flight, steps_to_done = [], [], []
        for i in range(n):
            ids = list(range((i % 2) * blocks, (i % 2) * blocks + blocks))
            post.append(step(d, load_meta(f"d{i}", ids, port, blocks), done))
            k = until_reported(d, f"d{i}", done)
            flight += k
            steps_to_done.append(len(k))
            d.take_worker_meta()
            p.get_transfer_results(set())
        us = lambda xs: {"p50_us": statistics.median(xs), "max_us": max(xs), "n": len(xs)} \
            if xs else None  # noqa: E731
        return {"blocks": blocks, "spin_wait_us": spin_us, "tcp": os.environ.get("UCX_TLS"),
                "idle_step": us(idle), "posting_step": us(post), "in_flight_step": us(flight),
                "extra_steps_until_reported_p50": statistics.median(steps_to_done)}
    finally:
        server.stop()
        p.shutdown()
        d.shutdown()
        del p_cache, d_cache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 128])
    ap.add_argument("--spin-us", type=float, nargs="+", default=[0.0, 3000.0])
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--tcp", action="store_true", help="UCX over TCP (READs outlive the post)")
    a = ap.parse_args(argv)
    if a.tcp:
        os.environ["UCX_TLS"] = "tcp,self"
    out = [run(b, s, a.n) for b in a.blocks for s in a.spin_us]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
