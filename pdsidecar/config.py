"""`pdsidecar run` configuration CLI: flags > environment > defaults, validated once.

`load_config(argv, environ)` returns a `SidecarConfig` (proxy.config, which also holds
the option table) or raises `ConfigError` (one line, meant for the user; `run_sidecar`
prints it and exits 2). `render_config` is what `pdsidecar run --print-config` prints
(secrets redacted, with where each value came from).

Environment contract (seed pattern 5 + ours): PREFILL_MODE, KV_TRANSFER_TARGET,
KV_TRANSFER_PROTOCOL, PDSIDECAR_* (see proxy.config.OPTIONS and docs/sidecar.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from typing import Any, Mapping, Sequence

from proxy.config import OPTIONS, OPTIONS_BY_NAME, SidecarConfig, parse_bool
from proxy.endpoints import HOSTNAME_RE, Endpoint

__all__ = ["ConfigError", "build_parser", "load_config", "render_config"]


class ConfigError(ValueError):
    """Invalid configuration; the message is one line for the user."""


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
                values["role"] = "prefill" if parse_bool(pm) else "decode"
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
        if not HOSTNAME_RE.match(cfg.host):
            raise ConfigError(f"--host {cfg.host!r} is not an address or host name") from None


def _shown(name: str, value: Any) -> Any:
    o = OPTIONS_BY_NAME.get(name)
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
