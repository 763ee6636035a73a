"""Samplers built from small pieces, applied in llama.cpp's default order:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw. temp = 0 is greedy."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels.ops import top_k_ids
from .errors import ArgumentError


@dataclass(frozen=True)
class SamplerSettings:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        if self.temp < 0:
            raise ArgumentError(f"temp must be >= 0 (got {self.temp})", "temp")
        if self.top_k < 0:
            raise ArgumentError(f"top_k must be >= 0 (got {self.top_k})", "top_k")
        if not 0 < self.top_p <= 1:
            raise ArgumentError(f"top_p must be in (0, 1] (got {self.top_p})", "top_p")
        if not 0 <= self.min_p <= 1:
            raise ArgumentError(f"min_p must be in [0, 1] (got {self.min_p})", "min_p")
        if self.repeat_penalty <= 0:
            raise ArgumentError(f"repeat_penalty must be > 0 (got {self.repeat_penalty})", "repeat_penalty")


def apply_repetition_penalty(logits: np.ndarray, history, penalty: float, last_n: int) -> np.ndarray:
    # logits (V,) -> (V,): divide positive / multiply negative logits of recently seen tokens (CTRL / llama.cpp)
    if penalty == 1.0 or not len(history) or last_n == 0:
        return logits
    ids = np.unique(np.asarray(history[-last_n:], dtype=np.int64))
    logits = logits.copy()
    sel = logits[ids]
    logits[ids] = np.where(sel > 0, sel / penalty, sel * penalty)
    return logits


def top_k_filter(ids: np.ndarray, logits: np.ndarray, k: int):
    # candidates (ids, logits) sorted by logit, descending -> the first k
    return (ids[:k], logits[:k]) if 0 < k < len(ids) else (ids, logits)


def top_p_filter(ids, logits, p: float):
    # keep the smallest prefix whose probability mass reaches p
    if p >= 1.0:
        return ids, logits
    probs = np.exp(logits - logits[0])
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), p)) + 1
    return ids[:keep], logits[:keep]


def min_p_filter(ids, logits, min_p: float):
    # keep tokens whose probability is at least min_p times the top token's
    if min_p <= 0:
        return ids, logits
    keep = logits >= logits[0] + np.log(min_p)
    return ids[keep], logits[keep]


class Sampler:
    def __init__(self, settings: SamplerSettings | None = None):
        self.s = settings or SamplerSettings()
        self.rng = np.random.default_rng(self.s.seed)

    def __call__(self, logits: np.ndarray, history=(), allowed: np.ndarray | None = None) -> int:
        """The next token. allowed: a (V,) bool mask from a constraint (runtime/constraints.py); tokens outside
        it get -inf after the repetition penalty, so no later step (top-k, top-p, min-p, temperature, greedy)
        can pick them."""
        s = self.s
        logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), history, s.repeat_penalty,
                                          s.repeat_last_n)
        if allowed is not None:
            return self._masked(logits, allowed)
        if s.temp == 0:
            return int(np.argmax(logits))
        if 0 < s.top_k < len(logits):  # the k largest, largest first (ties: the lower id first)
            ids = top_k_ids(np.ascontiguousarray(logits), s.top_k)
        else:
            ids = np.argsort(-logits, kind="stable")
        lg = logits[ids].astype(np.float64)
        ids, lg = top_p_filter(ids, lg, s.top_p)
        ids, lg = min_p_filter(ids, lg, s.min_p)
        lg = lg / s.temp
        p = np.exp(lg - lg.max())
        p /= p.sum()
        return int(ids[self.rng.choice(len(ids), p=p)])

    def _masked(self, logits: np.ndarray, allowed: np.ndarray) -> int:
        # logits (V,), allowed (V,) bool -> a token with allowed[token]
        if allowed.shape != logits.shape:
            raise ValueError(f"the mask has {allowed.shape[0]} entries for {logits.shape[0]} logits")
        if not allowed.any():
            raise ValueError("the mask allows no token")
        tok = self(np.where(allowed, logits, -np.inf))
        if not allowed[tok]:  # cannot happen: every step keeps the largest logits; checked all the same
            raise RuntimeError(f"the sampler picked token {tok} outside the mask")
        return tok


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
