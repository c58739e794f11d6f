"""Decode role, push mode (`--transfer-mode push`, PdConnector only).

The decode leg starts at once with a fresh push id; the prefill leg carries the same id
and `push_target` (the decode engine's control plane), and the prefill engine WRITEs each
layer's KV into the blocks the decode engine registered. A failed prefill leg is only
counted: the decode engine recomputes after its `push_wait_s`. A data-parallel decode
engine (several `--push-target`s) gets one rank per request, round robin: the decode leg
is pinned to it (vLLM's `X-data-parallel-rank`) and its control plane is the push target,
so the registration and the prefill's lookup meet on the same server.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from . import auth
from .body import API_PATHS, decode_body, prefill_body
from .decode_leg import DecodeLeg
from .endpoints import Endpoint
from .errors import PeerErrorReason
from .pd_request import PdRequest, leg_request_id
from .peers import PeerSet
from .prefill_leg import peer_headers
from .server import DP_RANK_HEADER

__all__ = ["PushLeg"]


class PushLeg:
    def __init__(self, sc, peers: PeerSet, identity: Endpoint, decode: DecodeLeg):
        self.sc = sc
        self.peers = peers
        self.identity = identity
        self.decode = decode
        self._next_rank = 0
        pt = sc.cfg.push_target
        self._targets: list[Endpoint] = [pt] if isinstance(pt, Endpoint) else list(pt or [])

    async def run(self, rq: PdRequest, body: dict, forced: Endpoint | None) -> web.StreamResponse:
        ep = forced if forced is not None else self.peers.pick()
        if ep is None:
            rq.path = "local"
            self.sc.metrics.local_decisions.labels("no_peer").inc()
            return await self.decode.run(rq, body)
        push_rid = leg_request_id(rq.rid)
        kv = {"do_remote_prefill": True, "transfer_mode": "push", "remote_request_id": push_rid,
              "remote_peer": str(ep)}
        rank = self._next_rank % len(self._targets)
        self._next_rank += 1
        dp_header = {DP_RANK_HEADER: str(rank)} if len(self._targets) > 1 else None
        task = self.sc.spawn(self._prefill(rq, body, ep, push_rid, self._targets[rank]))
        rq.path, rq.peer = "disagg", str(ep)
        try:
            return await self.decode.run(rq, decode_body(rq.api, body, kv, None), extra_headers=dp_header)
        finally:
            if not task.done():
                task.cancel()

    async def _prefill(self, rq: PdRequest, body: dict, ep: Endpoint, push_rid: str, push_target: Endpoint) -> None:
        """The prefill leg of a push: its answer carries nothing the decode leg needs."""
        m = self.sc.metrics
        try:
            pb = prefill_body(rq.api, body, False)
            pb["kv_transfer_params"] = {"do_remote_decode": True, "transfer_mode": "push",
                                        "remote_request_id": push_rid, "push_target": str(push_target)}
            path = API_PATHS[rq.api]
            headers = peer_headers(self.sc, rq.http, push_rid)
            data = json.dumps(pb).encode()
            headers.update(auth.sign(self.sc.cfg.auth_token, str(self.identity), push_rid, path, data))
            async with self.sc.upstreams.get(ep.url()).post(
                    ep.url() + path, data=data, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.sc.cfg.prefill_timeout_s)) as r:
                await r.read()
                if r.status != 200:
                    m.peer_errors.labels(self.peers.label(ep), PeerErrorReason.HTTP_5XX if r.status >= 500 else PeerErrorReason.HTTP_4XX).inc()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            m.peer_errors.labels(self.peers.label(ep), PeerErrorReason.CONNECT).inc()
