"""Sidecar configuration: flags > environment > defaults, validated once at startup.

`load_config(argv, environ)` returns a `SidecarConfig` or raises `ConfigError` (one line,
meant for the user; `run_sidecar` prints it and exits 2). `render_config` is what
`pdsidecar run --print-config` prints (secrets redacted, with where each value came from).

Environment contract (seed pattern 5 + ours): PREFILL_MODE, KV_TRANSFER_TARGET,
KV_TRANSFER_PROTOCOL, PDSIDECAR_* (see OPTIONS below and docs/sidecar.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

__all__ = [
    "ConfigError",
    "Endpoint",
    "SidecarConfig",
    "OPTIONS",
    "build_parser",
    "load_config",
    "parse_endpoint",
    "parse_endpoint_list",
    "render_config",
]

ROLES = ("prefill", "decode")
PROTOCOLS = ("rdma", "ipc", "tcp", "auto")
FALLBACK_POLICIES = ("fallback", "fail")
TOKEN_ESTIMATORS = ("chars", "tokenize")
REUSE_MODES = ("off", "completions", "all")
TRANSFER_MODES = ("pull", "push")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """Invalid configuration; the message is one line for the user."""


# --------------------------------------------------------------------------- #
# host:port endpoints

_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


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
                if not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
                    raise ValueError(f"{text!r}: bad host name") from None
    host = _norm_host(host)
    if port_s == "*" and allow_any_port:
        return Endpoint(host, None)
    if not port_s.isdigit() or not (0 < int(port_s) < 65536) or (len(port_s) > 1 and port_s[0] == "0"):
        raise ValueError(f"{text!r}: port must be 1-65535")
    return Endpoint(host, int(port_s))


def _norm_host(host: str) -> str:
    """Lower-case names, canonical IPs (IPv4-mapped IPv6 -> IPv4), CIDRs as networks."""
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
    if not text:
        return []
    out: list[Endpoint] = []
    for part in text.split(","):
        if part.strip():
            ep = parse_endpoint(part, **kw)
            if ep not in out:
                out.append(ep)
    return out


# --------------------------------------------------------------------------- #
# options


def _bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{s!r} is not a boolean (true/false)")


def _pos_float(s: str) -> float:
    v = float(s)
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError(f"{s!r} must be a positive number")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"{s!r} must be >= 0")
    return v


def _pos_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise ValueError(f"{s!r} must be a positive integer")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise ValueError(f"{s!r} must be >= 0")
    return v


MAX_WORKERS = 64


def _workers(s: str) -> int:
    try:
        v = int(str(s).strip())
    except ValueError:
        raise ValueError(f"{s!r} must be an integer 1-{MAX_WORKERS}") from None
    if not 1 <= v <= MAX_WORKERS:
        raise ValueError(f"{s!r} must be 1-{MAX_WORKERS}")
    return v


def _port(s: str) -> int:
    v = int(s)
    if not 0 < v < 65536:
        raise ValueError(f"{s!r} is not a TCP port (1-65535)")
    return v


def _opt_port(s: str) -> int | None:
    if str(s).strip() in ("", "0", "none", "off"):
        return None
    return _port(s)


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def conv(s: str) -> str:
        v = str(s).strip().lower()
        if v not in choices:
            raise ValueError(f"{s!r} is not one of {', '.join(choices)}")
        return v

    return conv


def _url(s: str) -> str:
    u = urlsplit(s.strip())
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password or u.query or u.fragment:
        raise ValueError(f"{s!r} must be http(s)://host[:port] without credentials")
    try:
        u.port
    except ValueError:
        raise ValueError(f"{s!r} has a bad port") from None
    return s.strip().rstrip("/")


def _targets(s: str) -> list[Endpoint]:
    eps = parse_endpoint_list(s)
    return eps


def _peers(s: str) -> list[Endpoint]:
    return parse_endpoint_list(s, allow_any_port=True, allow_cidr=True)


def _str(s: str) -> str:
    return str(s)


def _endpoint(s: str) -> Endpoint:
    return parse_endpoint(s)


def _endpoints(s: str) -> list[Endpoint]:
    return [parse_endpoint(x) for x in str(s).split(",") if x.strip()]


@dataclass(frozen=True)
class Option:
    name: str  # field name
    flag: str
    env: tuple[str, ...]
    default: Any
    conv: Callable[[str], Any]
    help: str
    secret: bool = False
    is_bool_flag: bool = False


OPTIONS: list[Option] = [
    Option("role", "--role", (), None, _choice(ROLES),
           "prefill or decode (env PREFILL_MODE=true|false)"),
    Option("host", "--host", ("PDSIDECAR_HOST",), "0.0.0.0", _str, "listen address"),
    Option("port", "--port", ("PDSIDECAR_PORT",), 8000, _port, "listen port (API, /metrics, /pd/v1/*)"),
    Option("workers", "--workers", ("PD_WORKERS",), 1, _workers,
           "decode: worker processes sharing --port (SO_REUSEPORT), supervised by this process (1 = no supervisor)"),
    Option("metrics_port", "--metrics-port", ("PDSIDECAR_METRICS_PORT",), None, _opt_port,
           "optional extra port serving only /metrics"),
    Option("vllm_url", "--vllm-url", ("PDSIDECAR_VLLM_URL",), "http://127.0.0.1:8200", _url,
           "the local vLLM OpenAI server"),
    Option("targets", "--kv-transfer-target", ("KV_TRANSFER_TARGET",), [], _targets,
           "decode: prefill sidecars (host:port list; DNS names may resolve to several); "
           "prefill: decode sidecars (default allowlist)"),
    Option("protocol", "--kv-transfer-protocol", ("KV_TRANSFER_PROTOCOL",), "auto", _choice(PROTOCOLS),
           "KV transport hint (the connector's; reported in stats/pd_info)"),
    Option("auth_token", "--auth-token", ("PDSIDECAR_AUTH_TOKEN",), None, _str,
           "shared secret between sidecars (HMAC-signed peer identity)", secret=True),
    Option("auth_token_file", "--auth-token-file", ("PDSIDECAR_AUTH_TOKEN_FILE",), None, _str,
           "file holding the shared secret (mounted Secret)"),
    Option("allowed_peers", "--allowed-peers", ("PDSIDECAR_ALLOWED_PEERS",), [], _peers,
           "peers allowed to talk to / be named to this sidecar: host:port, host:*, CIDR:port"),
    Option("advertise", "--advertise", ("PDSIDECAR_ADVERTISE",), None, _endpoint,
           "host:port this sidecar claims as its identity to peers (default POD_IP:port)"),
    Option("peer_source_check", "--peer-source-check", ("PDSIDECAR_PEER_SOURCE_CHECK",), True, _bool,
           "prefill: require the socket peer address to match the claimed peer host (off behind a mesh proxy)"),
    Option("allow_unauthenticated", "--allow-unauthenticated", ("PDSIDECAR_ALLOW_UNAUTHENTICATED",), False, _bool,
           "prefill: accept prefill legs without token and allowlist (development only)", is_bool_flag=True),
    Option("forward_authorization", "--forward-authorization", ("PDSIDECAR_FORWARD_AUTHORIZATION",), False, _bool,
           "decode: pass the client's Authorization header on to prefill sidecars (and so prefill vLLM); "
           "off: it goes to the local vLLM only", is_bool_flag=True),
    Option("max_prefill_answer_bytes", "--max-prefill-answer-bytes", ("PDSIDECAR_MAX_PREFILL_ANSWER_BYTES",),
           512 * 1024, _pos_int,
           "decode: largest prefill answer read from a peer (larger: local fallback, peer_answer_rejected); "
           "raise it for very long prompts with --reuse-token-ids"),
    Option("replay_cache_size", "--replay-cache-size", ("PDSIDECAR_REPLAY_CACHE_SIZE",), 200_000, _pos_int,
           "prefill: signed-request nonces remembered (~240 s each) to refuse replays; 503 when full"),
    Option("connect_timeout_s", "--connect-timeout", ("PDSIDECAR_CONNECT_TIMEOUT",), 2.0, _pos_float,
           "seconds to open an upstream connection"),
    Option("prefill_timeout_s", "--prefill-timeout", ("PDSIDECAR_PREFILL_TIMEOUT",), 60.0, _pos_float,
           "seconds for the whole prefill leg"),
    Option("decode_timeout_s", "--decode-timeout", ("PDSIDECAR_DECODE_TIMEOUT",), 600.0, _pos_float,
           "seconds of silence allowed on the decode leg (between chunks)"),
    Option("total_timeout_s", "--total-timeout", ("PDSIDECAR_TOTAL_TIMEOUT",), 1800.0, _pos_float,
           "seconds for a whole request"),
    Option("client_body_timeout_s", "--client-body-timeout", ("PDSIDECAR_CLIENT_BODY_TIMEOUT",), 30.0, _pos_float,
           "seconds to receive a request body once its headers are in (408 after)"),
    Option("drain_grace_s", "--drain-grace", ("PDSIDECAR_DRAIN_GRACE",), 30.0, _nonneg_float,
           "seconds to finish in-flight requests after SIGTERM"),
    Option("max_body_bytes", "--max-body-bytes", ("PDSIDECAR_MAX_BODY_BYTES",), 16 * 1024 * 1024, _pos_int,
           "largest request body accepted (413 above)"),
    Option("max_header_bytes", "--max-header-bytes", ("PDSIDECAR_MAX_HEADER_BYTES",), 16 * 1024, _pos_int,
           "largest request line / header field (client and upstream)"),
    Option("max_in_flight", "--max-in-flight", ("PDSIDECAR_MAX_IN_FLIGHT",), 4096, _pos_int,
           "concurrent requests before 503 + Retry-After"),
    Option("pool_size", "--pool-size", ("PDSIDECAR_POOL_SIZE",), 512, _pos_int,
           "connections per upstream pool"),
    Option("keepalive_s", "--upstream-keepalive", ("PDSIDECAR_UPSTREAM_KEEPALIVE",), 4.0, _pos_float,
           "idle upstream keep-alive (shorter than vLLM's 5 s)"),
    Option("server_keepalive_s", "--server-keepalive", ("PDSIDECAR_SERVER_KEEPALIVE",), 75.0, _pos_float,
           "idle keep-alive this server grants its clients"),
    Option("local_threshold_tokens", "--local-threshold-tokens", ("PDSIDECAR_LOCAL_THRESHOLD_TOKENS",), 0,
           _nonneg_int, "decode: prompts estimated below this many tokens run locally (0 = always disaggregate)"),
    Option("token_estimator", "--token-estimator", ("PDSIDECAR_TOKEN_ESTIMATOR",), "chars",
           _choice(TOKEN_ESTIMATORS), "chars (len/chars-per-token, free) or tokenize (ask local vLLM /tokenize)"),
    Option("chars_per_token", "--chars-per-token", ("PDSIDECAR_CHARS_PER_TOKEN",), 4.0, _pos_float,
           "characters per token for the chars estimator"),
    Option("fallback", "--fallback", ("PDSIDECAR_FALLBACK",), "fallback", _choice(FALLBACK_POLICIES),
           "decode: on prefill error/timeout recompute locally (fallback) or answer 502/504 (fail)"),
    Option("prefill_retries", "--prefill-retries", ("PDSIDECAR_PREFILL_RETRIES",), 1, _nonneg_int,
           "decode: extra attempts on another peer after a connect error (nothing sent yet)"),
    Option("reuse_token_ids", "--reuse-token-ids", ("PDSIDECAR_REUSE_TOKEN_IDS",), "all", _choice(REUSE_MODES),
           "decode: hand the decode leg the prefill leg's prompt token ids (off|completions|all)"),
    Option("transfer_mode", "--transfer-mode", ("PDSIDECAR_TRANSFER_MODE",), "pull", _choice(TRANSFER_MODES),
           "pull (decode leg after prefill) or push (both legs at once; connector must support it)"),
    Option("push_target", "--push-target", ("PDSIDECAR_PUSH_TARGET",), None, _endpoints,
           "decode, push mode: host:port of the local engine's KV control plane (PdConnector "
           "control_port), sent to the prefill engine as the push destination; a comma list "
           "for a data-parallel decode engine, one per DP rank in rank order (each request "
           "goes to one rank: X-data-parallel-rank on the decode leg, that rank's address "
           "as push_target)"),
    Option("kv_ttl_s", "--kv-ttl", ("PDSIDECAR_KV_TTL",), 120.0, _pos_float,
           "prefill: forget handed-out KV not reported picked up after this many seconds"),
    Option("peer_stats_interval_s", "--peer-stats-interval", ("PDSIDECAR_PEER_STATS_INTERVAL",), 2.0,
           _nonneg_float, "decode: poll prefill peers' /pd/v1/stats every N s (0 = off)"),
    Option("dns_refresh_s", "--dns-refresh", ("PDSIDECAR_DNS_REFRESH",), 10.0, _pos_float,
           "decode: re-resolve KV_TRANSFER_TARGET names every N s"),
    Option("log_level", "--log-level", ("PDSIDECAR_LOG_LEVEL",), "info", _choice(LOG_LEVELS), "log level"),
    Option("log_format", "--log-format", ("PDSIDECAR_LOG_FORMAT",), "json", _choice(LOG_FORMATS),
           "json (one object per line) or text"),
    Option("otel", "--otel", ("PDSIDECAR_OTEL",), False, _bool,
           "emit OpenTelemetry spans (if opentelemetry is importable)", is_bool_flag=True),
]

_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass
class SidecarConfig:
    role: str = "decode"
    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 1
    metrics_port: int | None = None
    vllm_url: str = "http://127.0.0.1:8200"
    targets: list[Endpoint] = field(default_factory=list)
    protocol: str = "auto"
    auth_token: str | None = None
    auth_token_file: str | None = None
    allowed_peers: list[Endpoint] = field(default_factory=list)
    advertise: Endpoint | None = None
    peer_source_check: bool = True
    allow_unauthenticated: bool = False
    forward_authorization: bool = False
    max_prefill_answer_bytes: int = 512 * 1024
    replay_cache_size: int = 200_000
    connect_timeout_s: float = 2.0
    prefill_timeout_s: float = 60.0
    decode_timeout_s: float = 600.0
    total_timeout_s: float = 1800.0
    client_body_timeout_s: float = 30.0
    drain_grace_s: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_in_flight: int = 4096
    pool_size: int = 512
    keepalive_s: float = 4.0
    server_keepalive_s: float = 75.0
    local_threshold_tokens: int = 0
    token_estimator: str = "chars"
    chars_per_token: float = 4.0
    fallback: str = "fallback"
    prefill_retries: int = 1
    reuse_token_ids: str = "all"
    transfer_mode: str = "pull"
    push_target: list[Endpoint] | None = None
    kv_ttl_s: float = 120.0
    peer_stats_interval_s: float = 2.0
    dns_refresh_s: float = 10.0
    log_level: str = "info"
    log_format: str = "json"
    otel: bool = False
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def identity(self) -> Endpoint:
        """The host:port this sidecar claims to peers."""
        if self.advertise is not None:
            return self.advertise
        host = os.environ.get("POD_IP") or ("127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host)
        return Endpoint(host, self.port)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise ConfigError(message)


def build_parser(prog: str = "pdsidecar run") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="P/D disaggregation sidecar next to vLLM (prefill or decode role).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=None)
    p.add_argument("--print-config", action="store_true", default=False,
                   help="print the effective configuration (secrets redacted) and exit")
    for o in OPTIONS:
        env = f" [env {', '.join(o.env)}]" if o.env else ""
        default = "" if o.default in (None, []) else f" (default {o.default})"
        if o.is_bool_flag:
            p.add_argument(o.flag, dest=o.name, nargs="?", const="true", default=None, metavar="BOOL",
                           help=o.help + env + default)
        else:
            p.add_argument(o.flag, dest=o.name, default=None, help=o.help + env + default)
    return p


def load_config(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> tuple[SidecarConfig, bool]:
    """(config, print_config) from flags > env > defaults. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for o in OPTIONS:
        raw = getattr(args, o.name)
        src = f"flag {o.flag}"
        if raw is None:
            for name in o.env:
                if name in environ and environ[name].strip() != "":
                    raw, src = environ[name], f"env {name}"
                    break
        if raw is None:
            values[o.name] = o.default
            sources[o.name] = "default"
            continue
        try:
            values[o.name] = o.conv(raw)
        except (ValueError, TypeError) as e:
            shown = "<redacted>" if o.secret else repr(raw)
            msg = str(e) if not o.secret else "invalid value"
            raise ConfigError(f"{o.flag} ({src}) = {shown}: {msg}") from None
        sources[o.name] = src

    # role: --role > PREFILL_MODE
    if values["role"] is None:
        pm = environ.get("PREFILL_MODE")
        if pm is not None and pm.strip() != "":
            try:
                values["role"] = "prefill" if _bool(pm) else "decode"
            except ValueError as e:
                raise ConfigError(f"PREFILL_MODE: {e}") from None
            sources["role"] = "env PREFILL_MODE"
        else:
            raise ConfigError("no role: pass --role prefill|decode or set PREFILL_MODE=true|false")

    cfg = SidecarConfig(**values, sources=sources)
    _validate(cfg)
    return cfg, bool(args.print_config)


def _validate(cfg: SidecarConfig) -> None:
    if cfg.auth_token_file:
        if cfg.auth_token:
            raise ConfigError("set only one of --auth-token (PDSIDECAR_AUTH_TOKEN) and --auth-token-file")
        try:
            with open(cfg.auth_token_file, encoding="utf-8") as f:
                cfg.auth_token = f.read().strip()
        except OSError as e:
            raise ConfigError(f"--auth-token-file {cfg.auth_token_file}: {e.strerror}") from None
        cfg.sources["auth_token"] = f"file {cfg.auth_token_file}"
    if cfg.auth_token is not None and len(cfg.auth_token) < 16:
        raise ConfigError("the auth token must be at least 16 characters")
    if cfg.metrics_port is not None and cfg.metrics_port == cfg.port:
        raise ConfigError(f"--metrics-port {cfg.metrics_port} equals --port; leave it unset to serve /metrics on the main port")
    if cfg.role == "prefill":
        if cfg.workers > 1:
            raise ConfigError(f"--workers {cfg.workers}: the prefill role runs one process (its replay cache and "
                              "pending-KV table are per process); use --workers with the decode role")
        if not cfg.auth_token and not cfg.allow_unauthenticated:
            raise ConfigError("prefill role needs PDSIDECAR_AUTH_TOKEN (or --allow-unauthenticated for development)")
        if not cfg.allowed_peers and cfg.targets:
            # seed pattern 5: the prefill pod names its decode service in KV_TRANSFER_TARGET
            cfg.allowed_peers = list(cfg.targets)
            cfg.sources["allowed_peers"] = "from KV_TRANSFER_TARGET"
    else:
        if cfg.transfer_mode == "push" and not cfg.targets and not cfg.allowed_peers:
            raise ConfigError("--transfer-mode push needs prefill peers (KV_TRANSFER_TARGET)")
        if cfg.transfer_mode == "push" and (not cfg.push_target or any(e.port is None for e in cfg.push_target)):
            raise ConfigError("--transfer-mode push needs --push-target HOST:PORT (the decode "
                              "engine's PdConnector control_port)")
    if cfg.total_timeout_s < cfg.prefill_timeout_s:
        raise ConfigError(f"--total-timeout ({cfg.total_timeout_s}) must be >= --prefill-timeout ({cfg.prefill_timeout_s})")
    if cfg.connect_timeout_s > cfg.prefill_timeout_s:
        raise ConfigError("--connect-timeout must be <= --prefill-timeout")
    if cfg.max_header_bytes < 1024:
        raise ConfigError("--max-header-bytes must be >= 1024")
    try:
        ipaddress.ip_address(cfg.host)
    except ValueError:
        if not _HOSTNAME_RE.match(cfg.host):
            raise ConfigError(f"--host {cfg.host!r} is not an address or host name") from None


def _shown(name: str, value: Any) -> Any:
    o = _BY_NAME.get(name)
    if name == "auth_token" or (o is not None and o.secret):
        return None if value is None else "<redacted>"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, Endpoint):
        return str(value)
    return value


def render_config(cfg: SidecarConfig, fmt: str = "text") -> str:
    """The effective config, secrets redacted; `fmt` text (with sources) or json."""
    rows = []
    for o in OPTIONS:
        rows.append((o.name, _shown(o.name, getattr(cfg, o.name)), cfg.sources.get(o.name, "default")))
    rows.append(("identity", str(cfg.identity()), "derived"))
    if fmt == "json":
        return json.dumps({k: v for k, v, _ in rows}, indent=2, sort_keys=False)
    width = max(len(k) for k, _, _ in rows)
    lines = [f"{k.ljust(width)}  {json.dumps(v)}  # {src}" for k, v, src in rows]
    return "\n".join(lines)
