"""The fast paths for token-id lists in leg bodies and prefill answers (proxy.body):
the same bytes' meaning as json, the same refusals."""

from __future__ import annotations

import json
import math

import pytest

from proxy.body import dumps_with_ids, loads_or_none, prompt_ids_from_prefill


@pytest.mark.parametrize("body", [
    {"model": "m", "prompt": list(range(8064)), "stream": True, "kv_transfer_params": {"a": [1, 2]}},
    {"prompt": [0]},
    {"model": "m", "prompt": [], "user": "é\u2028\"x"},
    {"model": "m", "prompt": "text, not ids"},
    {"model": "m", "prompt": [1, True, 3]},      # True is no token id: json writes it as it was
    {"model": "m", "prompt": [1, 2.0]},
    {"model": "m"},
])
def test_dumps_with_ids_means_what_json_dumps_means(body):
    assert json.loads(dumps_with_ids(body, "prompt")) == json.loads(json.dumps(body))


def test_dumps_with_ids_keeps_a_clients_nan_for_vllm_to_refuse():
    out = json.loads(dumps_with_ids({"model": "m", "prompt": [1], "temperature": float("nan")}, "prompt"))
    assert math.isnan(out["temperature"]) and out["prompt"] == [1]


def test_loads_or_none_refuses_what_it_cannot_parse():
    assert loads_or_none(b'{"a": [1, 2]}') == {"a": [1, 2]}
    assert loads_or_none("[1]") == [1]
    for bad in (b"", b"{", b"[1] x", b"[NaN]", b"[1e400]", b"\xff", b"[" * 100_000 + b"]" * 100_000):
        assert loads_or_none(bad) is None


@pytest.mark.parametrize("ids, ok", [
    ([1, 2, 3], True), ([0], True), ([], False), ([1, -1], False), ([1, True], False),
    ([1, 2.0], False), ([1, "2"], False), ([1, None], False), ("123", False), (None, False),
])
def test_prompt_ids_only_non_negative_ints(ids, ok):
    got = prompt_ids_from_prefill("completions", {"choices": [{"prompt_token_ids": ids}]})
    assert got == (ids if ok else None)
    assert prompt_ids_from_prefill("chat", {"prompt_token_ids": ids}) == (ids if ok else None)
