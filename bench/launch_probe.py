"""Benchmark (GPU): does our transfer engine slow a launch-bound forward pass?

An eager-mode decode step on a small model is bound by kernel launches (the host
queues ~1000 small kernels, the GPU idles between them). Anything that contends
with the launching thread (a progress thread in the CUDA driver, the GIL, another
process on the GPU) shows up directly in the step time. This times a synthetic step
(``--layers`` x ``--ops`` small bf16 kernels, one sync per step) under:

1. ``baseline``         nothing else
2. ``engine``           + our routing engine (NIXL UCX agent + CUDA IPC) with a
                        registered CUDA "KV cache", its progress thread at the default delay
3. ``engine_busy_poll`` the same with the progress thread's delay 0 (NIXL's own default)
4. ``control_server`` our gRPC control server (idle) in this process, no engine
5. ``neighbour``        no engine here; another process holds GPU memory and an engine
                        (an idle engine of the other role on the same GPU)
6. ``neighbour_steps``  the neighbour runs empty steps every 1 ms (vLLM's loop while a
                        finished request's blocks wait for their reader)

    PYTHONPATH=/tmp/site:$PWD python3 -m bench.launch_probe --json out.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.output import emit  # noqa: E402


def kv_caches(layers: int, blocks: int) -> dict[str, Any]:
    """A FLASH_ATTN-shaped cache per layer: [2, blocks, 16 tokens, 8 heads, 128] bf16."""
    import torch
    return {f"model.layers.{i}.self_attn.attn": torch.zeros(2, blocks, 16, 8, 128, dtype=torch.bfloat16,
                                                             device="cuda") for i in range(layers)}


def make_engine(layers: int, blocks: int, delay_us: int | None) -> tuple[Any, dict]:
    from transfer.select import create_engine
    caches = kv_caches(layers, blocks)
    eng = create_engine("auto", device="cuda", progress_delay_us=delay_us)
    eng.register_kv_caches(caches)
    return eng, caches


def step_times(layers: int, ops: int, steps: int) -> list[float]:
    """Milliseconds per synthetic step (queue layers*ops small kernels, then sync)."""
    import torch
    x = torch.randn(8, 1024, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(1024, 1024, dtype=torch.bfloat16, device="cuda") * 0.01
    out = []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        y = x
        for _ in range(layers):
            for k in range(ops):
                y = y @ w if k % 3 == 0 else (y * 0.5 + 0.1 if k % 3 == 1 else torch.tanh(y))
        torch.cuda.synchronize()
        if i >= 5:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def neighbour(ready: Any, stop: Any, layers: int, blocks: int, empty_steps: bool) -> None:
    """Another process on the GPU: an engine with registered memory, idle or stepping."""
    eng, _ = make_engine(layers, blocks, None)
    ready.set()
    while not stop.is_set():
        if empty_steps:
            eng.get_new_notifs()
            time.sleep(0.001)
        else:
            stop.wait(0.5)
    eng.close()


def summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"p50_ms": statistics.median(s), "p90_ms": s[int(0.9 * (len(s) - 1))], "n": len(s)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ops", type=int, default=30, help="kernels per layer")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=512, help="cache blocks per layer (1 MiB each over 8 heads)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "layers": a.layers, "ops": a.ops}

    def measure(name: str) -> None:
        res[name] = summary(step_times(a.layers, a.ops, a.steps))
        print(f"{name:18s} p50 {res[name]['p50_ms']:7.2f} ms  p90 {res[name]['p90_ms']:7.2f} ms", flush=True)

    measure("baseline")
    for name, delay in (("engine", None), ("engine_busy_poll", 0)):
        eng, caches = make_engine(a.layers, a.blocks, delay)
        measure(name)
        eng.close()
        del caches
        torch.cuda.empty_cache()
    from transfer.connector.control_client import configure_auth, start_control_server
    configure_auth(None)
    server = start_control_server("127.0.0.1", 0, on_notify=lambda *args: None)
    measure("control_server")  # the connector's gRPC server, idle, in this process
    server.stop()
    measure("baseline_2")
    ctx = mp.get_context("spawn")
    for name, busy in (("neighbour", False), ("neighbour_steps", True)):
        ready, stop = ctx.Event(), ctx.Event()
        p = ctx.Process(target=neighbour, args=(ready, stop, a.layers, a.blocks, busy), daemon=True)
        p.start()
        if not ready.wait(120):
            res[name] = {"error": "the neighbour process did not start"}
        else:
            measure(name)
        stop.set()
        p.join(30)
    return emit(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
