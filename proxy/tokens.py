"""Decode role: a request's prompt tokens - how many (the local-threshold decision, the
per-peer pending-token counts) and which (the first token from the prefill leg).

`--token-estimator chars` divides the prompt's characters by `--chars-per-token`
(proxy.body.estimate_tokens, free); `tokenize` asks the local vLLM's `/tokenize` and
falls back to chars when that fails (for good once vLLM answers 404). `prompt_ids` asks
the local vLLM for the ids themselves, with `prompt_digest` of them: the prefill
connector's `pd_prompt_sha256` says whether the prefill computed the same tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import msgspec

from .body import estimate_tokens, non_negative_ints

__all__ = ["TokenEstimator", "prompt_digest", "tokenize_payload"]

TOKENIZE_TIMEOUT_S = 5.0  # one /tokenize call to the local vLLM for the prompt's ids
COUNT_TIMEOUT_S = 2.0  # one for the local-threshold count (chars when it fails)
# chat fields that shape the templated prompt, passed to /tokenize as the client sent them
_CHAT_TEMPLATE_KEYS = ("add_generation_prompt", "continue_final_message", "add_special_tokens",
                       "chat_template", "chat_template_kwargs", "tools")


def prompt_digest(token_ids: list[int]) -> str:
    """SHA-256 (hex) of token ids as a compact JSON array (`[1,2,3]`): PdConnector's
    `pd_prompt_sha256` of the tokens its KV holds."""
    return hashlib.sha256(msgspec.json.encode(token_ids)).hexdigest()


def tokenize_payload(api: str, body: dict) -> dict[str, Any] | None:
    """The local vLLM's `/tokenize` body for this request's prompt (None: not text)."""
    payload: dict[str, Any] = {"model": body["model"]}
    if api == "chat":
        payload["messages"] = body["messages"]
        payload.update((k, body[k]) for k in _CHAT_TEMPLATE_KEYS if body.get(k) is not None)
    elif isinstance(body.get("prompt"), str):
        payload["prompt"] = body["prompt"]
        if body.get("add_special_tokens") is not None:
            payload["add_special_tokens"] = body["add_special_tokens"]
    else:
        return None
    return payload


class TokenEstimator:
    def __init__(self, sc):
        self.sc = sc
        self._tokenize_ok = True

    def chars(self, api: str, body: dict) -> int:
        return estimate_tokens(api, body, self.sc.cfg.chars_per_token)

    async def count(self, api: str, body: dict) -> int:
        """The configured estimator's count."""
        if self.sc.cfg.token_estimator == "tokenize" and self._tokenize_ok:
            payload = tokenize_payload(api, body)
            data = None if payload is None else await self._tokenize(payload, COUNT_TIMEOUT_S)
            if data is not None and isinstance(data.get("count"), int):
                return data["count"]
        return self.chars(api, body)

    @property
    def can_tokenize(self) -> bool:
        """False once the local vLLM answered 404 to /tokenize."""
        return self._tokenize_ok

    async def prompt_ids(self, api: str, body: dict) -> tuple[list[int], str] | None:
        """The prompt's token ids as the local vLLM makes them, and their digest (None
        when it cannot say: not text, an error, a timeout)."""
        payload = tokenize_payload(api, body)
        data = None if payload is None else await self._tokenize(payload, TOKENIZE_TIMEOUT_S)
        ids = None if data is None else data.get("tokens")
        if not isinstance(ids, list) or not ids or not non_negative_ints(ids):
            return None
        return ids, prompt_digest(ids)

    async def _tokenize(self, payload: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The local vLLM's /tokenize answer (None: an error, a timeout, not an object; a
        404 turns `can_tokenize` off for good)."""
        cfg = self.sc.cfg
        try:
            async with self.sc.upstreams.get(cfg.vllm_url).post(
                    cfg.vllm_url + "/tokenize", data=msgspec.json.encode(payload),
                    headers={"Content-Type": "application/json"}, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=cfg.connect_timeout_s)) as r:
                if r.status == 404:
                    self._tokenize_ok = False  # no /tokenize here: not asked again
                if r.status != 200:
                    return None
                data = msgspec.json.decode(await r.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, msgspec.DecodeError):
            return None
        return data if isinstance(data, dict) else None
