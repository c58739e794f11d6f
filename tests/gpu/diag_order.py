"""GPU diagnostic (not a test): does an IPC WRITE posted right after work queued on the
caller's stream carry the bytes that work wrote? Prints one line per variant.

    python3 tests/gpu/diag_order.py
"""

from __future__ import annotations

import numpy as np
import torch

from transfer.ipc import IpcTransferEngine
from transfer.peerproc import CacheConfig, PeerProcess, make_cache

L, NB, BL = 4, 128, 64 * 1024


def remote(peer, ids):
    return np.frombuffer(peer.call("blocks", list(ids)), dtype=np.uint8).reshape(L, len(ids), BL)


def run(peer, name, *, triton: bool, warm: bool, rounds: int, sleep: int, on_default: bool,
        torch_wait: bool = False, base: int = 0) -> None:
    buf, caches = make_cache(CacheConfig(L, NB, BL, mem="VRAM", seed=12))
    eng = IpcTransferEngine(name, use_triton=triton)
    eng.register_kv_caches(caches)
    eng.add_peer(peer.info)
    if torch_wait:
        eng._driver = False  # use torch's Stream.wait_stream instead of our event wait
    if warm:  # build the plan (and compile) before the timed section
        h = eng.write_blocks(peer.name, [7], [base + 120])
        while not eng.poll(h):
            pass
        torch.cuda.synchronize()
    compute = torch.cuda.current_stream() if on_default else torch.cuda.Stream()
    with torch.cuda.stream(compute):
        for rnd in range(rounds):
            buf[:, 7].fill_(0x11)
            torch.cuda._sleep(sleep)
            buf[:, 7].fill_(0x60 + rnd)
            h = eng.write_blocks(peer.name, [7], [base + 90 + rnd])
    while not eng.poll(h):
        pass
    torch.cuda.synchronize()
    res = []
    for rnd in range(rounds):
        got = remote(peer, [base + 90 + rnd])
        vals = np.unique(got)
        res.append(f"r{rnd}:{'ok' if (got == 0x60 + rnd).all() else 'BAD ' + str([hex(v) for v in vals[:4]])}")
    print(f"{name:28s} triton={triton!s:5} warm={warm!s:5} default_stream={on_default!s:5} "
          f"torch_wait={torch_wait!s:5} rounds={rounds} sleep={sleep:.0e}: {' '.join(res)}",
          flush=True)
    eng.close()


def main() -> None:
    peer = PeerProcess("ipc", "diag-target", CacheConfig(L, NB, BL, mem="VRAM", seed=5))
    try:
        for i, kw in enumerate([
            dict(triton=True, warm=False, rounds=3, sleep=200_000_000, on_default=False),
            dict(triton=True, warm=True, rounds=3, sleep=200_000_000, on_default=False),
            dict(triton=True, warm=True, rounds=1, sleep=200_000_000, on_default=False),
            dict(triton=True, warm=False, rounds=1, sleep=200_000_000, on_default=False),
            dict(triton=True, warm=True, rounds=3, sleep=200_000_000, on_default=True),
            dict(triton=True, warm=True, rounds=3, sleep=200_000_000, on_default=False,
                 torch_wait=True),
            dict(triton=False, warm=True, rounds=3, sleep=200_000_000, on_default=False),
            dict(triton=False, warm=False, rounds=3, sleep=200_000_000, on_default=False),
        ]):
            try:
                run(peer, f"diag-{i}", base=(i % 2) * 4, **kw)
            except Exception as e:  # keep going: one line per variant
                print(f"diag-{i} {kw}: {type(e).__name__}: {e}", flush=True)
    finally:
        peer.close()


if __name__ == "__main__":
    main()
