"""A transfer peer in a child process, driven over a ``multiprocessing`` pipe.

Used by the tests and by ``pdbench transfer``: :func:`start_peer` spawns a process
that allocates a paged cache ``[layers, num_blocks, block_len]`` (bytes, DRAM or
VRAM, filled from ``seed``), registers it with an engine and answers commands.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Any

from .engine import PeerInfo


@dataclass
class CacheConfig:
    layers: int
    num_blocks: int
    block_len: int
    mem: str = "DRAM"  # DRAM or VRAM
    seed: int = 0


def make_cache(cfg: CacheConfig) -> tuple[Any, dict[str, Any]]:
    """``(buffer, {layer_name: [num_blocks, block_len] view})`` filled from ``seed``."""
    import torch
    dev = "cuda" if cfg.mem == "VRAM" else "cpu"
    g = torch.Generator(device=dev).manual_seed(cfg.seed)
    buf = torch.randint(0, 256, (cfg.layers, cfg.num_blocks, cfg.block_len),
                        dtype=torch.uint8, device=dev, generator=g)
    return buf, {f"layer{i}": buf[i] for i in range(cfg.layers)}


def build_engine(backend: str, name: str, protocol: str = "rdma") -> Any:
    if backend == "nixl":
        from .nixl_engine import NixlTransferEngine
        return NixlTransferEngine(name, protocol=protocol)
    if backend == "ipc":
        from .ipc import IpcTransferEngine
        return IpcTransferEngine(name)
    if backend == "ipc-torch":
        from .ipc import IpcTransferEngine
        return IpcTransferEngine(name, use_triton=False)
    from .select import create_engine
    return create_engine(backend, name=name, device="cuda")


def _serve(conn: Any, backend: str, name: str, cfg: CacheConfig, protocol: str) -> None:
    buf, caches = make_cache(cfg)
    eng = build_engine(backend, name, protocol)
    eng.register_kv_caches(caches)
    conn.send(eng.local_info())
    notifs: dict[str, list[bytes]] = {}
    while True:
        try:
            cmd, *args = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "add_peer":
                conn.send(("ok", eng.add_peer(args[0])))
            elif cmd == "blocks":  # bytes of [layers, ids, block_len] for verification
                ids = list(args[0])
                conn.send(("ok", buf[:, ids].cpu().numpy().tobytes()))
            elif cmd == "notifs":  # wait up to args[1] s for args[0] messages in total
                want, timeout = args
                deadline = time.monotonic() + timeout
                while sum(map(len, notifs.values())) < want and time.monotonic() < deadline:
                    for k, v in eng.get_new_notifs().items():
                        notifs.setdefault(k, []).extend(v)
                    time.sleep(0.001)
                conn.send(("ok", notifs))
                notifs = {}
            elif cmd == "read":  # the peer reads from us: (peer, local, remote, kw)
                peer, lids, rids, kw = args
                st = eng.transfer("READ", peer, lids, rids, **kw)
                conn.send(("ok", st))
            elif cmd == "crash":
                os._exit(3)
            elif cmd == "exit":
                eng.close()
                conn.send(("ok", None))
                return
            else:
                conn.send(("err", f"unknown command {cmd!r}"))
        except Exception as e:  # report, keep serving
            conn.send(("err", f"{type(e).__name__}: {e}"))


class PeerProcess:
    """Handle on a spawned peer; ``info`` is its :class:`PeerInfo`."""

    def __init__(self, backend: str, name: str, cfg: CacheConfig, protocol: str = "rdma",
                 start_timeout_s: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, backend, name, cfg, protocol),
                                daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(start_timeout_s):
            self.kill()
            raise TimeoutError(f"peer {name!r} did not start in {start_timeout_s} s")
        self.info: PeerInfo = self.conn.recv()
        self.name = name

    def call(self, *cmd: Any, timeout_s: float = 30.0) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"peer {self.name!r}: no answer to {cmd[0]!r} in {timeout_s} s")
        status, val = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"peer {self.name!r}: {val}")
        return val

    def crash(self) -> None:
        self.conn.send(("crash",))
        self.proc.join(10)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)

    def close(self, timeout_s: float = 10.0) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout_s=timeout_s)
            except Exception:
                pass
            self.proc.join(timeout_s)
        self.kill()


def start_peer(backend: str, name: str, cfg: CacheConfig, protocol: str = "rdma") -> PeerProcess:
    return PeerProcess(backend, name, cfg, protocol)
