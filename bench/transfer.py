"""``pdbench transfer``: KV block transfer sweep (our engines vs raw NIXL vs torch).

A target process (spawned) owns a paged cache ``[layers, pool_blocks, block_bytes]``;
this process is the initiator with a cache of the same shape. For every shape
(block bytes x blocks per request x layers), op (read/write) and backend it runs
``--iters`` transfers of random non-contiguous block ids and prints a nixlbench-like
table. Backends:

* ``nixl``      our NixlTransferEngine (prepped descriptor lists + index arrays)
* ``raw-nixl``  baseline: plain nixl_agent, one descriptor per block per layer built
                from tuples, ``initialize_xfer`` per transfer
* ``ipc``       our CUDA IPC engine, one Triton launch per layer group (VRAM)
* ``ipc-torch`` our CUDA IPC engine, torch index_select/index_copy_ per layer (VRAM)
* ``torch``     baseline: in-process torch copy of the same blocks (no peer)
* ``memcpy``    reference: one contiguous device-to-device ``copy_`` of the same
                byte count (the copy-bandwidth ceiling; VRAM only, no peer)

``ipc`` also records CUDA events around its work: ``dev us`` is that device time
(id upload + copy kernel), next to the host wall-clock latency.

``--prepare-only`` (nixl, raw-nixl) builds every transfer and releases it unposted:
nothing moves, so ``prep us`` is the CPU cost of preparing alone, without the cache
and scheduling after-effects of the previous transfer (latency columns are then
prepare + release, not transfers).

Run standalone: ``python -m bench.transfer --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MODELS = {
    # name: (layers, kv_heads, head_size, block_size, dtype, is_mla)
    "llama3-8b": (32, 8, 128, 16, "bfloat16", False),
    "llama3-70b": (80, 8, 128, 16, "bfloat16", False),
    "deepseek-v3": (61, 1, 576, 64, "bfloat16", True),
}
ALL_BACKENDS = ("nixl", "raw-nixl", "ipc", "ipc-torch", "torch", "memcpy")


class UsageError(Exception):
    """Bad command-line value: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- CLI
def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--mem", default="DRAM", help="DRAM or VRAM (default DRAM)")
    p.add_argument("--backends", default="",
                   help=f"comma list of {','.join(ALL_BACKENDS)} "
                        "(default: DRAM nixl,raw-nixl,torch; VRAM ipc,ipc-torch,nixl,raw-nixl,torch)")
    p.add_argument("--ops", default="read,write", help="comma list of read,write")
    p.add_argument("--block-bytes", default="65536", help="bytes per block per layer (list)")
    p.add_argument("--blocks", default="1,16,64,256", help="blocks per request (list)")
    p.add_argument("--layers", default="1,8", help="layers per request (list)")
    p.add_argument("--model", default="",
                   help=f"{'|'.join(MODELS)}|FILE.json: real shapes (with --tokens)")
    p.add_argument("--tokens", default="", help="tokens per request (list) with --model")
    p.add_argument("--iters", default="30", help="timed transfers per case")
    p.add_argument("--warmup", default="3", help="untimed transfers per case")
    p.add_argument("--max-seconds", default="3", help="stop a case after this long")
    p.add_argument("--protocol", default="rdma", help="NIXL protocol: rdma or tcp")
    p.add_argument("--timeout", default="30", help="seconds before a transfer counts as hung")
    p.add_argument("--seed", default="0")
    p.add_argument("--json", default="", help="write all results to this JSON file")
    p.add_argument("--plot", default="", help="write a GB/s plot (PNG, needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--prepare-only", action="store_true",
                   help="nixl, raw-nixl: build each transfer and release it unposted "
                        "(times prepare alone; nothing moves)")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``transfer`` on the ``pdbench`` sub-command parser."""
    p = subparsers.add_parser("transfer", help="KV block transfer benchmark",
                              description=__doc__.split("\n\n")[0])
    _configure(p)
    p.set_defaults(func=run)
    return p


def _ints(s: str, name: str, lo: int = 1) -> list[int]:
    try:
        vals = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name}: expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < lo for v in vals):
        raise UsageError(f"--{name}: values must be >= {lo}, got {s!r}")
    return vals


def _float(s: str, name: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise UsageError(f"--{name}: expected a number, got {s!r}") from None
    if v <= 0:
        raise UsageError(f"--{name}: must be > 0")
    return v


@dataclass
class Case:
    layers: int
    block_bytes: int
    blocks: int
    label: str = ""


@dataclass
class Plan:
    mem: str
    backends: list[str]
    ops: list[str]
    cases: list[Case]
    iters: int
    warmup: int
    max_seconds: float
    protocol: str
    timeout: float
    seed: int
    json: str = ""
    plot: str = ""
    progress: bool = True
    prepare_only: bool = False
    model: str = ""
    notes: list[str] = field(default_factory=list)


def _model_shape(model: str) -> tuple[str, Any]:
    from transfer.layout import KVCacheSpec
    if model in MODELS:
        l, h, d, bs, dt, mla = MODELS[model]
        return model, KVCacheSpec(l, h, d, bs, dt, mla)
    if model.endswith(".json"):
        try:
            with open(model) as f:
                d = json.load(f)
            return os.path.basename(model), KVCacheSpec(**d)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"--model {model}: cannot read a KVCacheSpec ({e})") from None
    raise UsageError(f"--model: unknown model {model!r} (known: {', '.join(MODELS)}, "
                     f"or a .json file)")


def make_plan(a: argparse.Namespace) -> Plan:
    mem = a.mem.upper()
    if mem not in ("DRAM", "VRAM"):
        raise UsageError(f"--mem: expected DRAM or VRAM, got {a.mem!r}")
    default = "ipc,ipc-torch,nixl,raw-nixl,torch" if mem == "VRAM" else "nixl,raw-nixl,torch"
    backends = [b.strip() for b in (a.backends or default).split(",") if b.strip()]
    bad = [b for b in backends if b not in ALL_BACKENDS]
    if bad:
        raise UsageError(f"--backends: unknown {bad} (choose from {', '.join(ALL_BACKENDS)})")
    if mem == "DRAM" and any(b.startswith("ipc") for b in backends):
        raise UsageError("--backends: ipc needs --mem VRAM")
    prepare_only = bool(getattr(a, "prepare_only", False))
    if prepare_only and any(b not in ("nixl", "raw-nixl") for b in backends):
        raise UsageError("--prepare-only: only the nixl and raw-nixl backends "
                         "(pass --backends nixl,raw-nixl)")
    ops = [o.strip().lower() for o in a.ops.split(",") if o.strip()]
    if not ops or any(o not in ("read", "write") for o in ops):
        raise UsageError(f"--ops: expected read and/or write, got {a.ops!r}")
    if a.protocol not in ("rdma", "tcp"):
        raise UsageError(f"--protocol: expected rdma or tcp, got {a.protocol!r}")
    cases: list[Case] = []
    if a.model:
        name, spec = _model_shape(a.model)
        if not a.tokens:
            raise UsageError("--model needs --tokens N[,N...]")
        bb = spec.bytes_per_block_per_layer()
        for t in _ints(a.tokens, "tokens"):
            cases.append(Case(spec.num_layers, bb, spec.num_blocks_for_tokens(t),
                              f"{name} {t} tok"))
    else:
        if a.tokens:
            raise UsageError("--tokens needs --model")
        for l in _ints(a.layers, "layers"):
            for bb in _ints(a.block_bytes, "block-bytes", 8):
                if bb % 8:
                    raise UsageError("--block-bytes: must be a multiple of 8")
                for n in _ints(a.blocks, "blocks"):
                    cases.append(Case(l, bb, n))
    return Plan(mem=mem, backends=backends, ops=ops, cases=cases,
                iters=_ints(a.iters, "iters")[0], warmup=_ints(a.warmup, "warmup", 0)[0],
                max_seconds=_float(a.max_seconds, "max-seconds"), protocol=a.protocol,
                timeout=_float(a.timeout, "timeout"), seed=_ints(a.seed, "seed", 0)[0],
                json=a.json, plot=a.plot, progress=not a.no_progress, model=a.model,
                prepare_only=prepare_only)


# ------------------------------------------------------------------------ backends
class _UnpostedAgent:
    """``--prepare-only``: the engine's NIXL agent, except that ``transfer`` posts
    nothing and reports DONE (the engine then releases the unposted handle)."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)

    def transfer(self, handle: Any, notif_msg: bytes = b"") -> str:
        return "DONE"


class _Runner:
    """One backend bound to the initiator's cache and the target peer."""

    def __init__(self, kind: str, plan: Plan, caches: dict, buf: Any, peer: Any) -> None:
        self.kind = kind
        self.buf = buf
        self.peer = peer
        self.plan = plan
        if kind == "nixl":
            from transfer.nixl_engine import NixlTransferEngine
            self.eng = NixlTransferEngine(f"bench-nixl-{os.getpid()}", protocol=plan.protocol)
            self.eng.register_kv_caches(caches)
            self.eng.add_peer(peer.info)
            if plan.prepare_only:
                self.eng.agent = _UnpostedAgent(self.eng.agent)
        elif kind in ("ipc", "ipc-torch"):
            from transfer.ipc import IpcTransferEngine
            self.eng = IpcTransferEngine(f"bench-{kind}-{os.getpid()}",
                                         use_triton=(kind == "ipc"),
                                         time_device=(kind == "ipc"))
            self.eng.register_kv_caches(caches)
            self.eng.add_peer(peer.info)
        elif kind == "raw-nixl":
            from nixl._api import nixl_agent, nixl_agent_config
            self.agent = nixl_agent(f"bench-raw-{os.getpid()}",
                                    nixl_agent_config(backends=["UCX"]))
            nb = buf.shape[1]
            self.reg = self.agent.register_memory(
                [(buf.data_ptr(), buf.numel(), buf.device.index or 0, "")], plan.mem)
            self.remote = self.agent.add_remote_agent(peer.info.agent_metadata)
            self.local_regions = [(buf[i].data_ptr(), buf.shape[2]) for i in range(buf.shape[0])]
            self.remote_regions = [(r.base_addr, r.block_stride) for r in peer.info.regions]
            self.dev = buf.device.index or 0
            self.rdev = peer.info.device_id
            del nb
        elif kind == "torch":
            import torch
            self.src = torch.empty_like(buf).copy_(buf)
        elif kind == "memcpy":
            import torch
            self.flat_src = buf.reshape(-1)
            self.flat_dst = torch.empty_like(self.flat_src)
        self.block_len = buf.shape[2]

    def submit(self, op: str, layers: int, lids: Any, rids: Any) -> tuple[Any, float, float, int]:
        """Start one transfer: (handle, prepare_us, post_us, descriptors)."""
        if self.kind in ("nixl", "ipc", "ipc-torch"):
            fn = self.eng.read_blocks if op == "read" else self.eng.write_blocks
            h = fn(self.peer.name, lids, rids, layers=range(layers))
            return h, h.stats.prepare_us, h.stats.post_us, h.stats.descriptors
        if self.kind == "raw-nixl":
            t0 = time.perf_counter_ns()
            bl = self.block_len
            local = [(base + int(b) * bl, bl, self.dev)
                     for base, _ in self.local_regions[:layers] for b in lids]
            remote = [(base + int(b) * stride, bl, self.rdev)
                      for base, stride in self.remote_regions[:layers] for b in rids]
            ld = self.agent.get_xfer_descs(local, self.plan.mem)
            rd = self.agent.get_xfer_descs(remote, self.plan.mem)
            h = self.agent.initialize_xfer(op.upper(), ld, rd, self.remote)
            t1 = time.perf_counter_ns()
            if self.plan.prepare_only:
                self.agent.release_xfer_handle(h)
                return None, (t1 - t0) / 1e3, 0.0, len(local)
            st = self.agent.transfer(h)
            t2 = time.perf_counter_ns()
            if st == "ERR":
                raise RuntimeError("raw NIXL post failed")
            return h, (t1 - t0) / 1e3, (t2 - t1) / 1e3, len(local)
        import torch
        if self.kind == "memcpy":
            t0 = time.perf_counter_ns()
            nb = layers * len(lids) * self.block_len
            self.flat_dst[:nb].copy_(self.flat_src[:nb])
            ev = torch.cuda.Event() if self.buf.device.type == "cuda" else None
            if ev is not None:
                ev.record()
            t1 = time.perf_counter_ns()
            return ev, 0.0, (t1 - t0) / 1e3, 1
        # torch: in-process copy, no peer
        t0 = time.perf_counter_ns()
        dev = self.buf.device
        li = torch.as_tensor(lids, device=dev)
        ri = torch.as_tensor(rids, device=dev)
        t1 = time.perf_counter_ns()
        for l in range(layers):
            self.buf[l].index_copy_(0, li, self.src[l].index_select(0, ri))
        if dev.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
        else:
            ev = None
        t2 = time.perf_counter_ns()
        return ev, (t1 - t0) / 1e3, (t2 - t1) / 1e3, layers * len(lids)

    def wait(self, h: Any, timeout: float) -> None:
        if self.kind in ("nixl", "ipc", "ipc-torch"):
            self.eng.wait(h, timeout)
            return
        deadline = time.perf_counter() + timeout
        if self.kind == "raw-nixl":
            if h is None:  # --prepare-only: released unposted
                return
            while True:
                st = self.agent.check_xfer_state(h)
                if st == "DONE":
                    break
                if st == "ERR" or time.perf_counter() > deadline:
                    raise RuntimeError(f"raw NIXL transfer {st}")
            self.agent.release_xfer_handle(h)
            return
        if h is not None:
            while not h.query():
                if time.perf_counter() > deadline:
                    raise RuntimeError("torch copy timed out")

    def close(self) -> None:
        if self.kind in ("nixl", "ipc", "ipc-torch"):
            self.eng.close()
        elif self.kind == "raw-nixl":
            try:
                self.agent.remove_remote_agent(self.remote)
                self.agent.deregister_memory(self.reg)
            except Exception:
                pass


# ---------------------------------------------------------------------------- run
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
                    runners[b] = _Runner(b, plan, caches, buf, peer)
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


def _measure(plan: Plan, r: _Runner, b: str, op: str, c: Case, ids: list) -> dict[str, Any]:
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
            extra = getattr(h, "extra", None)
            if isinstance(extra, dict) and "device_us" in extra:
                dev.append(extra["device_us"])
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


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def format_table(rows: list[dict[str, Any]]) -> str:
    hdr = (f"{'backend':<10}{'op':<6}{'mem':<5}{'layers':>6}{'block':>9}{'blocks':>7}"
           f"{'size':>10}{'descs':>7}{'GB/s':>9}{'avg us':>10}{'p50 us':>10}{'p99 us':>10}"
           f"{'prep us':>9}{'post us':>9}{'dev us':>9}{'dev GB/s':>9}")
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        if "gbps" not in r:
            out.append(f"{r['backend']:<10}{r['op']:<6}{r['mem']:<5}{r['layers']:>6}"
                       f"{_fmt_size(r['block_bytes']):>9}{r['blocks']:>7}  FAILED: {r['error']}")
            continue
        out.append(
            f"{r['backend']:<10}{r['op']:<6}{r['mem']:<5}{r['layers']:>6}"
            f"{_fmt_size(r['block_bytes']):>9}{r['blocks']:>7}{_fmt_size(r['bytes']):>10}"
            f"{r['descriptors']:>7}{r['gbps']:>9.2f}{r['avg_us']:>10.1f}{r['p50_us']:>10.1f}"
            f"{r['p99_us']:>10.1f}{r['prepare_us']:>9.1f}{r['post_us']:>9.1f}"
            + (f"{r['device_us']:>9.1f}{r['device_gbps']:>9.1f}" if "device_us" in r else ""))
    return "\n".join(out)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Same-run ratios: our backends against raw NIXL (and torch) on equal shapes."""
    by = {(r["op"], r["layers"], r["block_bytes"], r["blocks"], r["backend"]): r
          for r in rows if "gbps" in r}
    lines = []
    for (op, l, bb, n, b), r in sorted(by.items()):
        if b not in ("nixl", "ipc", "ipc-torch"):
            continue
        for base in ("raw-nixl", "nixl", "torch", "memcpy"):
            if base == b:
                continue
            o = by.get((op, l, bb, n, base))
            if o:
                lines.append(f"{b}/{base} {op} L{l} {n}x{_fmt_size(bb)}: "
                             f"{r['gbps'] / o['gbps']:.2f}x bandwidth, p50 "
                             f"{r['p50_us']:.1f} vs {o['p50_us']:.1f} us")
    return lines


def plot(rows: list[dict[str, Any]], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot: matplotlib is not installed (pip install matplotlib); {path} not written"
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[tuple, list] = {}
    for r in rows:
        if "gbps" in r:
            groups.setdefault((r["backend"], r["op"], r["layers"], r["block_bytes"]), []).append(r)
    for (b, op, l, bb), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 2**20 for r in rs], [r["gbps"] for r in rs], marker="o",
                label=f"{b} {op} L{l} {_fmt_size(bb)}")
    ax.set_xscale("log")
    ax.set_xlabel("request size (MiB)")
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=6)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def run(args: argparse.Namespace) -> int:
    """Entry point for ``pdbench transfer``; returns the exit status."""
    try:
        plan = make_plan(args)
    except UsageError as e:
        print(f"pdbench transfer: error: {e}", file=sys.stderr)
        return 2
    try:
        rows = run_plan(plan)
    except KeyboardInterrupt:
        print("pdbench transfer: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"pdbench transfer: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_table(rows))
    rl = ratios(rows)
    if rl:
        print("\nratios (same run):")
        print("\n".join("  " + x for x in rl))
    if plan.prepare_only:
        plan.notes.append("--prepare-only: transfers built and released unposted; nothing "
                          "moved (GB/s and latency columns are not transfers)")
    if plan.notes:
        print("\nnotes:")
        print("\n".join("  " + x for x in plan.notes))
    if plan.json:
        meta = _environment()
        with open(plan.json, "w") as f:
            json.dump({"env": meta, "results": rows, "ratios": rl, "notes": plan.notes},
                      f, indent=1)
    if plan.plot:
        print(plot(rows, plan.plot), file=sys.stderr)
    return 1 if any("gbps" not in r for r in rows) else 0


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        from importlib.metadata import version
        env["nixl"] = version("nixl")
    except Exception:
        pass
    return env


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = _configure(_OneLineParser(prog="pdbench transfer", description=__doc__.split("\n\n")[0]))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
