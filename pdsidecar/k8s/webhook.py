"""Mutating admission webhook: sidecar injection at pod creation.

Pods annotated ``pdsidecar.io/role: prefill|decode`` get the same injection as
``pdsidecar inject`` (see :mod:`pdsidecar.k8s.inject`), returned as an RFC 6902
JSON Patch in an ``admission.k8s.io/v1`` AdmissionReview response.

* Pods without the annotation (or with ``pdsidecar.io/inject: "false"``),
  other resources and non-CREATE operations pass through: ``allowed: true``,
  no patch.
* Injection errors (bad role value, no vLLM container, ...) are denied with
  a reason when ``failure_mode == "closed"``; with ``"open"`` the pod is
  admitted unchanged and the reason is returned as an admission warning.
* A malformed review (not JSON, not an AdmissionReview v1, no uid, no
  object) is answered with HTTP 400 and a reason. The handler never answers
  500.

``build_app(options)`` returns the aiohttp application (``POST /mutate``,
``GET /healthz``, ``GET /readyz``); ``run_webhook(argv)`` is the
``pdsidecar webhook`` command line (TLS is mandatory: the API server only
calls webhooks over HTTPS).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import logging
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

from aiohttp import web

from pdsidecar.k8s.inject import add_inject_arguments, inject, options_from_args
from pdsidecar.k8s.inject_options import ROLE_KEY, ROLES, InjectError, InjectOptions

__all__ = ["WebhookOptions", "make_patch", "review", "build_app", "run_webhook", "MalformedReview"]

log = logging.getLogger("pdsidecar.k8s.webhook")

REVIEW_API = "admission.k8s.io/v1"
OPT_OUT_KEY = "pdsidecar.io/inject"
MAX_BODY = 16 * 1024 * 1024
OPTIONS_KEY: web.AppKey = web.AppKey("pdsidecar_webhook_options")


@dataclass
class WebhookOptions:
    inject: InjectOptions = field(default_factory=InjectOptions)
    failure_mode: str = "closed"  # closed | open
    host: str = "0.0.0.0"
    port: int = 8443
    cert_file: str | None = None
    key_file: str | None = None


class MalformedReview(Exception):
    """The request is not a usable AdmissionReview (answered with HTTP 400)."""


# --------------------------------------------------------------------------- #
# RFC 6902 diff


def _esc(token: Any) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def _same(a: Any, b: Any) -> bool:
    # JSON equality: True != 1, 1 == 1.0 is fine either way for our documents.
    return type(a) is type(b) and a == b


def make_patch(src: Any, dst: Any, path: str = "") -> list[dict]:
    """A JSON Patch (list of operations) that turns ``src`` into ``dst``.

    Objects are diffed key by key; arrays element by element over the common
    prefix, then extra elements are added at the end or removed from the end
    (highest index first, so indices stay valid while applying)."""
    ops: list[dict] = []
    if isinstance(src, dict) and isinstance(dst, dict):
        for k in src:
            if k not in dst:
                ops.append({"op": "remove", "path": f"{path}/{_esc(k)}"})
        for k, v in dst.items():
            p = f"{path}/{_esc(k)}"
            if k not in src:
                ops.append({"op": "add", "path": p, "value": copy.deepcopy(v)})
            else:
                ops.extend(make_patch(src[k], v, p))
        return ops
    if isinstance(src, list) and isinstance(dst, list):
        n = min(len(src), len(dst))
        for i in range(n):
            ops.extend(make_patch(src[i], dst[i], f"{path}/{i}"))
        for i in range(n, len(dst)):
            ops.append({"op": "add", "path": f"{path}/{i}", "value": copy.deepcopy(dst[i])})
        for i in range(len(src) - 1, n - 1, -1):
            ops.append({"op": "remove", "path": f"{path}/{i}"})
        return ops
    if not _same(src, dst):
        ops.append({"op": "replace", "path": path, "value": copy.deepcopy(dst)})
    return ops


# --------------------------------------------------------------------------- #
# admission logic (pure; the HTTP layer only serialises)


def _response(uid: str, allowed: bool, **extra: Any) -> dict:
    resp: dict[str, Any] = {"uid": uid, "allowed": allowed}
    resp.update({k: v for k, v in extra.items() if v is not None})
    return {"apiVersion": REVIEW_API, "kind": "AdmissionReview", "response": resp}


def review(body: Any, options: WebhookOptions) -> dict:
    """Answer one AdmissionReview (already JSON-decoded). Raises
    :class:`MalformedReview` for requests that are not an AdmissionReview."""
    if not isinstance(body, dict):
        raise MalformedReview("body is not a JSON object")
    if body.get("kind") != "AdmissionReview":
        raise MalformedReview(f"kind is {body.get('kind')!r}, expected 'AdmissionReview'")
    if body.get("apiVersion") != REVIEW_API:
        raise MalformedReview(f"apiVersion is {body.get('apiVersion')!r}, expected {REVIEW_API!r}")
    req = body.get("request")
    if not isinstance(req, dict):
        raise MalformedReview("no request in AdmissionReview")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("request.uid missing")

    kind = req.get("kind") or {}
    resource = req.get("resource") or {}
    is_pod = (isinstance(kind, dict) and kind.get("kind") == "Pod" and kind.get("group", "") == "") or (
        isinstance(resource, dict) and resource.get("resource") == "pods" and resource.get("group", "") == ""
    )
    if not is_pod or req.get("subResource"):
        return _response(uid, True)
    if req.get("operation") != "CREATE":
        return _response(uid, True)
    pod = req.get("object")
    if not isinstance(pod, dict):
        raise MalformedReview("request.object is not a Pod object")
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    ann = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
    role = ann.get(ROLE_KEY)
    if role is None or str(ann.get(OPT_OUT_KEY, "")).lower() in ("false", "disabled", "off", "0"):
        return _response(uid, True)

    name = meta.get("name") or meta.get("generateName") or "?"
    try:
        if role not in ROLES:
            raise InjectError(f"annotation {ROLE_KEY}={role!r}: expected prefill or decode")
        pod.setdefault("kind", "Pod")
        pod.setdefault("apiVersion", "v1")
        injected = inject(pod, role, options.inject)
    except Exception as e:  # InjectError, or a bug: apply the failure mode
        reason = str(e) if isinstance(e, InjectError) else f"internal error: {type(e).__name__}: {e}"
        msg = f"pdsidecar: cannot inject pod {name}: {reason}"
        if not isinstance(e, InjectError):
            log.exception("injection failed for pod %s", name)
        if options.failure_mode == "open":
            log.warning("%s (failure mode open: admitted unchanged)", msg)
            return _response(uid, True, warnings=[msg])
        code = 400 if isinstance(e, InjectError) else 500
        return _response(uid, False, status={"code": code, "reason": "BadRequest" if code == 400 else "InternalError", "message": msg})

    original = req["object"]
    ops = make_patch(original, injected)
    if not ops:
        return _response(uid, True)
    patch = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
    log.info("injected %s sidecar into pod %s (%d patch ops)", role, name, len(ops))
    return _response(uid, True, patchType="JSONPatch", patch=patch)


# --------------------------------------------------------------------------- #
# HTTP


def _bad_request(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=400)


def build_app(options: WebhookOptions | None = None) -> web.Application:
    options = options or WebhookOptions()

    async def mutate(request: web.Request) -> web.Response:
        try:
            raw = await request.read()
        except web.HTTPException:
            raise
        except Exception as e:  # connection trouble while reading
            return _bad_request(f"cannot read body: {type(e).__name__}")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _bad_request("body is not valid JSON")
        try:
            # Injection works on the original object; keep it pristine for the diff.
            result = review(copy.deepcopy(body), options) if isinstance(body, dict) else review(body, options)
        except MalformedReview as e:
            return _bad_request(f"malformed AdmissionReview: {e}")
        except Exception as e:  # never a 500
            log.exception("unexpected error in review")
            uid = ((body.get("request") or {}).get("uid") if isinstance(body, dict) else None) or ""
            allowed = options.failure_mode == "open"
            return web.json_response(
                _response(uid, allowed, status=None if allowed else {"code": 500, "message": f"pdsidecar: internal error: {type(e).__name__}"})
            )
        return web.json_response(result)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY)
    app[OPTIONS_KEY] = options
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
    return app


def ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def build_parser(prog: str = "pdsidecar webhook") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Mutating admission webhook that injects the pdsidecar P/D sidecar.")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--tls-cert", required=True, help="PEM certificate (chain) file")
    p.add_argument("--tls-key", required=True, help="PEM private key file")
    p.add_argument("--failure-mode", choices=["closed", "open"], default="closed",
                   help="closed: deny pods that cannot be injected; open: admit them unchanged with a warning")
    p.add_argument("--log-level", default="INFO")
    add_inject_arguments(p)
    return p


def options_from_argv(argv: Iterable[str] | None = None) -> WebhookOptions:
    ns = build_parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=getattr(logging, str(ns.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return WebhookOptions(inject=options_from_args(ns), failure_mode=ns.failure_mode, host=ns.host,
                          port=ns.port, cert_file=ns.tls_cert, key_file=ns.tls_key)


def run_webhook(argv: Iterable[str] | None = None) -> int:
    """``pdsidecar webhook``: serve until interrupted; returns the exit code."""
    try:
        opts = options_from_argv(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        ctx = ssl_context(opts.cert_file, opts.key_file)
    except (OSError, ssl.SSLError) as e:
        sys.stderr.write(f"pdsidecar webhook: error: cannot load TLS certificate/key: {e}\n")
        return 1
    web.run_app(build_app(opts), host=opts.host, port=opts.port, ssl_context=ctx, print=None,
                access_log=None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_webhook())
