"""vLLM's command line inside a container: the ``--kv-transfer-config`` for our
connector and flag edits on exec-form ``command``/``args`` lists."""

from __future__ import annotations

import json

from pdsidecar.k8s.inject_options import CONTROL_TLS_DIR, InjectError, InjectOptions

__all__ = ["kv_transfer_config", "arg_list", "flag_value", "set_flag"]


def kv_transfer_config(options: InjectOptions) -> str:
    """The ``--kv-transfer-config`` JSON (the connector contract)."""
    cfg = {
        "kv_connector": "PdConnector",
        "kv_connector_module_path": "transfer.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "control_port": options.control_port,
            "protocol": options.protocol,
        },
    }
    if options.control_tls_secret:
        cfg["kv_connector_extra_config"]["control_tls_dir"] = CONTROL_TLS_DIR
    if options.auth_secret or options.control_tls_secret:  # refuse to run without them
        cfg["kv_connector_extra_config"]["require_control_auth"] = True
    return json.dumps(cfg, separators=(",", ":"))


def _strip_flag(args: list[str], flag: str, *, prefix_dotted: bool = False) -> tuple[list[str], int | None]:
    """Remove ``flag VALUE`` / ``flag=VALUE`` (and ``flag.x VALUE`` when
    prefix_dotted); return the new list and the index of the first removal."""
    out: list[str] = []
    first: int | None = None
    i = 0
    while i < len(args):
        a = args[i]
        dotted = prefix_dotted and a.startswith(flag + ".")
        if a == flag or (dotted and "=" not in a):
            first = len(out) if first is None else first
            i += 2
            continue
        if a.startswith(flag + "=") or (dotted and "=" in a):
            first = len(out) if first is None else first
            i += 1
            continue
        out.append(a)
        i += 1
    return out, first


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def set_flag(args: list[str], flag: str, value: str, *, prefix_dotted: bool = False) -> list[str]:
    args, pos = _strip_flag(args, flag, prefix_dotted=prefix_dotted)
    if pos is None:
        return args + [flag, value]
    return args[:pos] + [flag, value] + args[pos:]


_SHELLS = {"sh", "bash", "dash", "ash", "zsh", "/bin/sh", "/bin/bash", "/usr/bin/bash", "/usr/bin/env"}


def arg_list(c: dict) -> tuple[str, list[str]]:
    """Which list carries vLLM's flags: ``args`` (official image: entrypoint
    is ``vllm serve``) unless only ``command`` is set."""
    cmd = list(c.get("command") or [])
    args = list(c.get("args") or [])
    if cmd and cmd[0].rsplit("/", 1)[-1] in {s.rsplit("/", 1)[-1] for s in _SHELLS} and "-c" in (cmd + args):
        raise InjectError(
            f"container {c.get('name')!r} runs vLLM through a shell script; "
            "use exec-form command/args so flags can be injected"
        )
    if args or not cmd:
        return "args", args
    return "command", cmd
