"""Raw NIXL READs under different agent configurations (no engines, no connector).

Two processes on one host, each pinned to its own core (target: core 0, idle in a queue
read like an idle prefill engine; initiator: core 1), READ ``blocks`` x 128 KiB through
UCX (CMA), one transfer every 10 ms like engine steps apart. Per configuration: the
post's wall and CPU time and post -> done, medians and p90. The configurations:

* ``ours``: our agent (no UCX worker threads, progress thread polling every 0.1 ms,
  ``UCX_USE_MT_MUTEX=y``);
* ``stock``: vLLM's NixlConnector agent (``num_threads=4``, busy-polling progress thread);
* ``ours-t4`` / ``ours-spinlock``: ours with stock's worker threads / UCX's spinlock.

    python -m bench.agent_configs --configs ours,stock --blocks 4,32,64 --iters 40
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import numpy as np

BLOCK_BYTES = 128 * 1024
CONFIGS = {"ours": dict(threads=0, delay_us=100, mutex=True),
           "stock": dict(threads=4, delay_us=0, mutex=False),
           "ours-t4": dict(threads=4, delay_us=100, mutex=True),
           "ours-spinlock": dict(threads=0, delay_us=100, mutex=False)}


def _agent(name: str, cfg: dict):
    os.environ["UCX_USE_MT_MUTEX"] = "y" if cfg["mutex"] else "n"
    from transfer.nixl_agent import make_agent

    return make_agent(name, "auto", ["UCX"], num_threads=cfg["threads"],
                      progress_delay_us=cfg["delay_us"])[1]


def _pattern(nblocks: int) -> np.ndarray:
    """The target's bytes (the initiator checks what its READs brought against them)."""
    return np.random.default_rng(0).integers(0, 255, nblocks * BLOCK_BYTES * 2, dtype=np.uint8)


def _target(cfg: dict, nblocks: int, meta_q, stop_q) -> None:
    os.sched_setaffinity(0, {0})
    agent = _agent("target", cfg)
    buf = _pattern(nblocks)
    agent.register_memory(agent.get_reg_descs([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM"))
    meta_q.put((agent.get_agent_metadata(), buf.ctypes.data))
    stop_q.get()


def _initiator(cfg: dict, nblocks: int, iters: int, meta: bytes, addr: int, out_q) -> None:
    os.sched_setaffinity(0, {1})
    agent = _agent("initiator", cfg)
    buf = np.zeros(nblocks * BLOCK_BYTES * 2, dtype=np.uint8)
    agent.register_memory(agent.get_reg_descs([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM"))
    peer = agent.add_remote_agent(meta)
    step = BLOCK_BYTES * 2  # every other block: not one contiguous range
    local = agent.prep_xfer_dlist("", [(buf.ctypes.data + i * step, BLOCK_BYTES, 0)
                                       for i in range(nblocks)], "DRAM")
    remote = agent.prep_xfer_dlist(peer, [(addr + i * step, BLOCK_BYTES, 0)
                                          for i in range(nblocks)], "DRAM")
    idx = list(range(nblocks))
    rows = []
    for it in range(iters + 5):
        h = agent.make_prepped_xfer("READ", local, idx, remote, idx)
        t0, c0 = time.perf_counter(), time.thread_time()
        state = agent.transfer(h)
        t1, c1 = time.perf_counter(), time.thread_time()
        deadline = t1 + 10
        while state != "DONE":
            state = agent.check_xfer_state(h)
            if state == "ERR" or time.perf_counter() > deadline:
                raise SystemExit(f"READ failed or hung ({state})")
        t2 = time.perf_counter()
        agent.release_xfer_handle(h)
        if it >= 5:  # warm-up
            rows.append(((t1 - t0) * 1e3, (c1 - c0) * 1e3, (t2 - t0) * 1e3))
        time.sleep(0.01)
    want = _pattern(nblocks).reshape(nblocks, 2, BLOCK_BYTES)[:, 0]
    if not np.array_equal(buf.reshape(nblocks, 2, BLOCK_BYTES)[:, 0], want):
        raise SystemExit("the READs did not bring the target's bytes")
    out_q.put(rows)


def run_case(name: str, nblocks: int, iters: int) -> dict:
    """One configuration at one size: medians (ms) and post -> done p90."""
    cfg = CONFIGS[name]
    ctx = mp.get_context("spawn")
    meta_q, stop_q, out_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    target = ctx.Process(target=_target, args=(cfg, nblocks, meta_q, stop_q), daemon=True)
    target.start()
    try:
        meta, addr = meta_q.get(timeout=60)
        init = ctx.Process(target=_initiator, args=(cfg, nblocks, iters, meta, addr, out_q),
                           daemon=True)
        init.start()
        rows = np.array(out_q.get(timeout=60 + iters))
        init.join(30)
    finally:
        stop_q.put(1)
        target.join(30)
    med = np.median(rows, axis=0)
    return {"config": name, "blocks": nblocks, "bytes": nblocks * BLOCK_BYTES, "n": len(rows),
            "post_ms": float(med[0]), "post_cpu_ms": float(med[1]), "done_ms": float(med[2]),
            "done_p90_ms": float(np.percentile(rows[:, 2], 90))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agent_configs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="ours,stock", help=f"comma list of {','.join(CONFIGS)}")
    p.add_argument("--blocks", default="4,32,64", help="128 KiB blocks per READ (list)")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2, help="repeat the whole grid (order effects)")
    a = p.parse_args(argv)
    names = a.configs.split(",")
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        p.error(f"unknown configuration(s) {bad}; known: {', '.join(CONFIGS)}")
    if len(os.sched_getaffinity(0)) < 2:
        p.error("needs two cores (target and initiator each pinned to one)")
    print("round config         blocks  post ms  post CPU ms  post->done ms  p90 ms")
    for rnd in range(a.rounds):
        for nblocks in (int(x) for x in a.blocks.split(",")):
            for name in names:
                r = run_case(name, nblocks, a.iters)
                print(f"{rnd:5d} {name:14s} {nblocks:6d} {r['post_ms']:8.3f} {r['post_cpu_ms']:12.3f}"
                      f" {r['done_ms']:14.3f} {r['done_p90_ms']:7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
