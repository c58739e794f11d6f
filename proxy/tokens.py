"""Decode role: how many prompt tokens a request has, for the local-threshold decision and
the per-peer pending-token counts.

`--token-estimator chars` divides the prompt's characters by `--chars-per-token`
(proxy.body.estimate_tokens, free); `tokenize` asks the local vLLM's `/tokenize` and
falls back to chars when that fails (for good once vLLM answers 404).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from .body import estimate_tokens

__all__ = ["TokenEstimator"]


class TokenEstimator:
    def __init__(self, sc):
        self.sc = sc
        self._tokenize_ok = True

    def chars(self, api: str, body: dict) -> int:
        return estimate_tokens(api, body, self.sc.cfg.chars_per_token)

    async def count(self, api: str, body: dict) -> int:
        """The configured estimator's count."""
        cfg = self.sc.cfg
        if cfg.token_estimator == "tokenize" and self._tokenize_ok:
            payload: dict[str, Any] = {"model": body["model"]}
            if api == "chat":
                payload["messages"] = body["messages"]
            elif isinstance(body.get("prompt"), str):
                payload["prompt"] = body["prompt"]
            else:
                return self.chars(api, body)
            try:
                async with self.sc.upstreams.get(cfg.vllm_url).post(
                        cfg.vllm_url + "/tokenize", json=payload, allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=2, sock_connect=cfg.connect_timeout_s)) as r:
                    if r.status == 200:
                        data = await r.json()
                        if isinstance(data.get("count"), int):
                            return data["count"]
                    elif r.status == 404:
                        self._tokenize_ok = False
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, RecursionError, AttributeError):
                pass
        return self.chars(api, body)
