"""Request bodies: validation, token estimates and the two legs' bodies.

A client never sets transfer state: `parse_client_request` strips every key vLLM maps into
connector / engine transfer state (`TRANSFER_KEYS` at the top level, `XARGS_TRANSFER_KEYS`
inside `vllm_xargs`, which vLLM copies into `SamplingParams.extra_args`) and reports the
body as modified - so it is re-serialized, never forwarded raw - whenever such a key, or
any duplicate JSON key, was present at all.

`kv_transfer_params` from a prefill answer are checked by `proxy.answer` before the decode
leg gets them (plus vLLM's own `prompt_token_ids` reuse key for chat, set only from a
verified answer).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from .errors import RequestError

API_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens", "n", "best_of")


def loads_or_none(raw: bytes | str) -> Any:
    """Upstream payloads (vLLM's answers) as Python objects, None on bad or too-deep
    JSON. msgspec: a long prompt's answer carries its token ids, which json.loads
    parses ~3x slower (0.44 vs 0.16 ms for 8k ids), on the first token's path."""
    try:
        return msgspec.json.decode(raw)
    except (ValueError, RecursionError, TypeError):  # msgspec's DecodeError is a ValueError
        return None


def dumps_with_ids(body: dict[str, Any], key: str) -> bytes:
    """`json.dumps(body).encode()` where `body[key]` is a list of token ids: that list is
    encoded by msgspec (8k ids: 0.03 vs 0.4 ms), the rest by json as everywhere else (a
    client's NaN stays NaN for vLLM to refuse, msgspec would write null)."""
    ids = body.get(key)
    if not isinstance(ids, list) or not _all_ints(ids):
        return json.dumps(body).encode()
    rest = json.dumps({k: v for k, v in body.items() if k != key}).encode()
    head = b"{" + json.dumps(key).encode() + b": " + msgspec.json.encode(ids)
    return head + (b"}" if rest == b"{}" else b", " + rest[1:])


def _is_int(v: Any) -> bool:
    return type(v) is int


def _all_ints(items: list[Any]) -> bool:
    """Every item an int by type (True is no token id), in C: 8k ids in 0.1 ms."""
    return set(map(type, items)) <= {int}


def non_negative_ints(items: list[Any]) -> bool:
    """Every item a non-negative int (token or block ids), checked in C: a long
    prompt's ids are on the first token's path (8k ids: 0.2 ms, a generator 0.35-0.9)."""
    return _all_ints(items) and (not items or min(items) >= 0)


# keys vLLM (0.26-0.34) turns into connector / engine transfer state: top level
# (`to_sampling_params` copies them into extra_args) and inside `vllm_xargs` (copied into
# extra_args as they are; `Request` reads kv_transfer_params, ec_transfer_params and
# kv_cache_report_mode from there)
TRANSFER_KEYS = ("kv_transfer_params", "ec_transfer_params")
XARGS_TRANSFER_KEYS = (*TRANSFER_KEYS, "kv_cache_report_mode")


class _Pairs:
    """json object_pairs_hook that notes whether any object had a key twice."""

    def __init__(self):
        self.duplicates = False

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            self.duplicates = True
        return d


def strip_transfer_fields(body: dict[str, Any]) -> bool:
    """Remove client-set transfer fields (top level and in `vllm_xargs`); True if any was there."""
    found = False
    for k in TRANSFER_KEYS:
        if k in body:
            del body[k]
            found = True
    xa = body.get("vllm_xargs")
    if isinstance(xa, dict):
        for k in XARGS_TRANSFER_KEYS:
            if k in xa:
                found = True
                xa = {kk: v for kk, v in xa.items() if kk != k}
        if found:
            body["vllm_xargs"] = xa
    return found


def parse_request(api: str, raw: bytes) -> dict[str, Any]:
    """Parse, sanity-check and strip a client body (see `parse_client_request`)."""
    return parse_client_request(api, raw)[0]


def parse_client_request(api: str, raw: bytes) -> tuple[dict[str, Any], bool]:
    """(body, modified): the parsed, checked client body without transfer fields, and
    whether it must be re-serialized (a transfer field or a duplicate key was there).
    RequestError(400) when it is not usable."""
    pairs = _Pairs()
    try:
        body = json.loads(raw, object_pairs_hook=pairs)
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply", "invalid_json") from None
    except (ValueError, UnicodeDecodeError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, f"request body is not valid JSON: {e.__class__.__name__}", "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "`model` is required and must be a non-empty string", "missing_model", param="model")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise RequestError(400, "`stream` must be a boolean", "invalid_type", param="stream")
    for f in _INT_FIELDS:
        v = body.get(f)
        if v is not None and not _is_int(v):
            raise RequestError(400, f"`{f}` must be an integer", "invalid_type", param=f)
        if _is_int(v) and v < 0:
            raise RequestError(400, f"`{f}` must be >= 0", "invalid_value", param=f)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise RequestError(400, "`stream_options` must be an object", "invalid_type", param="stream_options")
    if api == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise RequestError(400, "`messages` must be a non-empty list of objects", "invalid_type", param="messages")
    else:
        p = body.get("prompt")
        ok = isinstance(p, str) or (
            isinstance(p, list) and p and (
                all(isinstance(x, str) for x in p)
                or all(_is_int(x) for x in p)
                or all(isinstance(x, list) and all(_is_int(y) for y in x) for x in p)))
        if not ok and body.get("prompt_embeds") is None:
            raise RequestError(400, "`prompt` must be a string, a list of strings or a list of token ids",
                               "invalid_type", param="prompt")
    # Never forward a client's own transfer fields: they name remote hosts the connector
    # would connect to (SSRF through the KV transport) or blocks it would free.
    modified = strip_transfer_fields(body) or pairs.duplicates
    return body, modified


def sanitize_unsigned_leg(raw: bytes) -> bytes:
    """A prefill leg nobody signed (`--allow-unauthenticated`): its own
    `kv_transfer_params` stay if they are an object (the leg's contract), every other
    transfer field goes; re-serialized when anything was removed or a key was doubled."""
    pairs = _Pairs()
    try:
        body = json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError, TypeError):
        raise RequestError(400, "request body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_body")
    kv = body.pop("kv_transfer_params", None)
    removed = strip_transfer_fields(body)  # ec_transfer_params, the vllm_xargs keys
    if isinstance(kv, dict):
        body["kv_transfer_params"] = kv
    modified = removed or pairs.duplicates or (kv is not None and not isinstance(kv, dict))
    return json.dumps(body).encode() if modified else raw


def _text_len(content: Any) -> tuple[int, bool]:
    """(characters of text, only text?) of a chat message content."""
    if content is None:
        return 0, True
    if isinstance(content, str):
        return len(content), True
    if isinstance(content, list):
        n, text_only = 0, True
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text") and isinstance(part.get("text"), str):
                n += len(part["text"])
            else:
                text_only = False
        return n, text_only
    return len(str(content)), False


def estimate_tokens(api: str, body: dict[str, Any], chars_per_token: float) -> int:
    """A cheap upper-bound-ish token count (no tokenizer)."""
    if api == "chat":
        chars = 0
        msgs = body.get("messages") or []
        for m in msgs:
            n, _ = _text_len(m.get("content"))
            chars += n
        tools = body.get("tools")
        if tools:
            chars += len(json.dumps(tools))
        return int(chars / chars_per_token) + 4 * len(msgs)
    p = body.get("prompt")
    if isinstance(p, str):
        return int(len(p) / chars_per_token)
    if isinstance(p, list) and p:
        if _is_int(p[0]):
            return len(p)
        if isinstance(p[0], str):
            return int(sum(len(x) for x in p) / chars_per_token)
        if isinstance(p[0], list):
            return sum(len(x) for x in p)
    return 0


def unsupported_for_disagg(api: str, body: dict[str, Any]) -> str | None:
    """Why this request must run aggregated (None when it can be disaggregated)."""
    if (body.get("n") or 1) > 1 or (body.get("best_of") or 1) > 1:
        return "n>1"
    if body.get("use_beam_search"):
        return "beam search"
    if api == "completions":
        p = body.get("prompt")
        if isinstance(p, list) and p and not _is_int(p[0]) and len(p) > 1:
            return "batched prompts"
        if body.get("prompt_embeds") is not None:
            return "prompt embeds"
    return None


def reuse_eligible(api: str, body: dict[str, Any], mode: str) -> bool:
    """May the decode leg get the prefill leg's prompt token ids instead of text?

    Only where the decode response is the same: a single text prompt, no echo, no prompt
    logprobs, no truncation (completions); text-only messages, no echo (chat, vLLM's own
    `kv_transfer_params.prompt_token_ids` reuse).
    """
    if mode == "off" or (mode == "completions" and api != "completions"):
        return False
    if body.get("echo") or body.get("prompt_logprobs") is not None:
        return False
    if api == "completions":
        return (isinstance(body.get("prompt"), str) and body.get("truncate_prompt_tokens") is None
                and body.get("suffix") is None)
    for m in body.get("messages") or []:
        _, text_only = _text_len(m.get("content"))
        if not text_only:
            return False
    return True


def prefill_body(api: str, body: dict[str, Any], want_ids: bool) -> dict[str, Any]:
    """The prefill leg: non-streaming, every token limit 1, asks for remote decode."""
    b = dict(body)
    b["stream"] = False
    b.pop("stream_options", None)
    b.pop("prompt_logprobs", None)
    b["max_tokens"] = 1
    if api == "chat" or "max_completion_tokens" in b:
        b["max_completion_tokens"] = 1
    if b.get("min_tokens") is not None:
        b["min_tokens"] = 1
    if b.get("echo"):
        b["echo"] = False
    b["kv_transfer_params"] = {"do_remote_decode": True}
    if want_ids:
        b["return_token_ids"] = True
    return b


def prompt_ids_from_prefill(api: str, resp: dict[str, Any]) -> list[int] | None:
    """The prompt's token ids in a prefill response made with return_token_ids."""
    ids = None
    if api == "chat":
        ids = resp.get("prompt_token_ids")
    else:
        choices = resp.get("choices")
        if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict):
            ids = choices[0].get("prompt_token_ids")
    if isinstance(ids, list) and ids and non_negative_ints(ids):
        return ids
    return None


def decode_body(api: str, body: dict[str, Any], kv_params: dict[str, Any], ids: list[int] | None) -> dict[str, Any]:
    """The decode leg: the client's body plus the prefill leg's kv_transfer_params."""
    b = dict(body)
    kv = dict(kv_params)
    if ids is not None:
        if api == "completions":
            b["prompt"] = ids
        else:
            kv["prompt_token_ids"] = ids
    b["kv_transfer_params"] = kv
    return b


def release_body(api: str, body: dict[str, Any], kv_params: dict[str, Any]) -> dict[str, Any]:
    """A one-token, non-streaming decode leg whose only purpose is to let the connector
    pull (and so free) KV the prefill engine holds for a request whose client left."""
    b = decode_body(api, body, kv_params, None)
    b["stream"] = False
    b.pop("stream_options", None)
    b["max_tokens"] = 1
    if api == "chat":
        b["max_completion_tokens"] = 1
    b.pop("min_tokens", None)
    return b
