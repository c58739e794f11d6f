"""The sidecar's configuration: `SidecarConfig` and the table of its options.

Each `Option` names its field, flag, environment variables, default, converter and help;
`pdsidecar.config` turns the table into the CLI (flags > environment > defaults,
validation, `--print-config`). The proxy reads only `SidecarConfig`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from .endpoints import Endpoint, parse_endpoint, parse_endpoint_list

__all__ = ["OPTIONS", "OPTIONS_BY_NAME", "Option", "SidecarConfig", "parse_bool"]

ROLES = ("prefill", "decode")
PROTOCOLS = ("rdma", "ipc", "tcp", "auto")
FALLBACK_POLICIES = ("fallback", "fail")
TOKEN_ESTIMATORS = ("chars", "tokenize")
REUSE_MODES = ("off", "completions", "all")
FIRST_TOKEN_MODES = ("off", "completions", "all")
FIRST_TOKEN_ID_SOURCES = ("local", "prefill")
TRANSFER_MODES = ("pull", "push")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_bool(s: str) -> bool:
    """true/false, 1/0, yes/no, on/off (ValueError otherwise)."""
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
    Option("peer_source_check", "--peer-source-check", ("PDSIDECAR_PEER_SOURCE_CHECK",), True, parse_bool,
           "prefill: require the socket peer address to match the claimed peer host (off behind a mesh proxy)"),
    Option("allow_unauthenticated", "--allow-unauthenticated", ("PDSIDECAR_ALLOW_UNAUTHENTICATED",), False, parse_bool,
           "prefill: accept prefill legs without token and allowlist (development only)", is_bool_flag=True),
    Option("forward_authorization", "--forward-authorization", ("PDSIDECAR_FORWARD_AUTHORIZATION",), False, parse_bool,
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
    Option("first_token_from_prefill", "--first-token-from-prefill", ("PDSIDECAR_FIRST_TOKEN_FROM_PREFILL",), "off",
           _choice(FIRST_TOKEN_MODES),
           "decode, streaming, PdConnector: send the prefill leg's token at once, the decode engine "
           "continues from it (off|completions|all; needs --auth-token; see docs/sidecar.md)"),
    Option("first_token_ids", "--first-token-ids", ("PDSIDECAR_FIRST_TOKEN_IDS",), "local",
           _choice(FIRST_TOKEN_ID_SOURCES),
           "decode, --first-token-from-prefill: the continuation's prompt token ids from the local "
           "vLLM's /tokenize while the prefill leg runs (local) or from the prefill answer (prefill: "
           "return_token_ids; for engines sharing a host's CPUs, or a vLLM without /tokenize)"),
    Option("transfer_mode", "--transfer-mode", ("PDSIDECAR_TRANSFER_MODE",), "pull", _choice(TRANSFER_MODES),
           "pull (decode leg after prefill) or push (both legs at once; connector must support it)"),
    Option("push_target", "--push-target", ("PDSIDECAR_PUSH_TARGET",), None, _endpoints,
           "decode, push mode: host:port of the local engine's KV control plane (PdConnector "
           "control_port), sent to the prefill engine as the push destination; a comma list "
           "for a data-parallel decode engine, one per DP rank in rank order (each request "
           "goes to one rank: X-data-parallel-rank on the decode leg, that rank's address "
           "as push_target)"),
    Option("peer_stats_interval_s", "--peer-stats-interval", ("PDSIDECAR_PEER_STATS_INTERVAL",), 2.0,
           _nonneg_float, "decode: poll prefill peers' /pd/v1/stats every N s (0 = off)"),
    Option("dns_refresh_s", "--dns-refresh", ("PDSIDECAR_DNS_REFRESH",), 10.0, _pos_float,
           "decode: re-resolve KV_TRANSFER_TARGET names every N s"),
    Option("log_level", "--log-level", ("PDSIDECAR_LOG_LEVEL",), "info", _choice(LOG_LEVELS), "log level"),
    Option("log_format", "--log-format", ("PDSIDECAR_LOG_FORMAT",), "json", _choice(LOG_FORMATS),
           "json (one object per line) or text"),
    Option("otel", "--otel", ("PDSIDECAR_OTEL",), False, parse_bool,
           "emit OpenTelemetry spans (if opentelemetry is importable)", is_bool_flag=True),
]

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


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
    first_token_from_prefill: str = "off"
    first_token_ids: str = "local"
    transfer_mode: str = "pull"
    push_target: list[Endpoint] | None = None
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
