"""Sidecar configuration: precedence, the env contract, validation, --print-config."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdsidecar.config import ConfigError, load_config, render_config
from pdsidecar.sidecar import run_sidecar
from proxy.endpoints import Endpoint, parse_endpoint

TOKEN = "config-test-token-0123456789"


def load(argv=(), **env):
    cfg, _ = load_config(list(argv), env)
    return cfg


def test_defaults_and_env_contract():
    cfg = load(PREFILL_MODE="false")
    assert cfg.role == "decode" and cfg.port == 8000 and cfg.vllm_url == "http://127.0.0.1:8200"
    assert cfg.metrics_port is None and cfg.fallback == "fallback" and cfg.protocol == "auto"
    cfg = load(PREFILL_MODE="true", KV_TRANSFER_TARGET="decode-service.default.svc.cluster.local:9000",
               KV_TRANSFER_PROTOCOL="rdma", PDSIDECAR_VLLM_URL="http://127.0.0.1:8300", PDSIDECAR_PORT="8001",
               PDSIDECAR_METRICS_PORT="9090", PDSIDECAR_AUTH_TOKEN=TOKEN,
               PDSIDECAR_ALLOWED_PEERS="10.0.0.0/8:8000,[fd00::1]:8000,decode.svc:*")
    assert cfg.role == "prefill" and cfg.protocol == "rdma" and cfg.port == 8001 and cfg.metrics_port == 9090
    assert cfg.targets == [Endpoint("decode-service.default.svc.cluster.local", 9000)]
    assert cfg.allowed_peers == [Endpoint("10.0.0.0/8", 8000), Endpoint("fd00::1", 8000), Endpoint("decode.svc", None)]
    assert cfg.auth_token == TOKEN and cfg.sources["auth_token"] == "env PDSIDECAR_AUTH_TOKEN"
    # prefill without an explicit allowlist: KV_TRANSFER_TARGET (the decode service) is the allowlist
    cfg = load(PREFILL_MODE="true", KV_TRANSFER_TARGET="d.svc:9000", PDSIDECAR_AUTH_TOKEN=TOKEN)
    assert cfg.allowed_peers == [Endpoint("d.svc", 9000)]
    # a comma list of targets
    cfg = load(PREFILL_MODE="false", KV_TRANSFER_TARGET="10.0.0.1:8000, 10.0.0.2:8000,p.svc:8000")
    assert [str(t) for t in cfg.targets] == ["10.0.0.1:8000", "10.0.0.2:8000", "p.svc:8000"]


def test_flags_beat_env_beat_defaults():
    env = dict(PREFILL_MODE="true", PDSIDECAR_PORT="8001", PDSIDECAR_FALLBACK="fail", PDSIDECAR_AUTH_TOKEN=TOKEN)
    cfg = load(["--role", "decode", "--port", "9001"], **env)
    assert cfg.role == "decode" and cfg.port == 9001 and cfg.fallback == "fail"
    assert cfg.sources["port"] == "flag --port" and cfg.sources["fallback"] == "env PDSIDECAR_FALLBACK"
    assert cfg.sources["drain_grace_s"] == "default"


@pytest.mark.parametrize("argv,env,needle", [
    ([], {}, "no role"),
    (["--role", "middle"], {}, "--role"),
    ([], {"PREFILL_MODE": "maybe"}, "PREFILL_MODE"),
    (["--role", "prefill"], {}, "PDSIDECAR_AUTH_TOKEN"),
    (["--role", "decode", "--port", "70000"], {}, "--port"),
    (["--role", "decode"], {"KV_TRANSFER_TARGET": "http://p:8000"}, "KV_TRANSFER_TARGET"),
    (["--role", "decode"], {"KV_TRANSFER_TARGET": "user@p:8000"}, "userinfo"),
    (["--role", "decode"], {"KV_TRANSFER_TARGET": "::1:8000"}, "IPv6"),
    (["--role", "decode"], {"KV_TRANSFER_PROTOCOL": "carrier-pigeon"}, "KV_TRANSFER_PROTOCOL"),
    (["--role", "decode"], {"PDSIDECAR_VLLM_URL": "http://u:p@127.0.0.1:8200"}, "credentials"),
    (["--role", "decode", "--prefill-timeout", "-1"], {}, "--prefill-timeout"),
    (["--role", "decode", "--fallback", "maybe"], {}, "--fallback"),
    (["--role", "decode", "--auth-token", "short"], {}, "at least 16"),
    (["--role", "decode", "--metrics-port", "8000"], {}, "--metrics-port"),
    (["--role", "decode", "--no-such-flag"], {}, "unrecognized"),
    (["--role", "decode", "--auth-token-file", "/nonexistent/token"], {}, "--auth-token-file"),
    (["--role", "decode", "--transfer-mode", "push"], {"KV_TRANSFER_TARGET": "p:8000"}, "--push-target"),
    (["--role", "decode", "--transfer-mode", "push", "--push-target", "d"],
     {"KV_TRANSFER_TARGET": "p:8000"}, "--push-target"),
    (["--role", "decode", "--transfer-mode", "push", "--push-target", "d:1,e"],
     {"KV_TRANSFER_TARGET": "p:8000"}, "--push-target"),
])
def test_invalid_config_is_one_clear_error(argv, env, needle, capsys, monkeypatch):
    for k in ("PREFILL_MODE", "KV_TRANSFER_TARGET", "PDSIDECAR_AUTH_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError) as ei:
        load_config(argv, env)
    assert needle in str(ei.value) and "\n" not in str(ei.value)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert run_sidecar(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdsidecar run: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_secret_never_shown(capsys, monkeypatch):
    with pytest.raises(ConfigError) as ei:
        load_config(["--role", "decode", "--auth-token", "tiny"], {})
    assert "tiny" not in str(ei.value)
    monkeypatch.setenv("PDSIDECAR_AUTH_TOKEN", TOKEN)
    assert run_sidecar(["--role", "prefill", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert TOKEN not in out and "<redacted>" in out and "env PDSIDECAR_AUTH_TOKEN" in out
    cfg = load(["--role", "prefill"], PDSIDECAR_AUTH_TOKEN=TOKEN)
    assert json.loads(render_config(cfg, "json"))["auth_token"] == "<redacted>"


def test_token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    cfg = load(["--role", "prefill", "--auth-token-file", str(f)])
    assert cfg.auth_token == TOKEN


def test_help_exits_zero(capsys):
    assert run_sidecar(["--help"]) == 0
    assert "--local-threshold-tokens" in capsys.readouterr().out


def test_endpoint_parser():
    assert parse_endpoint("10.0.0.1:80") == Endpoint("10.0.0.1", 80)
    assert parse_endpoint("[::FFFF:10.0.0.1]:80") == Endpoint("10.0.0.1", 80)
    assert parse_endpoint("[2001:DB8::1]:443").host == "2001:db8::1"
    assert parse_endpoint("Prefill-0.NS.svc:8000") == Endpoint("prefill-0.ns.svc", 8000)
    for bad in ("", "h", "h:", "h:0", "h:65536", "h:08", "h:80/x", "a@h:80", "h:80@evil", "http://h:80", "h:80?x",
                "h :80", "[::1]", "::1:80", "[zz]:80", "1.2.3:80", "h:-1", "h:+80", "h:80#f", "h%0a:80"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_endpoint_parser_never_accepts_urlish(s):
    try:
        ep = parse_endpoint(s)
    except ValueError:
        return
    assert not any(c in s for c in "@/?#\\ ") and ep.port is not None and 0 < ep.port < 65536
    assert parse_endpoint(str(ep)) == ep
