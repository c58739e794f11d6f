"""Device-side sweep of the IPC gather kernel (not a test; run on a GPU machine).

In-process, one GPU, Llama-3-8B-shaped paged caches ([32, pool, 64 KiB], pool = 2 x
blocks), random non-contiguous ids. For each (chunk words, warps) variant and size:
device time from CUDA events (median of ``--iters``), host launch cost of the cached
launcher, bit-exactness; plus a contiguous ``copy_`` of the same bytes (ceiling).

    python tests/gpu/ipc_sweep.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from transfer.ipc_kernels import GatherLauncher  # noqa: E402

L, BL = 32, 64 * 1024
W = BL // 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="8,32,64,128,512")
    ap.add_argument("--variants", default="1024x4,2048x4,2048x8,4096x8,8192x16,512x2")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    blocks = [int(x) for x in a.blocks.split(",")]
    variants = [tuple(int(y) for y in v.split("x")) for v in a.variants.split(",")]
    pool = 2 * max(blocks)
    src = torch.randint(0, 256, (L, pool, BL), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    st = torch.tensor([src[i].data_ptr() for i in range(L)], dtype=torch.int64, device="cuda")
    dt = torch.tensor([dst[i].data_ptr() for i in range(L)], dtype=torch.int64, device="cuda")
    ids_dev = torch.empty(2 * pool, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream()
    sh = int(stream.cuda_stream)
    rng = np.random.default_rng(0)
    rows = []
    flat_s, flat_d = src.reshape(-1), torch.empty(src.numel(), dtype=torch.uint8, device="cuda")
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def dev_time(fn, iters):
        ts = []
        for _ in range(3):
            fn()
        for _ in range(iters):
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) * 1e3)
        return statistics.median(ts)

    for n in blocks:
        nbytes = L * n * BL
        t = dev_time(lambda: flat_d[:nbytes].copy_(flat_s[:nbytes]), a.iters)
        rows.append({"variant": "memcpy", "blocks": n, "bytes": nbytes, "device_us": t,
                     "gbps": nbytes / (t * 1e3)})
    for ch, nw in variants:
        g = GatherLauncher(st, dt, W, W, 0, 0, W, True, ch, nw)
        g.compile(ids_dev)
        for n in blocks:
            s_ids = rng.choice(pool, n, replace=False)
            d_ids = rng.choice(pool, n, replace=False)
            ids_dev[: 2 * n].copy_(torch.from_numpy(
                np.stack([s_ids, d_ids], 1).reshape(-1).astype(np.int32)))
            dst.fill_(0x5A)
            g.launch(n, ids_dev.data_ptr(), ids_dev, sh)
            torch.cuda.synchronize()
            ok = bool(torch.equal(dst[:, d_ids], src[:, s_ids]))
            t = dev_time(lambda: g.launch(n, ids_dev.data_ptr(), ids_dev, sh), a.iters)
            torch.cuda.synchronize()
            h0 = time.perf_counter_ns()
            for _ in range(20):
                g.launch(n, ids_dev.data_ptr(), ids_dev, sh)
            h_us = (time.perf_counter_ns() - h0) / 20e3
            torch.cuda.synchronize()
            nbytes = L * n * BL
            rows.append({"variant": f"{ch}x{nw}", "blocks": n, "bytes": nbytes,
                         "device_us": t, "gbps": nbytes / (t * 1e3), "launch_us": h_us,
                         "exact": ok, "fast_launch": g._compiled is not None and g._fast,
                         "raw_launch": g._raw is not None})
    print(f"{'variant':<10}{'blocks':>7}{'MiB':>7}{'dev us':>9}{'GB/s':>8}{'launch us':>10}"
          f"{'exact':>7}")
    for r in rows:
        print(f"{r['variant']:<10}{r['blocks']:>7}{r['bytes'] / 2**20:>7.0f}"
              f"{r['device_us']:>9.1f}{r['gbps']:>8.0f}{r.get('launch_us', 0):>10.1f}"
              f"{str(r.get('exact', '')):>7}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
