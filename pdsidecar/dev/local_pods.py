"""``pdsidecar local --pods``: the ``pdsidecar local`` stack, each role in its own pod.

The prefill and decode pods run what ``deploy/overlays/dev-cpu`` renders (engine and
sidecar containers, env, ports, connector config) in private network namespaces
(:mod:`pdsidecar.dev.pods`); the client talks to the decode pod's IP from the node side
of the pods' bridge, and the output names the pod IPs the KV moved between.
"""

from __future__ import annotations

import argparse
import signal
import time

from pdsidecar.errors import CliError
from pdsidecar.dev.local import CHAT_MESSAGE, COMPLETION_PROMPT, KvFigures, SidecarClient, _print_answer

ENGINE_PORT = "vllm-http"


def kv_figures(cluster, pod) -> KvFigures:
    """KV totals from the decode engine's /metrics (read inside its pod, like its sidecar)."""
    from prometheus_client.parser import text_string_to_metric_families

    port = pod.engine.ports[ENGINE_PORT]
    text = cluster.get(f"http://127.0.0.1:{port}/metrics", ns=pod.ns)
    values: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    return KvFigures(values.get("pd_connector_bytes_transferred_total", 0.0),
                     values.get("pd_connector_transfer_seconds_sum", 0.0),
                     values.get("pd_connector_transfer_seconds_count", 0.0))


def aggregated(cluster, pod, model: str, prompt: str, max_tokens: int, timeout: float) -> str:
    """The prefill engine's own answer without kv_transfer_params (the reference)."""
    port = pod.engine.ports[ENGINE_PORT]
    status, _, body = cluster.post_json(f"http://127.0.0.1:{port}/v1/completions",
                                        {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                         "temperature": 0}, timeout=timeout, ns=pod.ns)
    if status != 200:
        raise CliError(f"the prefill engine answered {status}: {body}")
    return body["choices"][0]["text"]


def served_model(pod) -> str:
    argv = pod.engine.argv
    return argv[argv.index("--served-model-name") + 1] if "--served-model-name" in argv else argv[argv.index("serve") + 1]


def run_local_pods(args: argparse.Namespace) -> int:
    from pdsidecar.dev import netns

    why = netns.can_create()
    if why:
        raise CliError(why)
    if args.model or args.connector not in ("auto", "ours"):
        raise CliError("--pods runs deploy/overlays/dev-cpu as rendered (its tiny Mixtral, PdConnector): "
                       "drop --model/--connector, or drop --pods")
    from pdsidecar.dev.pods import DEV_CPU, PodCluster, PodError
    from pdsidecar.dev.podspec import PodSpecError

    max_tokens = 8 if args.short else args.max_tokens
    # SIGTERM ends like Ctrl-C: the finally blocks stop the pods and delete the namespaces
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with PodCluster(DEV_CPU, log_dir=args.log_dir, startup_timeout_s=args.startup_timeout) as cluster:
            print(f"pdsidecar local --pods: {DEV_CPU.relative_to(DEV_CPU.parents[2])} rendered; pod network "
                  f"{netns.SUBNET}.0/24 in namespace {cluster.outer} (logs: {cluster.log_dir})", flush=True)
            print("starting pods pd-prefill-0 and pd-decode-0 ...", flush=True)
            prefill, decode = cluster.start_many(["prefill", "decode"])
            print(f"prefill pod {prefill.ip} (engine cores {sorted(prefill.cpus or [])}), "
                  f"decode pod {decode.ip} (engine cores {sorted(decode.cpus or [])})")
            model = served_model(decode)
            url = decode.url("http")
            client = SidecarClient(url, model, args.request_timeout)
            print(f"client -> decode sidecar {url} (from the node side of the pod bridge)")
            before = kv_figures(cluster, decode)
            with cluster.client_ns():
                a = client.completion(COMPLETION_PROMPT, max_tokens)
            mid = kv_figures(cluster, decode)
            ref = aggregated(cluster, prefill, model, COMPLETION_PROMPT, max_tokens, args.request_timeout)
            _print_answer("completion", a, mid - before, ref)
            with cluster.client_ns():
                b = client.chat(CHAT_MESSAGE, max_tokens)
            after = kv_figures(cluster, decode)
            _print_answer("chat, streaming", b, after - mid)
            moved = after - before
            if moved.bytes > 0:
                print(f"KV moved across pods: {int(moved.bytes)} bytes from prefill pod {prefill.ip} "
                      f"to decode pod {decode.ip} ({int(moved.transfers)} transfer(s))")
            else:
                print(f"KV moved across pods: none (decode pod {decode.ip} reported no transfer)")
            ok = a.text == ref and moved.bytes > 0
            if args.keep:
                print(f"\npods are up; the client side is namespace {cluster.outer}:\n"
                      f"  ip netns exec {cluster.outer} curl -s {url}/v1/completions -H 'Content-Type: "
                      f"application/json' -d '{{\"model\": \"{model}\", \"prompt\": \"hello\", \"max_tokens\": 8}}'\n"
                      "Ctrl-C stops them")
                while True:
                    time.sleep(3600)
            return 0 if ok else 1
    except (PodError, PodSpecError, netns.NetnsError) as e:
        raise CliError(str(e)) from None
