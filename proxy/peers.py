"""Peer allowlists, DNS-resolved targets and least-pending-KV peer selection.

`PeerSet` holds the decode role's prefill peers and picks one; `PeerWatcher` keeps it
fresh (DNS re-resolution of targets and allowlist names, the peers' `/pd/v1/stats`) and
publishes the per-peer gauges.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import aiohttp

from .endpoints import Endpoint, norm_host, parse_endpoint
from .errors import PeerErrorReason

log = logging.getLogger("pdsidecar.peers")


def canonical_ip(addr: str | None) -> str | None:
    if not addr:
        return None
    try:
        return norm_host(addr.split("%", 1)[0])
    except ValueError:
        return None


async def resolve(host: str, port: int | None) -> set[str]:
    """IPs a name resolves to (empty set on failure); IP literals resolve to themselves."""
    try:
        ipaddress.ip_address(host)
        return {host}
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {canonical_ip(i[4][0]) for i in infos} - {None}


class Allowlist:
    """host:port entries (host:* = any port; CIDR:port; DNS names resolved and refreshed)."""

    def __init__(self, entries: Iterable[Endpoint]):
        self.entries = list(entries)
        self._resolved: dict[Endpoint, set[str]] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    async def refresh(self) -> None:
        for e in self.entries:
            if "/" in e.host or e.is_ip:
                continue
            ips = await resolve(e.host, e.port)
            if ips or e not in self._resolved:
                self._resolved[e] = ips

    def allows(self, host: str, port: int) -> bool:
        host = norm_host(host)
        ip = None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        for e in self.entries:
            if e.port is not None and e.port != port:
                continue
            if e.host == host:
                return True
            if ip is None:
                continue
            if "/" in e.host:
                net = ipaddress.ip_network(e.host)
                if ip.version == net.version and ip in net:
                    return True
            elif host in self._resolved.get(e, ()):
                return True
        return False

    def host_matches_source(self, claimed_host: str, source_ip: str | None) -> bool:
        """Is the socket peer address one of the claimed host's addresses?"""
        src = canonical_ip(source_ip)
        if src is None:
            return False
        claimed = norm_host(claimed_host)
        if claimed == src:
            return True
        for e in self.entries:
            if e.host == claimed and src in self._resolved.get(e, ()):
                return True
        return False


@dataclass
class PeerState:
    endpoint: Endpoint
    outstanding: int = 0  # legs in flight + KV handed out to us and not yet picked up
    outstanding_tokens: int = 0
    remote_pending_tokens: int = 0  # from the peer's /pd/v1/stats (all decode peers)
    remote_in_flight: int = 0
    remote_draining: bool = False
    down_until: float = 0.0  # after a connect error: skip while others are up
    errors: int = 0
    from_target: bool = True
    last_stats: float = 0.0


@dataclass
class PeerSet:
    """Decode role: the prefill peers named by KV_TRANSFER_TARGET (names resolved)."""

    targets: list[Endpoint]
    peers: dict[Endpoint, PeerState] = field(default_factory=dict)
    down_s: float = 5.0

    async def refresh(self) -> None:
        seen: set[Endpoint] = set()
        for t in self.targets:
            if t.is_ip:
                eps = [t]
            else:
                ips = await resolve(t.host, t.port)
                eps = [Endpoint(ip, t.port) for ip in sorted(ips)] or [t]
            for ep in eps:
                seen.add(ep)
                self.peers.setdefault(ep, PeerState(ep)).from_target = True  # a named peer that became a target
        for ep in list(self.peers):
            st = self.peers[ep]
            if st.from_target and ep not in seen and st.outstanding == 0:
                del self.peers[ep]

    def state(self, ep: Endpoint) -> PeerState:
        st = self.peers.get(ep)
        if st is None:
            st = self.peers[ep] = PeerState(ep, from_target=False)
        return st

    def pick(self, exclude: set[Endpoint] | None = None) -> Endpoint | None:
        """Least pending KV (ours + what the peer reports), skipping recently failed peers."""
        now = time.monotonic()
        cands = [s for ep, s in self.peers.items() if s.from_target and ep not in (exclude or ())]
        if not cands:
            return None
        up = [s for s in cands if s.down_until <= now and not s.remote_draining] or cands
        best = min(s.outstanding_tokens + s.remote_pending_tokens + 64 * (s.outstanding + s.remote_in_flight)
                   for s in up)
        ties = [s for s in up if s.outstanding_tokens + s.remote_pending_tokens
                + 64 * (s.outstanding + s.remote_in_flight) == best]
        return random.choice(ties).endpoint

    def settle(self, ep: Endpoint) -> None:
        """Forget a client-named (not configured) peer once none of its legs or KV is
        outstanding: state from x-prefiller-host-port never outlives its requests."""
        st = self.peers.get(ep)
        if st is not None and not st.from_target and st.outstanding <= 0:
            del self.peers[ep]

    def mark_down(self, ep: Endpoint) -> None:
        st = self.state(ep)
        st.errors += 1
        st.down_until = time.monotonic() + self.down_s

    def label(self, ep: Endpoint) -> str:
        """The Prometheus `peer` label: configured/resolved targets by name, every
        client-named peer as "other" (labels stay bounded)."""
        st = self.peers.get(ep)
        return str(ep) if st is not None and st.from_target else "other"

    def stats(self) -> dict[str, Any]:
        """The decode role's `/pd/v1/stats` body."""
        now = time.monotonic()
        return {"peers": {str(ep): {"outstanding": st.outstanding, "outstanding_tokens": st.outstanding_tokens,
                                    "remote_pending_tokens": st.remote_pending_tokens,
                                    "remote_in_flight": st.remote_in_flight, "draining": st.remote_draining,
                                    "down": st.down_until > now, "configured": st.from_target}
                          for ep, st in self.peers.items()},
                "pending": {"requests": sum(s.outstanding for s in self.peers.values()),
                            "tokens": sum(s.outstanding_tokens for s in self.peers.values())}}


class PeerWatcher:
    """Decode role: re-resolves targets and allowlist every `--dns-refresh` s, polls the
    configured peers' `/pd/v1/stats` every `--peer-stats-interval` s (a client-named peer
    is never polled) and keeps the per-peer gauges."""

    def __init__(self, sc, peers: PeerSet, allow: Allowlist):
        self.sc = sc
        self.peers = peers
        self.allow = allow
        self._bg: list[asyncio.Task] = []
        self._labelled: set[str] = set()

    async def start(self) -> None:
        await self.peers.refresh()
        await self.allow.refresh()
        self._bg.append(self.sc.spawn(self._dns_loop()))
        if self.sc.cfg.peer_stats_interval_s > 0 and self.peers.targets:
            self._bg.append(self.sc.spawn(self._stats_loop()))

    async def stop(self) -> None:
        for t in self._bg:
            t.cancel()

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sc.cfg.dns_refresh_s)
            try:
                await self.peers.refresh()
                await self.allow.refresh()
            except Exception:  # keep the last good view
                log.warning("peer refresh failed", exc_info=True)

    async def _stats_loop(self) -> None:
        cfg = self.sc.cfg
        while True:
            await asyncio.sleep(cfg.peer_stats_interval_s)
            # only configured/resolved targets: a client-named peer is never polled
            await asyncio.gather(*(self.poll_stats(ep) for ep, st in list(self.peers.peers.items())
                                   if st.from_target), return_exceptions=True)

    async def poll_stats(self, ep: Endpoint) -> None:
        """Read one peer's `/pd/v1/stats` into its `PeerState` (an error counts `stats`)."""
        st = self.peers.state(ep)
        try:
            async with self.sc.upstreams.get(ep.url()).get(
                    ep.url() + "/pd/v1/stats", allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=1.0, sock_connect=self.sc.cfg.connect_timeout_s)) as r:
                data = await r.json(content_type=None) if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            self.sc.metrics.peer_errors.labels(self.peers.label(ep), PeerErrorReason.STATS).inc()
            return
        pending = data.get("pending") if isinstance(data.get("pending"), dict) else {}
        tok = pending.get("tokens")
        st.remote_pending_tokens = int(tok) if isinstance(tok, int) else 0
        inf = data.get("in_flight")
        st.remote_in_flight = int(inf) if isinstance(inf, int) else 0
        st.remote_draining = bool(data.get("draining"))
        st.last_stats = time.monotonic()

    def refresh_gauges(self) -> None:
        m = self.sc.metrics
        now: set[str] = set()
        for ep, st in list(self.peers.peers.items()):
            if not st.from_target:  # client-named: counted in stats, never a label
                continue
            now.add(str(ep))
            m.pending_requests.labels(str(ep)).set(st.outstanding)
            m.pending_tokens.labels(str(ep)).set(st.outstanding_tokens)
        for gone in self._labelled - now:  # a target DNS no longer returns
            for g in (m.pending_requests, m.pending_tokens):
                try:
                    g.remove(gone)
                except KeyError:
                    pass
        self._labelled = now


def parse_prefiller_header(value: str) -> Endpoint:
    """`x-prefiller-host-port`: strict host:port (ValueError otherwise)."""
    return parse_endpoint(value)
