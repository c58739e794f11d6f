"""Workload for ``pdbench e2e``: length distributions, random prompts, arrivals.

Every configuration gets the same requests (same prompts, same lengths, same arrival
times), drawn from ``--seed``. Prompts are random words from the model's own vocabulary,
each word one token, so a prompt of N words is N prompt tokens and no two prompts share a
KV block (prefix caching stays on in every engine but never hits).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A bad command-line value: printed as one line, exit status 2."""


# ------------------------------------------------------------------ distributions
@dataclass(frozen=True)
class Dist:
    """``fixed:N`` or ``uniform:A-B`` (inclusive), integers >= 1."""

    kind: str
    lo: int
    hi: int

    def sample(self, rng: random.Random) -> int:
        return self.lo if self.kind == "fixed" else rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return f"fixed:{self.lo}" if self.kind == "fixed" else f"uniform:{self.lo}-{self.hi}"


_FIXED = re.compile(r"^fixed:(\d+)$")
_UNIFORM = re.compile(r"^uniform:(\d+)-(\d+)$")


def parse_dist(spec: str) -> Dist:
    s = str(spec).strip()
    m = _FIXED.match(s)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise UsageError(f"bad distribution {spec!r}: N must be >= 1")
        return Dist("fixed", n, n)
    m = _UNIFORM.match(s)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if a < 1 or b < a:
            raise UsageError(f"bad distribution {spec!r}: need 1 <= A <= B in uniform:A-B")
        return Dist("uniform", a, b)
    raise UsageError(f"bad distribution {spec!r}: use fixed:N or uniform:A-B (token counts)")


# ------------------------------------------------------------------ vocabulary
class Vocabulary:
    """Whole-word tokens of a model's tokenizer: a prompt of N of them is N tokens."""

    def __init__(self, words: list[str], tokenizer: Any = None):
        if len(words) < 8:
            raise UsageError("the model's tokenizer has fewer than 8 whole-word tokens: cannot make random prompts")
        self.words = words
        self.tokenizer = tokenizer

    @classmethod
    def from_model(cls, model_dir: str | Path) -> "Vocabulary":
        path = Path(model_dir) / "tokenizer.json"
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UsageError("package 'tokenizers' is missing: pip install 'pdsidecar[models]'") from None
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise UsageError(f"cannot read tokenizer {path}: {e}") from None
        words = []
        for piece in sorted(tok.get_vocab()):
            w = piece[1:] if piece[:1] in ("\u2581", "\u0120") else None
            if not w or not w.isalpha() or not w.isascii():
                continue
            if len(tok.encode(w, add_special_tokens=False).ids) == 1:
                words.append(w)
        return cls(words, tok)

    def count(self, text: str) -> int | None:
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def prompt(self, n: int, rng: random.Random) -> str:
        return " ".join(rng.choice(self.words) for _ in range(n))


# ------------------------------------------------------------------ requests
@dataclass
class RequestSpec:
    index: int
    cls: str                    # "short" | "long" | "file" | "sweep"
    prompt: str
    prompt_tokens: int          # target (what we built); the server's count is recorded too
    max_tokens: int
    arrival_s: float = 0.0      # offset from start (rate mode)


@dataclass
class Workload:
    """Requests drawn deterministically by index, so every configuration sees the same ones."""

    seed: int
    prompt_len: Dist
    output_len: Dist
    long_prompt_len: Dist | None
    long_output_len: Dist
    long_fraction: float
    vocab: Vocabulary | None
    file_items: list[dict[str, Any]] | None = None
    _cache: dict[int, RequestSpec] = field(default_factory=dict)

    def request(self, i: int) -> RequestSpec:
        r = self._cache.get(i)
        if r is not None:
            return r
        rng = random.Random(self.seed * 1_000_003 + i)
        if self.file_items is not None:
            item = self.file_items[i % len(self.file_items)]
            # a repeated file prompt (i >= len) gets a random prefix so caching cannot flatter it
            prefix = "" if i < len(self.file_items) or self.vocab is None else self.vocab.prompt(16, rng) + " "
            prompt = prefix + item["prompt"]
            n = (self.vocab.count(prompt) if self.vocab else None) or max(1, len(prompt.split()))
            r = RequestSpec(i, "file", prompt, n, item.get("max_tokens") or self.output_len.sample(rng))
        else:
            long = self.long_prompt_len is not None and rng.random() < self.long_fraction
            plen = (self.long_prompt_len if long else self.prompt_len).sample(rng)
            olen = (self.long_output_len if long else self.output_len).sample(rng)
            assert self.vocab is not None
            r = RequestSpec(i, "long" if long else "short", self.vocab.prompt(plen, rng), plen, olen)
        self._cache[i] = r
        return r

    def max_total_tokens(self) -> int:
        if self.file_items is not None:
            return 0
        p = max(self.prompt_len.hi, self.long_prompt_len.hi if self.long_prompt_len else 0)
        o = max(self.output_len.hi, self.long_output_len.hi if self.long_prompt_len else 0)
        return p + o

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"seed": self.seed}
        if self.file_items is not None:
            d["prompts_file_items"] = len(self.file_items)
            d["output_len_default"] = str(self.output_len)
        else:
            d.update(prompt_len=str(self.prompt_len), output_len=str(self.output_len))
            if self.long_prompt_len is not None and self.long_fraction > 0:
                d.update(long_prompt_len=str(self.long_prompt_len), long_output_len=str(self.long_output_len),
                         long_fraction=self.long_fraction)
        d["prompts"] = "random whole-word tokens of the model's vocabulary (prefix caching on, never hits)"
        return d


def sweep_request(vocab: Vocabulary, index: int, tokens: int, max_tokens: int, seed: int) -> RequestSpec:
    rng = random.Random(seed * 7_919 + 1_000_000 + index)
    return RequestSpec(index, "sweep", vocab.prompt(tokens, rng), tokens, max_tokens)


def load_prompts(path: str) -> list[dict[str, Any]]:
    """JSONL: one object per line with ``prompt`` (text) and optional ``max_tokens``."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {path} is not UTF-8 text") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise UsageError(f"prompt file {path} line {n}: not JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise UsageError(f"prompt file {path} line {n}: need an object with a non-empty string \"prompt\"")
        mt = obj.get("max_tokens")
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
            raise UsageError(f"prompt file {path} line {n}: \"max_tokens\" must be an integer >= 1")
        items.append({"prompt": obj["prompt"], "max_tokens": mt})
    if not items:
        raise UsageError(f"prompt file {path} has no prompts")
    return items


def poisson_arrivals(rate: float, seed: int, n: int | None, duration: float | None) -> list[float]:
    """Arrival offsets (s) of a Poisson process at `rate` req/s: `n` of them, or those before `duration`."""
    rng = random.Random(seed * 31 + 7)
    out: list[float] = []
    t = 0.0
    while True:
        if n is not None and len(out) >= n:
            break
        if duration is not None and n is None and t >= duration:
            break
        out.append(t)
        t += rng.expovariate(rate)
    if duration is not None:
        out = [a for a in out if a < duration]
    return out
