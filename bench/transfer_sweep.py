"""``pdbench transfer``: run a :class:`~bench.transfer_plan.Plan` against a spawned target
peer and measure every (shape, op, backend) case."""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.transfer_backends import Runner
from bench.transfer_plan import Case, Plan


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class _Progress:
    def __init__(self, total: int, on: bool) -> None:
        self.total, self.n, self.on, self.t0 = total, 0, on and total > 0, time.monotonic()

    def step(self, label: str) -> None:
        self.n += 1
        if not self.on:
            return
        w = 30
        k = int(w * self.n / self.total)
        sys.stderr.write(f"\r[{'#' * k}{'.' * (w - k)}] {self.n}/{self.total} "
                         f"{time.monotonic() - self.t0:5.1f}s {label[:50]:<50}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.on:
            sys.stderr.write("\n")


def run_plan(plan: Plan) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    from transfer.peerproc import CacheConfig, PeerProcess, make_cache

    results: list[dict[str, Any]] = []
    shapes: dict[tuple[int, int], list[Case]] = {}
    for c in plan.cases:
        shapes.setdefault((c.layers, c.block_bytes), []).append(c)
    prog = _Progress(len(plan.cases) * len(plan.ops) * len(plan.backends), plan.progress)
    rng = np.random.default_rng(plan.seed)
    needs_nixl = any(b in ("nixl", "raw-nixl") for b in plan.backends)
    target_backend = "nixl" if plan.mem == "DRAM" else ("auto" if needs_nixl else "ipc")
    for (layers, bb), cases in shapes.items():
        pool = max(2 * max(c.blocks for c in cases), 16)
        cfg = CacheConfig(layers, pool, bb, mem=plan.mem, seed=plan.seed + 1)
        peer = PeerProcess(target_backend, f"bench-target-{layers}x{bb}", cfg,
                           protocol=plan.protocol)
        try:
            buf, caches = make_cache(CacheConfig(layers, pool, bb, mem=plan.mem,
                                                 seed=plan.seed + 2))
            runners = {}
            for b in plan.backends:
                try:
                    runners[b] = Runner(b, plan, caches, buf, peer)
                except Exception as e:
                    plan.notes.append(f"{b}: unavailable ({type(e).__name__}: {e})")
            # correctness spot check of every peer backend: 4 random blocks, all layers
            for b, r in runners.items():
                if b in ("torch", "memcpy") or plan.prepare_only:
                    continue
                lids, rids = rng.choice(pool, 4, replace=False), rng.choice(pool, 4, replace=False)
                h, *_ = r.submit("read", layers, lids, rids)
                r.wait(h, plan.timeout)
                if plan.mem == "VRAM":
                    torch.cuda.synchronize()
                remote = np.frombuffer(peer.call("blocks", list(rids)), dtype=np.uint8)
                ok = np.array_equal(buf[:, lids].cpu().numpy().ravel(), remote)
                plan.notes.append(f"{b} {layers}x{bb}B: read verified {'OK' if ok else 'MISMATCH'}")
            for c in cases:
                ids = [(rng.choice(pool, c.blocks, replace=False),
                        rng.choice(pool, c.blocks, replace=False))
                       for _ in range(plan.iters + plan.warmup)]
                for op in plan.ops:
                    for b in plan.backends:
                        prog.step(f"{b} {op} L{c.layers} {c.blocks}x{c.block_bytes}B")
                        r = runners.get(b)
                        if r is None:
                            continue
                        results.append(_measure(plan, r, b, op, c, ids))
            for r in runners.values():
                r.close()
        finally:
            peer.close()
    prog.done()
    return results


def _measure(plan: Plan, r: Runner, b: str, op: str, c: Case, ids: list) -> dict[str, Any]:
    lat, prep, post, dev, descs = [], [], [], [], 0
    t_case = time.monotonic()
    err = ""
    for i, (lids, rids) in enumerate(ids):
        try:
            t0 = time.perf_counter_ns()
            h, pr, po, descs = r.submit(op, c.layers, lids, rids)
            r.wait(h, plan.timeout)
            t1 = time.perf_counter_ns()
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
            break
        if i >= plan.warmup:
            lat.append((t1 - t0) / 1e3)
            prep.append(pr)
            post.append(po)
            stats = getattr(h, "stats", None)  # our engines' handles; baselines have none
            if stats is not None and stats.device_us > 0:
                dev.append(stats.device_us)
        if i >= plan.warmup + 2 and time.monotonic() - t_case > plan.max_seconds:
            break
    nbytes = c.layers * c.blocks * c.block_bytes
    row: dict[str, Any] = {
        "backend": b, "op": op, "mem": plan.mem, "layers": c.layers,
        "block_bytes": c.block_bytes, "blocks": c.blocks, "bytes": nbytes,
        "label": c.label, "descriptors": descs, "iters": len(lat), "error": err,
    }
    if lat:
        row.update({
            "gbps": nbytes * len(lat) / (sum(lat) * 1e3),
            "avg_us": sum(lat) / len(lat), "p50_us": _pct(lat, 0.5), "p99_us": _pct(lat, 0.99),
            "prepare_us": _pct(prep, 0.5), "post_us": _pct(post, 0.5),
        })
    if dev:
        row["device_us"] = _pct(dev, 0.5)
        row["device_gbps"] = nbytes / (row["device_us"] * 1e3)
    return row
