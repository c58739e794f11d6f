"""The rendered dev-cpu overlay runs as network-namespace pods and really disaggregates
across them (root; CI runs as root). One prefill and one decode pod for the module."""

from __future__ import annotations

import os
import shutil

import pytest

from pdsidecar.dev import netns

ROOT_REASON = netns.can_create()
pytestmark = [
    pytest.mark.engines,
    pytest.mark.skipif(ROOT_REASON is not None, reason=f"pod tests: {ROOT_REASON}"),
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed"),
]

PROMPT = "the prefill engine computes the cache and the decode engine writes the story of"
CHAT = "Tell me about the river, the mountain and the forest."


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, llama_dir):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from pdsidecar.dev.pods import PodCluster

    # llama_dir: the tiny model the pods' init container finds in the shared cache
    with PodCluster(model_cache=os.path.dirname(llama_dir),
                    log_dir=tmp_path_factory.mktemp("pod-logs")) as c:
        c.start_many(["prefill", "decode"])
        yield c


def _metrics(cluster, url: str, ns: str | None = None) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple, float] = {}
    for fam in text_string_to_metric_families(cluster.get(url + "/metrics", ns=ns)):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def test_pods_disaggregate_across_pods(cluster):
    from openai import OpenAI

    from pdsidecar.dev.local_pods import aggregated, served_model

    p, d = cluster.pods["prefill"], cluster.pods["decode"]
    assert p.ip != d.ip and not p.ip.startswith("127.")
    # the engines advertise their pod IPs (status.podIP), not loopback
    assert p.engine.env["PD_CONTROL_HOST"] == p.ip and d.engine.env["PD_CONTROL_HOST"] == d.ip
    model = served_model(d)
    engine_port = d.engine.ports["vllm-http"]
    eng_before = _metrics(cluster, f"http://127.0.0.1:{engine_port}", ns=d.ns)
    side_before = _metrics(cluster, d.url("metrics"))

    with cluster.client_ns():
        c = OpenAI(base_url=d.url("http") + "/v1", api_key="pods", timeout=120, max_retries=0)
        raw = c.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        comp = raw.parse().choices[0].text
        comp_path = raw.headers["x-pd-path"]
        sraw = c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": CHAT}], max_tokens=12, temperature=0, stream=True)
        chat = "".join((ch.choices[0].delta.content or "") for ch in sraw.parse() if ch.choices)
        chat_path = sraw.headers["x-pd-path"]

    assert (comp_path, chat_path) == ("disagg", "disagg")
    assert comp == aggregated(cluster, p, model, PROMPT, 12, 120)
    pport = p.engine.ports["vllm-http"]
    _, _, ref_chat = cluster.post_json(f"http://127.0.0.1:{pport}/v1/chat/completions",
                                       {"model": model, "messages": [{"role": "user", "content": CHAT}],
                                        "max_tokens": 12, "temperature": 0}, ns=p.ns)
    assert chat == ref_chat["choices"][0]["message"]["content"]

    eng = _metrics(cluster, f"http://127.0.0.1:{engine_port}", ns=d.ns)
    moved = _sum(eng, "pd_connector_bytes_transferred_total") - _sum(eng_before, "pd_connector_bytes_transferred_total")
    assert moved > 0
    assert _sum(eng, "pd_connector_failures_total") == _sum(eng_before, "pd_connector_failures_total") == 0

    side = _metrics(cluster, d.url("metrics"))

    def delta(name: str, **labels) -> float:
        return _sum(side, name, **labels) - _sum(side_before, name, **labels)

    assert delta("pd_requests_total", role="decode", path="disagg") == 2
    assert delta("pd_requests_total", role="decode") == 2
    assert _sum(side, "pd_kv_load_failures_total") == 0
    assert delta("pd_kv_transferred_bytes_total") > 0  # the non-streaming answer's pd_transfer


def test_engine_without_pod_ip_refuses_to_start(cluster):
    """The same manifests with PD_CONTROL_HOST removed: the prefill engine would
    advertise 127.0.0.1 to decode engines in other pods; it refuses to start instead."""
    from pdsidecar.dev.podspec import drop_env
    from pdsidecar.dev.pods import PodError

    docs = drop_env(cluster.docs, "prefill", "vllm", "PD_CONTROL_HOST")
    with pytest.raises(PodError, match="refusing to advertise loopback control address"):
        cluster.restart("prefill", docs)
    assert "prefill" not in cluster.pods  # nothing half-started is left
