"""host:port endpoints: one strict parser shared by the proxy and the pdsidecar CLI.

`parse_endpoint` accepts `1.2.3.4:80`, `[::1]:80`, `name.svc:80` (and, where asked,
`host:*` and `CIDR:port`) and nothing else; `norm_host` is how peers compare hosts
(lower-case names, canonical IPs, IPv4-mapped IPv6 as IPv4).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Endpoint", "HOSTNAME_RE", "norm_host", "parse_endpoint", "parse_endpoint_list"]

HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


@dataclass(frozen=True)
class Endpoint:
    """A host (IPv4, IPv6 or DNS name) and a TCP port. `port` None only in allowlists (= any)."""

    host: str
    port: int | None

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def hostport(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{h}:{'*' if self.port is None else self.port}"

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.hostport()}"

    def __str__(self) -> str:
        return self.hostport()


def parse_endpoint(text: str, *, allow_any_port: bool = False, allow_cidr: bool = False) -> Endpoint:
    """Strict `host:port` parser (no scheme, userinfo, path, query or fragment).

    Accepts `1.2.3.4:80`, `[::1]:80`, `name.svc:80`; with `allow_any_port` also `host:*`;
    with `allow_cidr` also `10.0.0.0/8:80`. Raises ValueError with a short reason.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty endpoint")
    if any(c in s for c in "@/?#\\ \t\r\n%") and not (allow_cidr and s.count("/") == 1 and "@" not in s):
        raise ValueError(f"{text!r} is not host:port (no scheme, userinfo, path or spaces)")
    if "://" in s:
        raise ValueError(f"{text!r} is not host:port (no scheme)")
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or len(s) <= end + 1 or s[end + 1] != ":":
            raise ValueError(f"{text!r}: IPv6 must be [addr]:port")
        host, port_s = s[1:end], s[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: bad IPv6 address") from None
    else:
        if s.count(":") != 1:
            raise ValueError(f"{text!r} is not host:port (IPv6 needs brackets)")
        host, port_s = s.split(":")
        if allow_cidr and "/" in host:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError(f"{text!r}: bad CIDR") from None
        else:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                if not HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
                    raise ValueError(f"{text!r}: bad host name") from None
    host = norm_host(host)
    if port_s == "*" and allow_any_port:
        return Endpoint(host, None)
    if not port_s.isdigit() or not (0 < int(port_s) < 65536) or (len(port_s) > 1 and port_s[0] == "0"):
        raise ValueError(f"{text!r}: port must be 1-65535")
    return Endpoint(host, int(port_s))


def norm_host(host: str) -> str:
    """A host as peers compare it: lower-case names, canonical IPs (IPv4-mapped IPv6 -> IPv4), CIDRs as networks."""
    if "/" in host:
        return str(ipaddress.ip_network(host, strict=False))
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def parse_endpoint_list(text: str | None, **kw: Any) -> list[Endpoint]:
    """A comma list of `parse_endpoint` entries (duplicates dropped, order kept)."""
    if not text:
        return []
    out: list[Endpoint] = []
    for part in text.split(","):
        if part.strip():
            ep = parse_endpoint(part, **kw)
            if ep not in out:
                out.append(ep)
    return out
