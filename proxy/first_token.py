"""First token from the prefill leg (`--first-token-from-prefill`): the pure parts.

The prefill leg already samples the request's first token. For a streaming request the
decode sidecar can send that token to the client at once and let the decode engine
continue from it: a `/v1/completions` leg whose prompt is the prompt's token ids plus the
first token, `max_tokens - 1`, the prefill's `kv_transfer_params` plus
`pd_extra_tokens: 1` (PdConnector then reads only the prompt's KV and computes the first
token's). The ids are the local vLLM's tokenization, made while the prefill leg runs; the
prefill connector's `pd_prompt_sha256` says they are the tokens it computed, its
`pd_next_token_id` is the first token's id (the prefill answer carries no token ids).
This module decides whether a request may take that path (`skip_reason`, `first_token`),
builds the continuation body (`continuation_body`) and writes the
client's one stream (`StreamFormat`: one id/created/model, chat chunks converted from
completion chunks, usage counted as aggregated serving counts it). proxy.first_token_leg
runs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["FirstToken", "StreamFormat", "continuation_body", "first_token", "skip_reason",
           "SKIP_REASONS", "wanted"]

# why a streaming P/D request took the normal path although the option is on
SKIP_REASONS = ("request", "no_max_tokens", "no_token_ids", "tokens", "connector", "answer", "partial_char")

_COMMON_KEYS = frozenset((
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "repetition_penalty", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "n", "best_of", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "echo", "stop",
    "stop_token_ids", "user", "priority", "add_special_tokens"))
_KEYS = {"completions": _COMMON_KEYS | {"prompt"},
         "chat": _COMMON_KEYS | {"messages", "max_completion_tokens", "add_generation_prompt",
                                 "chat_template_kwargs"}}
# sampling keys the continuation leg carries over as the client sent them
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "ignore_eos",
                  "skip_special_tokens", "spaces_between_special_tokens", "user", "priority")


def wanted(mode: str, api: str, body: dict[str, Any]) -> bool:
    """Does the option apply to this request at all (mode on for its API, streaming)?"""
    return (mode == "all" or (mode == "completions" and api == "completions")) and body.get("stream") is True


def _empty(v: Any) -> bool:
    return v is None or v is False or v == "" or v == [] or v == 0


def limit_of(api: str, body: dict[str, Any]) -> int | None:
    """The client's output-token limit as vLLM reads it (completions: 16 when unset)."""
    if api == "chat":
        v = body.get("max_completion_tokens")
        return v if v is not None else body.get("max_tokens")
    v = body.get("max_tokens")
    return 16 if v is None else v


def skip_reason(api: str, body: dict[str, Any]) -> str | None:
    """Why this request cannot keep aggregated serving's output with the first token
    from the prefill leg (None: it can). Only an allowlisted set of fields, each with a
    value that cannot change the continuation's output."""
    if any(k not in _KEYS[api] for k in body):
        return "request"  # logit bias, guided output, tools, suffix, vllm_xargs, ...: unknown effect
    so = body.get("stream_options") or {}
    if any(k != "include_usage" for k in so):
        return "request"  # continuous usage stats would count the first token as prompt
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
        return "request"
    if not all(_empty(body.get(k)) for k in ("presence_penalty", "frequency_penalty", "logprobs",
                                             "top_logprobs", "echo", "stop", "stop_token_ids")):
        return "request"  # penalties/stop strings see the first token as prompt; logprobs; echo
    if body.get("seed") is not None and body.get("temperature") != 0:
        return "request"  # a seeded sampler would start its sequence again on the decode
    if api == "chat" and body.get("add_generation_prompt") not in (None, True):
        return "request"
    lim = limit_of(api, body)
    if lim is None:
        return "no_max_tokens"  # vLLM's default (context left) is not known here
    if type(lim) is not int or lim < 1:
        return "request"
    return None


@dataclass
class FirstToken:
    """The prefill answer's one token, as the client gets it."""

    token_id: int
    text: str
    finish_reason: str | None  # "length" (limit 1), "stop" (EOS / a stop token)
    stop_reason: Any
    created: int
    model: str
    prompt_tokens: int


def first_token(api: str, answer: dict[str, Any], limit: int, kv: dict[str, Any]) -> FirstToken | str:
    """The first token of a prefill answer: its id from the checked `kv` params
    (PdConnector's `pd_next_token_id`), its text from the answer (its finish: `stop` when
    the engine stopped on it, `length` when the client's `limit` is 1, else None), or a
    skip reason."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return "answer"
    ch = choices[0]
    token_id = kv.get("pd_next_token_id")
    if type(token_id) is not int or token_id < 0:
        return "no_token_ids"
    if api == "chat":
        msg = ch.get("message")
        if not isinstance(msg, dict) or msg.get("tool_calls") or msg.get("reasoning_content") or msg.get("reasoning"):
            return "answer"  # a server-side parser shaped the answer: not reproducible here
        text = msg.get("content") or ""
    else:
        text = ch.get("text")
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    pt, created, model = usage.get("prompt_tokens"), answer.get("created"), answer.get("model")
    if (not isinstance(text, str) or type(pt) is not int or type(created) is not int
            or not isinstance(model, str)):
        return "answer"
    if "\ufffd" in text:
        return "partial_char"  # a character split over tokens: the decode would not emit its rest
    # the leg's own limit is 1: "length" says nothing about the client's request
    fr = "stop" if ch.get("finish_reason") == "stop" else ("length" if limit == 1 else None)
    return FirstToken(token_id, text, fr, ch.get("stop_reason") if fr == "stop" else None, created, model, pt)


def continuation_body(api: str, body: dict[str, Any], prompt_ids: list[int], first: FirstToken,
                      kv_params: dict[str, Any] | None) -> dict[str, Any]:
    """The decode leg that continues after the first token: `/v1/completions`, prompt =
    prompt ids + first token, one token less to go; `kv_params` None: recompute."""
    b: dict[str, Any] = {k: body[k] for k in _SAMPLING_KEYS if k in body}
    b.update(model=body["model"], prompt=[*prompt_ids, first.token_id], stream=True,
             max_tokens=limit_of(api, body) - 1)
    if body.get("min_tokens"):
        b["min_tokens"] = body["min_tokens"] - 1
    if (body.get("stream_options") or {}).get("include_usage"):
        b["stream_options"] = {"include_usage": True}
    if kv_params is not None:
        b["kv_transfer_params"] = {**kv_params, "pd_extra_tokens": 1}
    return b


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class StreamFormat:
    """The client's stream: vLLM's chunk shapes for its API, one id/created/model."""

    def __init__(self, api: str, rid: str, first: FirstToken, include_usage: bool):
        self.api = api
        self.chat = api == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + rid
        self.created, self.model = first.created, first.model
        self.include_usage = include_usage
        self.first = first

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, stop_reason: Any = None,
                role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish,
                    "stop_reason": stop_reason}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text or ""}
        ch = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            ch["stop_reason"] = stop_reason
        return ch

    def opening(self) -> bytes:
        """What the client gets as soon as the prefill leg answered: chat's role chunk,
        then the first token (with its finish when it is the last one)."""
        f = self.first
        out = [_sse({**self._head(), "choices": [self._choice(None, None, role=True)]})] if self.chat else []
        if f.text or f.finish_reason is None or not self.chat:
            out.append(_sse({**self._head(), "choices": [self._choice(f.text, f.finish_reason,
                                                                      f.stop_reason)]}))
        elif self.chat:  # an empty last token (EOS): the finish chunk only
            out.append(_sse({**self._head(), "choices": [self._choice("", f.finish_reason, f.stop_reason)]}))
        return b"".join(out)

    def prefill_only_end(self) -> bytes:
        """The end of a stream the prefill leg's one token finished (limit 1, or EOS)."""
        out = b""
        if self.include_usage:
            pt = self.first.prompt_tokens
            out += _sse({**self._head(), "choices": [],
                         "usage": {"prompt_tokens": pt, "total_tokens": pt + 1, "completion_tokens": 1}})
        return out + DONE

    def convert(self, payload: bytes) -> bytes:
        """One `data:` payload of the continuation's completion stream, as the client's."""
        if payload.strip() == b"[DONE]":
            return DONE
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            return b""
        if not isinstance(obj, dict):
            return b""
        if "error" in obj:
            return _sse(obj)
        out: dict[str, Any] = self._head()
        choices = obj.get("choices")
        out["choices"] = []
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            c = choices[0]
            fr = c.get("finish_reason")
            if self.chat and not c.get("text") and fr is None:
                return b""  # vLLM's chat stream sends no empty deltas
            out["choices"] = [self._choice(c.get("text"), fr, c.get("stop_reason"))]
        if isinstance(obj.get("system_fingerprint"), str):
            out["system_fingerprint"] = obj["system_fingerprint"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            out["usage"] = self.usage(usage)
        elif "usage" in obj and not self.chat:
            out["usage"] = usage
        if not out["choices"] and "usage" not in out:
            return b""
        return _sse(out)

    @staticmethod
    def usage(u: dict[str, Any]) -> dict[str, Any]:
        """The continuation's usage as aggregated serving counts it: the first token is
        output, not prompt."""
        u = dict(u)
        if type(u.get("prompt_tokens")) is int and type(u.get("completion_tokens")) is int:
            u["prompt_tokens"] -= 1
            u["completion_tokens"] += 1
        return u


def error_event(message: str, code: str) -> bytes:
    """An OpenAI-style error event (the openai client raises APIError on it), then [DONE]."""
    return _sse({"error": {"message": message, "type": "server_error", "code": code}}) + DONE
