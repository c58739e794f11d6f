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
def cluster(tmp_path_factory, mixtral_dir):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from pdsidecar.dev.pods import PodCluster

    # mixtral_dir: the tiny model the pods' init container finds in the shared cache
    with PodCluster(model_cache=os.path.dirname(mixtral_dir),
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


SLOW = pytest.mark.skipif(not os.environ.get("PDSIDECAR_SLOW"), reason="slow fault scenario: PDSIDECAR_SLOW=1")


def _complete(cluster, d, model: str, n: int = 8) -> tuple[int, str | None, str, dict]:
    st, h, body = cluster.post_json(d.url("http") + "/v1/completions",
                                    {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0}, timeout=120)
    return st, h.get("x-pd-path"), (body.get("choices") or [{}])[0].get("text"), body.get("kv_transfer_params") or {}


def _signed_leg(cluster, claim: str, from_ns: str, model: str) -> int:
    """A prefill leg signed with the real token, claiming ``claim`` as its identity."""
    import json
    import urllib.error
    import urllib.request
    import uuid

    from proxy import auth

    p = cluster.pods["prefill"]
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 1,
                       "kv_transfer_params": {"do_remote_decode": True}}).encode()
    rid = uuid.uuid4().hex
    h = {**auth.sign(cluster.token, claim, rid, "/v1/completions", body), "x-request-id": rid,
         "content-type": "application/json"}
    with netns.entered(from_ns):
        try:
            with urllib.request.urlopen(urllib.request.Request(p.url("http") + "/v1/completions", data=body,
                                                               headers=h), timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def test_attacker_pod_refused_by_source_check_and_allowlist(cluster):
    """A third pod with another IP and the stolen token: claiming the decode sidecar's
    identity fails --peer-source-check, claiming its own fails the allowlist (the
    decode Service); the decode pod itself is accepted."""
    from pdsidecar.dev.local_pods import served_model

    p, d = cluster.pods["prefill"], cluster.pods["decode"]
    model = served_model(d)
    attacker = cluster.net.add_pod("attacker")
    try:
        before = _metrics(cluster, p.url("metrics"))
        assert _signed_leg(cluster, f"{d.ip}:8000", attacker.ns, model) == 403
        assert _signed_leg(cluster, f"{attacker.ip}:8000", attacker.ns, model) == 403
        assert _signed_leg(cluster, f"{d.ip}:8000", d.ns, model) == 200
        after = _metrics(cluster, p.url("metrics"))
        for reason in ("source_mismatch", "peer_not_allowed"):
            assert _sum(after, "pd_auth_failures_total", reason=reason) - _sum(
                before, "pd_auth_failures_total", reason=reason) == 1
    finally:
        cluster.net.remove_pod("attacker")


@SLOW
def test_prefill_link_down_falls_back_then_disaggregates(cluster):
    from pdsidecar.dev.local_pods import aggregated, served_model

    p, d = cluster.pods["prefill"], cluster.pods["decode"]
    model = served_model(d)
    ref = aggregated(cluster, p, model, PROMPT, 8, 120)
    cluster.net.set_link("prefill", False)
    try:
        st, path, text, _ = _complete(cluster, d, model)
        assert (st, path, text) == (200, "fallback", ref)
    finally:
        cluster.net.set_link("prefill", True)
    st, path, text, kv = _complete(cluster, d, model)
    assert (st, path, text) == (200, "disagg", ref)


@SLOW
def test_link_down_between_prefill_and_read_recomputes_and_frees(cluster):
    """The prefill pod's cable is pulled after it answered the prefill leg, before the
    decode engine READs: the load fails, the decode engine recomputes (same answer), and
    once the link is back the prefill engine holds no blocks (lease)."""
    import json
    import time
    import urllib.request
    import uuid

    from pdsidecar.dev.local_pods import aggregated, served_model
    from proxy import auth

    p, d = cluster.pods["prefill"], cluster.pods["decode"]
    model = served_model(d)
    ref = aggregated(cluster, p, model, PROMPT, 8, 120)
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 1,
                       "kv_transfer_params": {"do_remote_decode": True}}).encode()
    rid = uuid.uuid4().hex
    h = {**auth.sign(cluster.token, f"{d.ip}:8000", rid, "/v1/completions", body), "x-request-id": rid,
         "content-type": "application/json"}
    with netns.entered(d.ns), urllib.request.urlopen(
            urllib.request.Request(p.url("http") + "/v1/completions", data=body, headers=h), timeout=60) as r:
        kvp = json.loads(r.read())["kv_transfer_params"]
    assert kvp["remote_host"] == p.ip
    port = d.engine.ports["vllm-http"]
    cluster.net.set_link("prefill", False)
    try:
        st, _, out = cluster.post_json(f"http://127.0.0.1:{port}/v1/completions",
                                       {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                        "kv_transfer_params": kvp}, timeout=120, ns=d.ns)
    finally:
        cluster.net.set_link("prefill", True)
    assert st == 200 and out["choices"][0]["text"] == ref
    assert out["kv_transfer_params"]["pd_transfer"]["error"]  # the answer says the load failed
    pport = p.engine.ports["vllm-http"]
    deadline = time.monotonic() + 60  # the prefill lease (30 s) frees unread blocks
    while time.monotonic() < deadline:
        pending = _sum(_metrics(cluster, f"http://127.0.0.1:{pport}", ns=p.ns), "pd_connector_blocks_pending_pickup")
        if pending == 0:
            break
        time.sleep(1)
    assert pending == 0


@SLOW
def test_prefill_restarted_with_new_ip(cluster):
    """The prefill pod comes back with another IP: the decode sidecar's DNS refresh and
    the decode engine's handshake follow it."""
    import time

    from pdsidecar.dev.local_pods import aggregated, served_model

    old = cluster.pods["prefill"].ip
    p = cluster.restart("prefill")
    d = cluster.pods["decode"]
    assert p.ip != old
    model = served_model(d)
    ref = aggregated(cluster, p, model, PROMPT, 8, 120)
    deadline = time.monotonic() + 60  # the sidecar re-resolves every --dns-refresh (10 s)
    while time.monotonic() < deadline:
        st, path, text, kv = _complete(cluster, d, model)
        assert st == 200 and text == ref  # never lost: fallback until the new IP is known
        if path == "disagg":
            break
        time.sleep(1)
    assert path == "disagg" and kv["pd_transfer"]["error"] == "" and kv["pd_transfer"]["bytes"] > 0


def test_engine_without_pod_ip_refuses_to_start(cluster):
    """The same manifests with PD_CONTROL_HOST removed: the prefill engine would
    advertise 127.0.0.1 to decode engines in other pods; it refuses to start instead."""
    from pdsidecar.dev.podspec import drop_env
    from pdsidecar.dev.pods import PodError

    docs = drop_env(cluster.docs, "prefill", "vllm", "PD_CONTROL_HOST")
    with pytest.raises(PodError) as e:
        cluster.restart("prefill", docs)
    first = str(e.value).splitlines()[0]  # the one line an operator sees first
    assert "first error: " in first
    assert "PdConnector: refusing to advertise loopback control address '127.0.0.1'" in first
    assert "prefill" not in cluster.pods  # nothing half-started is left
