"""Scheduler half of the PdConnector (engine-core process).

Prefill side: ``request_finished`` keeps a finished ``do_remote_decode`` request's
blocks under a lease (``kv_lease_s``) and returns NixlConnector-compatible params;
the worker frees them when the decode side's READ-completion notification arrives,
a ``Release`` RPC comes in, or the lease expires.

Decode side: a ``do_remote_prefill`` request asks for ``prompt - local hit`` tokens
asynchronously; ``update_state_after_alloc`` validates the params and plans which
local blocks receive which remote blocks (only the blocks past the local prefix
hit). Invalid params become a failed load, so vLLM's ``kv_load_failure_policy``
decides (recompute or error), never a crash.

The gRPC control server (``control_port + data_parallel_rank``, or an ephemeral
port when 0) serves the workers' handshake metadata.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .connector_meta import (PD_PROTOCOL_VERSION, R_ABORTED, ParamsError, PdConfig,
                             PdConnectorMetadata, PdWorkerMeta, RecvJob, now_wall,
                             parse_remote_params, plan_block_read)
from .connector_control import send_release
from .connector_stats import PdConnectorStats


if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.pdsidecar.connector")  # vLLM's handlers and format

_FINISHED_OK = ("FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED")


class PdConnectorScheduler:
    def __init__(self, cfg: PdConfig, *, engine_id: str, block_size: int, tp_size: int,
                 dp_rank: int, start_server: bool = True) -> None:
        self.cfg = cfg
        self.engine_id = engine_id
        self.block_size = block_size
        self.tp_size = tp_size
        self.dp_rank = dp_rank
        self._lock = threading.Lock()
        self._recv: dict[str, RecvJob] = {}
        self._send: dict[str, tuple[float, int]] = {}
        self._release_in: set[str] = set()  # from Release RPCs
        self._pending: dict[str, tuple[float, int]] = {}  # prefill reqs held for pickup
        self._results: dict[str, dict[str, Any]] = {}  # decode: req -> pd_transfer
        self._recv_blocks: dict[str, int] = {}  # decode: req -> blocks inflight
        self._gauges_dirty = True
        self._server = None
        self._bg: ThreadPoolExecutor | None = None
        self.port = 0
        self.block_bytes = 0
        self.host = cfg.control_host
        if start_server:
            self._start_server()

    # ------------------------------------------------------------ control plane
    def _start_server(self) -> None:
        from .connector_control import start_control_server
        port = self.cfg.control_port + self.dp_rank if self.cfg.control_port else 0
        self._server = start_control_server(self.host, port, on_notify=self._on_notify)
        self.port = self._server.port
        log.info("PdConnector %s control plane on %s:%d", self.engine_id, self.host, self.port)

    def _on_notify(self, sender: str, receiver: str, message: bytes) -> None:
        """``Notify(receiver=<our engine id>, message=b"release:<request id>")``."""
        if receiver != self.engine_id:
            raise ValueError(f"notification for engine {receiver!r}, this is {self.engine_id!r}")
        msg = bytes(message).decode(errors="replace")
        if not msg.startswith("release:"):
            raise ValueError(f"unknown notification {msg[:40]!r}")
        rid = msg[len("release:"):]
        with self._lock:
            if rid in self._pending:
                self._release_in.add(rid)

    def set_workers_metadata(self, descs: dict[int, Any]) -> None:
        """Workers' ``transfer.control.RankDescriptor`` by TP rank, served by Handshake."""
        # bytes of one block over all layers and TP ranks (reported as pd_kv_bytes)
        self.block_bytes = sum(r.block_len for d in descs.values() for r in d.peer.regions)
        for d in descs.values():
            d.dp_rank = self.dp_rank
            if self._server is not None:
                self._server.add_rank(d)

    def _release_remote(self, src_host: str, src_port: int, remote_req_id: str,
                        remote_engine_id: str = "") -> None:
        """Best effort, off the engine thread: tell a prefill engine to free blocks."""
        if self._bg is None:
            self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pd-release")
        me = self.engine_id
        timeout = self.cfg.handshake_timeout_s

        def go() -> None:
            try:
                send_release(src_host, src_port, me, remote_engine_id, remote_req_id, timeout)
            except Exception as e:  # prefill gone: its lease frees the blocks
                log.info("PdConnector: release of %s at %s:%s failed: %s", remote_req_id,
                         src_host, src_port, e)
        self._bg.submit(go)

    # ------------------------------------------------------------ decode side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill"):
            count = request.num_prompt_tokens - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request: "Request", blocks: Any,
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # one transfer per request
        rid = request.request_id
        try:
            src = parse_remote_params(params, allowed_hosts=self.cfg.allowed_remote_hosts,
                                      guard_s=self.cfg.lease_guard_s)
        except ParamsError as e:
            if num_external_tokens > 0:
                self._recv[rid] = RecvJob(rid, None, [], [], e.reason, str(e))
            log.warning("PdConnector: request %s: invalid kv_transfer_params: %s", rid, e)
            return
        if num_external_tokens == 0:
            # full local prefix hit: nothing to read, free the prefill blocks now
            self._release_remote(src.host, src.port, src.request_id, src.engine_id)
            return
        group = blocks.blocks[0]
        local_ids = [b.block_id for b in group]
        hit = 0
        for b in group:
            if b.block_hash is None or getattr(b, "is_null", False):
                break
            hit += 1
        try:
            lids, rids = plan_block_read(src, request.num_prompt_tokens, self.block_size,
                                         local_ids, hit)
        except ParamsError as e:
            self._recv[rid] = RecvJob(rid, src, [], [], e.reason, str(e))
            self._release_remote(src.host, src.port, src.request_id, src.engine_id)
            log.warning("PdConnector: request %s: %s", rid, e)
            return
        self._recv[rid] = RecvJob(rid, src, lids, rids)
        self._recv_blocks[rid] = len(lids)
        self._gauges_dirty = True

    # ------------------------------------------------------------ both
    def build_connector_meta(self, scheduler_output: Any) -> PdConnectorMetadata:
        with self._lock:
            release, self._release_in = self._release_in, set()
        meta = PdConnectorMetadata(recv=self._recv, send=self._send, release=release)
        self._recv = {}
        self._send = {}
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        wm = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(wm, PdWorkerMeta):
            for rid, r in wm.results.items():
                self._results[rid] = r
            # results of requests aborted while their READ was in flight are never
            # popped by request_finished: keep the map bounded (oldest first)
            while len(self._results) > 4096:
                self._results.pop(next(iter(self._results)))
        for rid in connector_output.finished_recving or ():
            if self._recv_blocks.pop(rid, None) is not None:
                self._gauges_dirty = True
        for rid in connector_output.finished_sending or ():
            if self._pending.pop(rid, None) is not None:
                self._gauges_dirty = True

    def request_finished(self, request: "Request", block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if not params:
            return False, None
        rid = request.request_id
        if params.get("do_remote_prefill"):
            # decode request finished (aborted) before it was scheduled: free the
            # prefill blocks now instead of waiting for the lease
            params["do_remote_prefill"] = False
            try:
                src = parse_remote_params(params)
                self._release_remote(src.host, src.port, src.request_id, src.engine_id)
            except ParamsError:
                pass
            return False, {"pd_transfer": {"error": R_ABORTED}, "pd_protocol_version":
                           PD_PROTOCOL_VERSION}
        if not params.get("do_remote_decode"):
            # decode side (or plain request): report what the transfer cost
            res = self._results.pop(rid, None)
            self._recv_blocks.pop(rid, None)
            if res is None:
                return False, None
            return False, {"pd_transfer": res, "pd_protocol_version": PD_PROTOCOL_VERSION}
        # prefill side
        status = getattr(request.status, "name", str(request.status))
        if status not in _FINISHED_OK or not block_ids:
            return False, None
        ids = list(block_ids)
        n_tokens = request.num_computed_tokens
        need = -(-n_tokens // self.block_size)
        ids = ids[:need] if need else ids
        expiry = now_wall() + self.cfg.kv_lease_s
        self._send[rid] = (expiry, len(ids))
        self._pending[rid] = (expiry, len(ids))
        self._gauges_dirty = True
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [ids],
            "remote_engine_id": self.engine_id,
            "remote_request_id": rid,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": self.tp_size,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": n_tokens,
            "remote_blocks_expiry_time": expiry,
            "transfer_mode": "pull",
            "pd_protocol_version": PD_PROTOCOL_VERSION,
            "pd_control_addr": f"{self.host}:{self.port}",
            "remote_dp_rank": self.dp_rank,
            "remote_block_size": self.block_size,
            "pd_kv_bytes": len(ids) * self.block_bytes,
        }

    def note_expired_or_freed(self, rid: str) -> None:
        if self._pending.pop(rid, None) is not None:
            self._gauges_dirty = True

    def get_stats(self) -> PdConnectorStats | None:
        if not self._gauges_dirty:
            return None
        self._gauges_dirty = False
        s = PdConnectorStats()
        s.set_gauge("pending_blocks", sum(n for _, n in self._pending.values()))
        s.set_gauge("pending_reqs", len(self._pending))
        s.set_gauge("recv_inflight_blocks", sum(self._recv_blocks.values()))
        return s

    def has_pending(self) -> bool:
        return bool(self._pending)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._bg is not None:
            self._bg.shutdown(wait=False)
