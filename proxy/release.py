"""Decode role: the one release path for KV a prefill leg left on a peer.

Every `PrefillResult` ends in `KvRelease.settle` exactly once: it is booked off the peer's
outstanding count and its status (`ReleaseStatus`) is reported, batched per peer, to the
prefill sidecar (`POST /pd/v1/release`, signed), which forgets the pending entry.
`abandon` is for a client that left after the prefill leg but before the decode leg
reached vLLM: a one-token decode leg makes the engine pull (and the prefill engine free)
the KV first, then the result is settled `aborted`.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp

from . import auth
from .body import API_PATHS, release_body
from .endpoints import Endpoint
from .errors import Label, PeerErrorReason
from .pd_request import PdRequest, PrefillResult
from .peers import PeerSet
from .server import forward_headers

__all__ = ["KvRelease", "ReleaseStatus"]

RELEASE_PATH = "/pd/v1/release"


class ReleaseStatus(Label):
    """What became of handed-out KV (`pd_kv_released_total{status}` on the prefill side)."""

    PICKED_UP = "picked_up"  # the decode engine loaded it
    RELEASED = "released"  # not loaded (failed leg, recompute): free it
    ABORTED = "aborted"  # the client went away


class KvRelease:
    """Settles prefill results and sends the batched reports (one batch per peer per `delay_s`)."""

    def __init__(self, sc, peers: PeerSet, identity: Endpoint, delay_s: float = 0.02):
        self.sc = sc
        self.peers = peers
        self.identity = identity
        self.delay_s = delay_s
        self._pending: dict[Endpoint, list[dict[str, str]]] = {}

    def settle(self, pre: PrefillResult | None, status: ReleaseStatus) -> None:
        """Hand `pre` back with `status`; a no-op for None or an already settled result."""
        if pre is None or pre.settled:
            return
        pre.settled = True
        self._book_off(pre, status)

    def abandon(self, rq: PdRequest, body: dict, pre: PrefillResult) -> None:
        """The client left before the decode leg was sent: pull the KV, then settle `aborted`."""
        if pre.settled:
            return
        pre.settled = True
        self.sc.spawn(self._pull_and_abort(rq, body, pre))

    def client_left(self, rq: PdRequest, body: dict, pre: PrefillResult | None, sent: bool) -> None:
        """The client left during the decode leg: `aborted` once the leg was sent (the
        decode engine has or had the KV), else pull the KV first (:meth:`abandon`)."""
        if pre is None or pre.settled:
            return
        if sent:
            self.settle(pre, ReleaseStatus.ABORTED)
        else:
            self.abandon(rq, body, pre)

    def _book_off(self, pre: PrefillResult, status: ReleaseStatus) -> None:
        st = self.peers.state(pre.peer)
        st.outstanding -= 1
        st.outstanding_tokens -= pre.tokens
        self.peers.settle(pre.peer)
        self._report(pre.peer, pre.request_id, status)

    async def _pull_and_abort(self, rq: PdRequest, body: dict, pre: PrefillResult) -> None:
        cfg = self.sc.cfg
        rb = release_body(rq.api, body, pre.kv_params)
        try:
            async with self.sc.upstreams.get(cfg.vllm_url).post(
                    cfg.vllm_url + API_PATHS[rq.api], data=json.dumps(rb).encode(),
                    headers={"content-type": "application/json", "x-request-id": pre.request_id + "-release",
                             **{k: v for k, v in forward_headers(rq.http, "").items() if k == "authorization"}},
                    allow_redirects=False, timeout=aiohttp.ClientTimeout(total=cfg.prefill_timeout_s,
                                                                         sock_connect=cfg.connect_timeout_s)) as r:
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.sc.metrics.upstream_errors.labels("release").inc()
        finally:
            self._book_off(pre, ReleaseStatus.ABORTED)

    # ------------------------------------------------------------ batching
    def _report(self, peer: Endpoint, rid: str, status: ReleaseStatus) -> None:
        q = self._pending.get(peer)
        if q is None:
            q = self._pending[peer] = []
            asyncio.get_running_loop().call_later(self.delay_s, self._flush_soon, peer)
        q.append({"id": rid, "status": status.value})

    def _flush_soon(self, peer: Endpoint) -> None:
        items = self._pending.pop(peer, None)
        if items:
            self.sc.spawn(self._send(peer, items))

    async def _send(self, peer: Endpoint, items: list[dict[str, str]]) -> None:
        sc = self.sc
        batch_id = uuid.uuid4().hex
        data = json.dumps({"releases": items}).encode()
        headers = {"content-type": "application/json", "x-request-id": batch_id,
                   **auth.sign(sc.cfg.auth_token, str(self.identity), batch_id, RELEASE_PATH, data)}
        try:
            async with sc.upstreams.get(peer.url()).post(
                    peer.url() + RELEASE_PATH, data=data, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=5, sock_connect=sc.cfg.connect_timeout_s)) as r:
                await r.read()
                if r.status != 200:
                    sc.metrics.peer_errors.labels(self.peers.label(peer), PeerErrorReason.RELEASE).inc()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            sc.metrics.peer_errors.labels(self.peers.label(peer), PeerErrorReason.RELEASE).inc()
