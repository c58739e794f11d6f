"""Admission webhook: real HTTPS on 127.0.0.1 with a self-signed certificate."""

from __future__ import annotations

import base64
import copy
import json
import ssl
from pathlib import Path

import pytest
import yaml

jsonpatch = pytest.importorskip("jsonpatch")
pytest.importorskip("cryptography")

from aiohttp import ClientSession, TCPConnector, web  # noqa: E402

from pdsidecar.k8s.certs import make_self_signed  # noqa: E402
from pdsidecar.k8s.inject import inject  # noqa: E402
from pdsidecar.k8s.inject_options import InjectOptions  # noqa: E402
from pdsidecar.k8s.webhook import WebhookOptions, build_app, make_patch, ssl_context  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"


def _pod(role: str | None = "decode", **labels) -> dict:
    pod = yaml.safe_load((GOLDEN / "pod.input.yaml").read_text())
    if role is not None:
        pod["metadata"].setdefault("annotations", {})["pdsidecar.io/role"] = role
    pod["metadata"].setdefault("labels", {}).update(labels)
    return pod


def _review(obj, *, uid="705ab4f5-6393-11e8-b7cc-42010a800002", op="CREATE", kind="Pod", resource="pods") -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "namespace": "default",
            "operation": op,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }


class Server:
    def __init__(self, opts: WebhookOptions, tmp: Path):
        cert, key = make_self_signed(["localhost"], ip_addresses=["127.0.0.1"])
        (tmp / "tls.crt").write_bytes(cert)
        (tmp / "tls.key").write_bytes(key)
        self.server_ctx = ssl_context(str(tmp / "tls.crt"), str(tmp / "tls.key"))
        self.client_ctx = ssl.create_default_context(cafile=str(tmp / "tls.crt"))
        self.opts = opts

    async def __aenter__(self):
        self.runner = web.AppRunner(build_app(self.opts), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.server_ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.session = ClientSession(connector=TCPConnector(ssl=self.client_ctx))
        self.url = f"https://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc):
        await self.session.close()
        await self.runner.cleanup()

    async def post(self, body, *, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.session.post(self.url + "/mutate", data=data, headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            return r.status, (json.loads(text) if r.content_type == "application/json" else text)


@pytest.fixture
def closed(tmp_path):
    return Server(WebhookOptions(inject=InjectOptions(), failure_mode="closed"), tmp_path)


@pytest.fixture
def open_(tmp_path):
    return Server(WebhookOptions(inject=InjectOptions(), failure_mode="open"), tmp_path)


def _apply(obj, resp):
    assert resp["response"]["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["response"]["patch"]))
    return jsonpatch.JsonPatch(ops).apply(copy.deepcopy(obj))


@pytest.mark.parametrize("role", ["prefill", "decode"])
async def test_annotated_pod_is_injected(closed, role):
    pod = _pod(role)
    async with closed as s:
        status, resp = await s.post(_review(pod))
        assert status == 200
        assert resp["apiVersion"] == "admission.k8s.io/v1" and resp["kind"] == "AdmissionReview"
        assert resp["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
        assert resp["response"]["allowed"] is True
        patched = _apply(pod, resp)
    assert patched == inject(pod, role, InjectOptions())
    sidecar = patched["spec"]["initContainers"][-1]
    assert sidecar["name"] == "pdsidecar" and sidecar["restartPolicy"] == "Always"
    assert {"name": "PREFILL_MODE", "value": "true" if role == "prefill" else "false"} in sidecar["env"]


async def test_already_injected_pod_gets_no_patch(closed):
    pod = inject(_pod("decode"), "decode", InjectOptions())
    async with closed as s:
        status, resp = await s.post(_review(pod))
    assert status == 200 and resp["response"]["allowed"] is True
    assert "patch" not in resp["response"]


async def test_lws_worker_pod_gets_connector_but_no_sidecar(closed):
    pod = _pod("prefill", **{"leaderworkerset.sigs.k8s.io/worker-index": "3"})
    async with closed as s:
        status, resp = await s.post(_review(pod))
    patched = _apply(pod, resp)
    assert "initContainers" not in patched["spec"]
    args = patched["spec"]["containers"][0]["args"]
    assert json.loads(args[args.index("--kv-transfer-config") + 1])["kv_connector"] == "PdConnector"


@pytest.mark.parametrize("case", ["no-annotation", "opt-out", "update", "other-kind", "subresource"])
async def test_pass_through(closed, case):
    pod = _pod(None if case == "no-annotation" else "decode")
    review = _review(pod)
    if case == "opt-out":
        pod["metadata"]["annotations"]["pdsidecar.io/inject"] = "false"
    elif case == "update":
        review = _review(pod, op="UPDATE")
    elif case == "other-kind":
        review = _review({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, kind="ConfigMap", resource="configmaps")
    elif case == "subresource":
        review["request"]["subResource"] = "status"
    async with closed as s:
        status, resp = await s.post(review)
    assert status == 200
    assert resp["response"] == {"uid": review["request"]["uid"], "allowed": True}


@pytest.mark.parametrize("bad", ["role", "no-vllm"])
async def test_injection_error_closed_denies(closed, bad):
    pod = _pod("decoder" if bad == "role" else "decode")
    if bad == "no-vllm":
        pod["spec"]["containers"] = [{"name": "app", "image": "nginx:1.27"}]
    async with closed as s:
        status, resp = await s.post(_review(pod))
    assert status == 200
    r = resp["response"]
    assert r["allowed"] is False and "patch" not in r
    assert r["status"]["code"] == 400
    assert ("decoder" in r["status"]["message"]) if bad == "role" else ("no vLLM container" in r["status"]["message"])


async def test_injection_error_open_admits_with_warning(open_):
    pod = _pod("decode")
    pod["spec"]["containers"] = [{"name": "app", "image": "nginx:1.27"}]
    async with open_ as s:
        status, resp = await s.post(_review(pod))
    assert status == 200
    r = resp["response"]
    assert r["allowed"] is True and "patch" not in r
    assert "no vLLM container" in r["warnings"][0]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b"\xff\xfe",
        json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {"uid": "x"}}).encode(),
        json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}).encode(),
        json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"kind": {"kind": "Pod"}}}).encode(),
        json.dumps(_review("a string, not a pod")).encode(),
        json.dumps({"kind": "Pod"}).encode(),
    ],
)
async def test_malformed_review_is_400(closed, raw):
    async with closed as s:
        status, body = await s.post(None, raw=raw)
    assert status == 400
    assert "error" in body and body["error"]


async def test_weird_pods_never_500(closed, open_):
    weird = [
        {"metadata": {"annotations": {"pdsidecar.io/role": "decode"}}},  # no spec
        {"metadata": {"annotations": {"pdsidecar.io/role": "decode"}}, "spec": {"containers": "x"}},
        {"metadata": {"annotations": {"pdsidecar.io/role": "decode"}}, "spec": {"containers": [{"name": "vllm", "image": "vllm", "args": [1, 2]}]}},
        {"metadata": {"annotations": {"pdsidecar.io/role": "decode"}}, "spec": {"containers": [None]}},
        {"metadata": {"annotations": {"pdsidecar.io/role": ["x"]}}, "spec": {}},
        {"metadata": "nope"},
    ]
    for server in (closed, open_):
        async with server as s:
            for w in weird:
                status, resp = await s.post(_review(w))
                assert status == 200, (w, resp)
                assert resp["response"]["allowed"] is (server is open_ or "pdsidecar.io/role" not in json.dumps(w))


async def test_healthz(closed):
    async with closed as s:
        async with s.session.get(s.url + "/healthz") as r:
            assert r.status == 200


@pytest.mark.parametrize(
    "a,b",
    [
        ({"a": 1}, {"a": 1}),
        ({"a": 1, "b": [1, 2, 3]}, {"a": True, "b": [1], "c/d~e": {"x": None}}),
        ([1, 2], [0, 1, 2, 3]),
        ({"l": [{"x": 1}, {"y": 2}]}, {"l": [{"y": 2}]}),
        ({"x": 1}, [1]),
        ({"x": 1.0}, {"x": 1}),
    ],
)
def test_make_patch_roundtrip(a, b):
    ops = make_patch(a, b)
    assert jsonpatch.JsonPatch(ops).apply(copy.deepcopy(a)) == b
    if json.dumps(a) == json.dumps(b):
        assert ops == []


def test_webhook_cert_command(tmp_path, capsys):
    from cryptography import x509

    from pdsidecar.k8s.certs import run_webhook_cert

    assert run_webhook_cert(["--namespace", "pd", "--out-dir", str(tmp_path)]) == 0
    ca = base64.b64decode(capsys.readouterr().out.strip())
    assert ca == (tmp_path / "tls.crt").read_bytes()
    cert = x509.load_pem_x509_certificate(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "pdsidecar-webhook.pd.svc" in sans
    assert (tmp_path / "tls.key").stat().st_mode & 0o077 == 0


def test_run_webhook_bad_cert_is_one_line_error(capsys):
    from pdsidecar.k8s.webhook import run_webhook

    assert run_webhook(["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pdsidecar webhook: error:") and err.count("\n") == 1
