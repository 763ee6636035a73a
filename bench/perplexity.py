"""Perplexity the way llama.cpp's llama-perplexity computes it: the whole text tokenized without BOS,
split into non-overlapping windows of ctx tokens, each window evaluated from an empty cache, and only
the second half of each window scored (every scored token sees at least ctx/2 tokens of context)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..runtime.sampling import log_softmax


@dataclass
class PerplexityResult:
    ppl: float
    tokens_scored: int
    ctx: int
    windows: int
    nll_sum: float

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens_scored": self.tokens_scored, "ctx": self.ctx, "windows": self.windows}


def score_window(logits: np.ndarray, tokens: np.ndarray, first: int) -> tuple[float, int]:
    # logits (ctx, V) of one window, tokens (ctx,) -> (sum of -log p(tokens[j+1] | :j+1) for j >= first, count)
    lp = log_softmax(logits[first:-1])
    tgt = tokens[first + 1:]
    return float(-lp[np.arange(len(tgt)), tgt].sum()), len(tgt)


def windows(tokens: np.ndarray, ctx: int) -> list[np.ndarray]:
    n = len(tokens) // ctx
    return [tokens[i * ctx:(i + 1) * ctx] for i in range(n)]


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, ctx: int,
               max_windows: int | None = None, progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """`logits_fn(window) -> (ctx, V)` logits of a window evaluated from an empty cache."""
    if ctx < 4 or ctx % 2:
        raise ValueError(f"--ctx must be an even number >= 4 (got {ctx})")
    ws = windows(np.asarray(tokens, dtype=np.int64), ctx)
    if max_windows:
        ws = ws[:max_windows]
    if not ws:
        raise ValueError(f"the text has {len(tokens)} tokens: fewer than one window of ctx = {ctx}")
    nll, count = 0.0, 0
    for i, w in enumerate(ws):
        s, n = score_window(logits_fn(w), w, ctx // 2)
        nll += s
        count += n
        if progress:
            progress(i + 1, len(ws))
    return PerplexityResult(math.exp(nll / count), count, ctx, len(ws), nll)


def edgellm_perplexity(engine, text: str, ctx: int = 512, max_windows: int | None = None, progress=None):
    tokens = np.array(engine.tokenizer.encode(text, add_bos=False, parse_special=False), dtype=np.int64)
    cache = engine.new_cache(ctx)

    def logits_fn(w):
        cache.truncate(0)
        return engine.prefill(w, cache, logits="all")

    return perplexity(logits_fn, tokens, ctx, max_windows, progress)
