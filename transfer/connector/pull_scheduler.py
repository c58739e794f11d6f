"""Scheduler half, pull mode.

Prefill side: ``request_finished`` keeps a finished ``do_remote_decode`` request's
blocks under a :class:`Lease` on this host's monotonic clock (``kv_lease_s``) and
returns NixlConnector-compatible params carrying the lease *duration*
(``pd_kv_lease_s``), never a wall-clock time. Over the control plane a decode engine
renews it while the request waits in its queue (``renew:``: deadline = now + 2/3
lease) and asks before it READs (``read:``: deadline = now + lease, refused once the
lease is over, so a decode never reads freed blocks). The worker frees the blocks
when the READ-completion notifications arrive, a ``release:`` comes in, or the lease
ends (decided here, each step).

Decode side: a ``do_remote_prefill`` request asks for ``prompt - local hit`` tokens
asynchronously; ``update_state_after_alloc`` validates the params and plans which
local blocks receive which remote blocks (only the blocks past the local prefix
hit). Invalid params become a failed load, so vLLM's ``kv_load_failure_policy``
decides (recompute or error), never a crash. From ``on_new_request`` until its blocks
are allocated, a request's prefill lease is renewed every lease/6 (batched per
prefill engine, on the notifier's threads: never inside a step).

The read grant is asked when the request arrives (``on_new_request``, on a pool
thread), not after its blocks are allocated: ``get_num_new_matched_tokens`` answers
``None`` (vLLM asks again next step) until the prefill has answered, so the workers
post their READs in the very step that allocates the blocks, instead of asking then
and posting a step later. A grant older than half the lease when the blocks are
allocated is asked again; a refused or unanswered one fails the load (the policy
decides). Grant times are ``time.monotonic()``, the clock the workers check them on.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import FailureReason, ParamsError, PeerRefused
from .base_scheduler import FINISHED_OK, BaseScheduler
from .control_client import grant_failure, send_read
from .metadata import (PD_PROTOCOL_VERSION, RecvJob, check_prompt_digest, is_push, parse_remote_params,
                       plan_block_read, prompt_fields, remote_prompt_tokens)

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.pdsidecar.connector")

RENEW_EVERY = 1 / 6  # decode: renew a waiting request's lease every lease * this
RENEW_TO = 2 / 3  # prefill: a renewal extends the lease to now + lease * this
RENEW_BATCH = 64  # request ids per renew: notification


@dataclass
class Lease:
    """Prefill side: one finished request's blocks held for a decode engine."""

    nblocks: int
    lease_s: float
    deadline: float  # the scheduler's clock (monotonic)
    closed: bool = False  # released or expired: every later read: is refused

    def alive(self, now: float) -> bool:
        return not self.closed and now <= self.deadline


@dataclass
class Renewal:
    """Decode side: a queued request whose prefill lease we keep alive."""

    host: str
    port: int
    engine_id: str
    remote_request_id: str
    every_s: float
    next_at: float


@dataclass
class ReadGrant:
    """Decode side: a ``read:`` asked of the prefill for one request."""

    t_asked: float  # time.monotonic() before the ask went out
    lease_s: float
    answer: Future  # its result: None once granted; raises when refused or unreachable

    def fresh(self, now: float) -> bool:
        """Granted and at least half of the granted lease left."""
        return self.answer.done() and self.answer.exception() is None and \
            now < self.t_asked + self.lease_s / 2


class PullScheduler(BaseScheduler):
    """Pull mode: the decode engine READs the prefill engine's leased blocks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._renewals: dict[str, Renewal] = {}  # decode: req -> its prefill lease
        self._read_grants: dict[str, ReadGrant] = {}  # decode: req -> its early read:
        self._grant_pool: ThreadPoolExecutor | None = None
        self._next_renewal = math.inf
        self._next_expiry = math.inf  # prefill: no lease ends before this
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------ prefill leases
    def _on_lease_notify(self, kind: str, arg: str) -> None:
        """``release:<id>`` / ``renew:<id>,...`` / ``read:<id>`` from a decode engine."""
        now = self.clock()
        with self._lock:
            if kind == "release":
                lease = self._pending.get(arg)
                if lease is not None and not lease.closed:
                    lease.closed = True
                    self._release_in.add(arg)
            elif kind == "renew":
                for rid in arg.split(",")[:RENEW_BATCH]:
                    lease = self._pending.get(rid)
                    if lease is not None and lease.alive(now):
                        lease.deadline = max(lease.deadline, now + RENEW_TO * lease.lease_s)
                        self._renewed_new += 1
            else:  # read: the decode READs once this returns; refused when too late
                lease = self._pending.get(arg)
                if lease is None or not lease.alive(now):
                    raise PeerRefused(FailureReason.EXPIRED, f"the KV lease of {arg[:80]!r} is "
                                      f"over: its blocks are freed or being freed")
                lease.deadline = max(lease.deadline, now + lease.lease_s)

    def _expired_leases(self) -> set[str]:
        """Leases that ended unread (closed now; the worker frees and counts them)."""
        now = self.clock()
        if now < self._next_expiry:
            return set()
        out: set[str] = set()
        nxt = math.inf
        with self._lock:
            for rid, lease in self._pending.items():
                if lease.closed:
                    continue
                if now > lease.deadline:
                    lease.closed = True
                    out.add(rid)
                else:
                    nxt = min(nxt, lease.deadline)
            self._next_expiry = nxt
        if out:
            self._gauges_dirty = True
        return out

    def _release_remote(self, src_host: str, src_port: int, remote_req_id: str,
                        remote_engine_id: str = "") -> None:
        """Best effort: tell a prefill engine to free blocks (else its lease frees them)."""
        self.notifier.release(src_host, src_port, remote_engine_id, remote_req_id)

    # ------------------------------------------------------------ decode side
    def on_new_request(self, request: "Request") -> None:
        """Start renewing the prefill lease of a pull request that just arrived."""
        params = self._params(request)
        if not params or not params.get("do_remote_prefill") or is_push(params):
            return
        try:
            src = parse_remote_params(params, allowed_hosts=self.cfg.allowed_remote_hosts)
        except ParamsError:
            return  # refused when its blocks are allocated
        if src.lease_s is None:
            return
        every = src.lease_s * RENEW_EVERY
        r = Renewal(src.host, src.port, src.engine_id, src.request_id, every,
                    self.clock() + every)
        self._renewals[request.request_id] = r
        self._next_renewal = min(self._next_renewal, r.next_at)
        self._read_grants[request.request_id] = self._ask_read_grant(src)

    def shutdown(self) -> None:
        super().shutdown()
        if self._grant_pool is not None:
            self._grant_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ decode read grants
    def _ask_read_grant(self, src: Any) -> ReadGrant:
        """``read:<remote id>`` to the prefill's control plane, on a pool thread."""
        if self._grant_pool is None:
            self._grant_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pd-grant")
        t = time.monotonic()
        return ReadGrant(t, src.lease_s, self._grant_pool.submit(
            send_read, src, self.engine_id, self.cfg.handshake_timeout_s))

    def _grant_pending(self, rid: str, params: dict) -> bool:
        """True while the request's read grant is unanswered (re-asked when stale)."""
        g = self._read_grants.get(rid)
        if g is None or not g.answer.done():
            return g is not None
        if g.answer.exception() is None and not g.fresh(time.monotonic()):
            try:  # granted long ago (the request waited for blocks): ask again
                src = parse_remote_params(params, allowed_hosts=self.cfg.allowed_remote_hosts)
            except ParamsError:
                return False
            self._read_grants[rid] = self._ask_read_grant(src)
            return True
        return False

    def _send_renewals(self) -> None:
        """Renew the leases that are due, one notification per prefill engine."""
        now = self.clock()
        if now < self._next_renewal:
            return
        due: dict[tuple[str, int, str], list[str]] = {}
        nxt = math.inf
        for r in self._renewals.values():
            if r.next_at <= now:
                due.setdefault((r.host, r.port, r.engine_id), []).append(r.remote_request_id)
                r.next_at = now + r.every_s
            nxt = min(nxt, r.next_at)
        self._next_renewal = nxt
        for (host, port, engine_id), rids in due.items():
            for i in range(0, len(rids), RENEW_BATCH):
                self.notifier.notify(host, port, engine_id,
                                     "renew:" + ",".join(rids[i:i + RENEW_BATCH]))

    def _pull_matched_tokens(self, request: "Request", num_computed_tokens: int,
                             params: dict) -> tuple[int | None, bool]:
        # a continuation (pd_extra_tokens) claims only the remote prompt's tokens
        count = remote_prompt_tokens(params, request.num_prompt_tokens) - num_computed_tokens
        if count <= 0:
            return 0, False
        if self._grant_pending(request.request_id, params):
            return None, False  # never wait here: a later schedule call picks it up
        return count, True

    def _pull_after_alloc(self, request: "Request", params: dict, blocks: Any,
                          num_external_tokens: int) -> None:
        rid = request.request_id
        self._renewals.pop(rid, None)  # from here on the read grant holds the lease
        grant = self._read_grants.pop(rid, None)
        try:
            src = parse_remote_params(params, allowed_hosts=self.cfg.allowed_remote_hosts)
        except ParamsError as e:
            self._reject_load(request, blocks, num_external_tokens, None, e.reason, str(e))
            log.warning("PdConnector: request %s: invalid kv_transfer_params: %s", rid, e)
            return
        if num_external_tokens == 0:
            # full local prefix hit: nothing to read, free the prefill blocks now
            self._release_remote(src.host, src.port, src.request_id, src.engine_id)
            return
        granted_until = None
        if grant is not None and grant.answer.done():
            e = grant.answer.exception()
            if e is not None:
                self._reject_load(request, blocks, num_external_tokens, src, grant_failure(e),
                                  f"read of {src.request_id!r} at {src.host}:{src.port}: {e}")
                return
            if grant.fresh(time.monotonic()):
                granted_until = grant.t_asked + grant.lease_s
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
            check_prompt_digest(params, getattr(request, "prompt_token_ids", None), src.num_tokens)
        except ParamsError as e:
            self._reject_load(request, blocks, num_external_tokens, src, e.reason, str(e))
            self._release_remote(src.host, src.port, src.request_id, src.engine_id)
            log.warning("PdConnector: request %s: %s", rid, e)
            return
        self._recv[rid] = RecvJob(rid, src, lids, rids, t_alloc=time.monotonic(),
                                  granted_until=granted_until)
        self._recv_blocks[rid] = len(lids)
        self._gauges_dirty = True

    def _pull_aborted_before_load(self, rid: str, params: dict) -> dict[str, Any]:
        """A decode request finished (aborted) before it was scheduled: free the prefill
        blocks now instead of waiting for the lease."""
        params["do_remote_prefill"] = False
        self._renewals.pop(rid, None)
        self._read_grants.pop(rid, None)
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
        # _recv_blocks stays until the worker reports the load over (update_connector_
        # output): an aborted request's blocks are held by vLLM until then, its READ
        # may still write into them
        self._renewals.pop(rid, None)
        self._read_grants.pop(rid, None)
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
        lease_s = self.cfg.kv_lease_s
        lease = Lease(len(ids), lease_s, self.clock() + lease_s)
        with self._lock:
            self._pending[rid] = lease
            self._next_expiry = min(self._next_expiry, lease.deadline)
        self._send[rid] = len(ids)
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
            "remote_blocks_expiry_time": None,  # no wall-clock expiry (as NixlConnector)
            "transfer_mode": "pull",
            "pd_protocol_version": PD_PROTOCOL_VERSION,
            "pd_control_addr": f"{self.host}:{self.port}",
            "remote_dp_rank": self.dp_rank,
            "remote_block_size": self.block_size,
            "pd_kv_bytes": len(ids) * self.block_bytes,
            # the lease duration: the decode paces renewals by it, the sidecar learns
            # the pending-KV lifetime from it; expiry is judged only here
            "pd_kv_lease_s": lease_s,
            **prompt_fields(request, n_tokens),
        }
