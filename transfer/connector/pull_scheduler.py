"""Scheduler half, pull mode.

Prefill side: ``request_finished`` keeps a finished ``do_remote_decode`` request's
blocks under a lease (``kv_lease_s``) and returns NixlConnector-compatible params;
the worker frees them when the decode side's READ-completion notification arrives,
a ``release:`` notification comes in, or the lease expires.

Decode side: a ``do_remote_prefill`` request asks for ``prompt - local hit`` tokens
asynchronously; ``update_state_after_alloc`` validates the params and plans which
local blocks receive which remote blocks (only the blocks past the local prefix
hit). Invalid params become a failed load, so vLLM's ``kv_load_failure_policy``
decides (recompute or error), never a crash.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import FailureReason, ParamsError
from .base_scheduler import FINISHED_OK, BaseScheduler
from .metadata import (PD_PROTOCOL_VERSION, RecvJob, now_wall, parse_remote_params,
                       plan_block_read)

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.pdsidecar.connector")


class PullScheduler(BaseScheduler):
    """Pull mode: the decode engine READs the prefill engine's leased blocks."""

    def _release_remote(self, src_host: str, src_port: int, remote_req_id: str,
                        remote_engine_id: str = "") -> None:
        """Best effort: tell a prefill engine to free blocks (else its lease frees them)."""
        self.notifier.release(src_host, src_port, remote_engine_id, remote_req_id)

    # ------------------------------------------------------------ decode side
    def _pull_matched_tokens(self, request: "Request", num_computed_tokens: int
                             ) -> tuple[int, bool]:
        count = request.num_prompt_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def _pull_after_alloc(self, request: "Request", params: dict, blocks: Any,
                          num_external_tokens: int) -> None:
        rid = request.request_id
        try:
            src = parse_remote_params(params, allowed_hosts=self.cfg.allowed_remote_hosts,
                                      guard_s=self.cfg.lease_guard_s)
        except ParamsError as e:
            self._reject_load(request, blocks, num_external_tokens, None, e.reason, str(e))
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
            self._reject_load(request, blocks, num_external_tokens, src, e.reason, str(e))
            self._release_remote(src.host, src.port, src.request_id, src.engine_id)
            log.warning("PdConnector: request %s: %s", rid, e)
            return
        self._recv[rid] = RecvJob(rid, src, lids, rids, t_alloc=time.monotonic())
        self._recv_blocks[rid] = len(lids)
        self._gauges_dirty = True

    def _pull_aborted_before_load(self, params: dict) -> dict[str, Any]:
        """A decode request finished (aborted) before it was scheduled: free the prefill
        blocks now instead of waiting for the lease."""
        params["do_remote_prefill"] = False
        try:
            src = parse_remote_params(params)
            self._release_remote(src.host, src.port, src.request_id, src.engine_id)
        except ParamsError:
            pass
        return {"pd_transfer": {"error": FailureReason.ABORTED},
                "pd_protocol_version": PD_PROTOCOL_VERSION}

    def _decode_finished(self, rid: str) -> dict[str, Any] | None:
        """Decode side (or a plain request): what the transfer cost, if there was one."""
        res = self._results.pop(rid, None)
        self._recv_blocks.pop(rid, None)
        if res is None:
            return None
        return {"pd_transfer": res, "pd_protocol_version": PD_PROTOCOL_VERSION}

    # ------------------------------------------------------------ prefill side
    def _prefill_finished(self, request: "Request", block_ids: list[int]
                          ) -> tuple[bool, dict[str, Any] | None]:
        """Lease the prompt blocks of a finished prefill; the params to read them."""
        rid = request.request_id
        status = getattr(request.status, "name", str(request.status))
        if status not in FINISHED_OK or not block_ids:
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
            "pd_kv_lease_s": self.cfg.kv_lease_s,  # the sidecar forgets pending KV after it
        }
