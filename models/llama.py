"""Llama (Llama-2/3.x, SmolLM2, ...): tensor names and the decoder block, composed from kernels.

Weights are looked up by their GGUF names. The runtime hands the model a `WeightSource`
(see `runtime/weights.py`) that returns quantized matrices (`.matmul(X)`, `.embed(ids)`) and
float32 vectors, already checked against the shapes named here.
"""
from __future__ import annotations

import numpy as np
from gguf import MODEL_TENSOR as T, TENSOR_NAMES

from ..kernels import ops
from .cache_spec import CacheSpec
from .config import ModelConfig


def attend(li: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, seqs: list, scale) -> np.ndarray:
    """q (N, H, hd), k/v (N, Hkv, hd) of the new tokens of each sequence in `seqs` = [(cache, n_new)]: append k/v
    to each cache and attend causally over it -> (N, H, hd). The cache runs the attention (dense or delta, on its
    own storage: f32 or compressed; see runtime/kv_cache.py)."""
    att = np.empty_like(q)
    r = 0
    for cache, n in seqs:
        cache.store(li, k[r:r + n], v[r:r + n])
        cache.attend(li, q[r:r + n], scale, att[r:r + n])
        r += n
    return att


def swiglu_ffn(x: np.ndarray, L: dict, h: np.ndarray, n_ff: int, eps: float) -> None:
    """x += down(silu(gate(n)) * up(n)), n = rmsnorm(x) (into the buffer h): the Llama feed-forward, in place."""
    N = x.shape[0]
    ops.rmsnorm(x, L["ffn_norm"], eps, h)
    gu = L["gate_up"].matmul(h)  # (N, 2 n_ff)
    act = ops.swiglu(gu[:, :n_ff], gu[:, n_ff:], np.empty((N, n_ff), dtype=np.float32))
    x += L["down"].matmul(act)


def output_logits(model, x: np.ndarray, seqs: list, logits: str) -> np.ndarray:
    """The end of every forward: advance each cache by its new tokens, keep the last row of each sequence unless
    logits == "all", final norm and output head -> logits."""
    for cache, n in seqs:
        cache.n += n
    if logits == "last":
        last = np.cumsum([n for _, n in seqs]) - 1
        x = np.ascontiguousarray(x[last])
    ops.rmsnorm(x, model.output_norm, model.cfg.norm_eps, x)
    return model.output.matmul(x)


def tname(t: T, bid: int | None = None) -> str:
    """GGUF name of a weight: tname(T.ATTN_Q, 3) -> 'blk.3.attn_q.weight'."""
    return TENSOR_NAMES[t].format(bid=bid) + ".weight"


class Llama:
    arch = "llama"

    def __init__(self, cfg: ModelConfig, w):
        self.cfg = cfg
        d, hd = cfg.n_embd, cfg.head_dim
        self.tok_embd = w.matrix(tname(T.TOKEN_EMBD), (cfg.n_vocab, d))
        self.output_norm = w.vector(tname(T.OUTPUT_NORM), d)
        # tied embeddings: no output.weight, the token embedding is the output head
        self.output = w.matrix(tname(T.OUTPUT), (cfg.n_vocab, d)) if w.has(tname(T.OUTPUT)) else self.tok_embd
        freq_factors = None
        if w.has(TENSOR_NAMES[T.ROPE_FREQS] + ".weight"):  # llama3 rope scaling, as a per-dimension divisor
            freq_factors = w.vector(TENSOR_NAMES[T.ROPE_FREQS] + ".weight", cfg.rope_dim // 2)
        self.freq_factors = freq_factors
        self.widths = self.layer_widths()
        self.layers = []
        for i, (H, Hkv, n_ff) in enumerate(self.widths):
            self.layers.append(dict(
                attn_norm=w.vector(tname(T.ATTN_NORM, i), d),
                # q, k, v share their input: one fused matrix when their types agree
                qkv=w.fused([(tname(T.ATTN_Q, i), (H * hd, d)),
                             (tname(T.ATTN_K, i), (Hkv * hd, d)),
                             (tname(T.ATTN_V, i), (Hkv * hd, d))]),
                wo=w.matrix(tname(T.ATTN_OUT, i), (d, H * hd)),
                ffn_norm=w.vector(tname(T.FFN_NORM, i), d),
                gate_up=w.fused([(tname(T.FFN_GATE, i), (n_ff, d)), (tname(T.FFN_UP, i), (n_ff, d))]),
                down=w.matrix(tname(T.FFN_DOWN, i), (d, n_ff)),
            ))
        self.rope_cos, self.rope_sin = None, None

    def cache_spec(self) -> CacheSpec:
        """Per-head keys and values, each layer with its own head counts."""
        return CacheSpec.kv([(H, Hkv) for H, Hkv, _ in self.widths], self.cfg.head_dim)

    def layer_widths(self) -> list[tuple[int, int, int]]:
        """(n_head, n_head_kv, n_ff) of each layer: all alike here; per layer in a pruned model (models/deci.py)."""
        c = self.cfg
        return [(c.n_head, c.n_head_kv, c.n_ff)] * c.n_layer

    # ------------------------------------------------------------------ rotary tables
    def ensure_rope(self, n_ctx: int) -> None:
        if self.rope_cos is None or self.rope_cos.shape[0] < n_ctx:
            c = self.cfg
            self.rope_cos, self.rope_sin = ops.rope_tables(ops.grown_rows(n_ctx, self.rope_cos), c.rope_dim,
                                                           c.rope_theta, self.freq_factors,
                                                           1.0 / c.rope_scale)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: np.ndarray, seqs: list, logits: str = "last") -> np.ndarray:
        """Run `tokens` (N,) through the model and append their keys/values to the caches.

        `seqs` is a list of (cache, n_new): the rows of `tokens` are the new tokens of each sequence in
        turn (a prefill is one sequence with n_new = N; a batched decode step is B sequences with 1 each),
        placed at positions cache.n, cache.n + 1, ... Returns logits (N, n_vocab) for logits="all",
        else one row per sequence (its last token), and advances each cache.n.
        """
        c = self.cfg
        N = tokens.shape[0]
        hd = c.head_dim
        pos = np.concatenate([np.arange(cache.n, cache.n + n, dtype=np.int64) for cache, n in seqs])
        self.ensure_rope(int(pos.max()) + 1)
        x = self.tok_embd.embed(tokens)  # (N, d)
        h = np.empty_like(x)
        scale = np.float32(1.0 / np.sqrt(hd))
        for li, (L, (H, Hkv, n_ff)) in enumerate(zip(self.layers, self.widths)):
            ops.rmsnorm(x, L["attn_norm"], c.norm_eps, h)
            qkv = L["qkv"].matmul(h)  # (N, (H + 2 Hkv) hd)
            q = np.ascontiguousarray(qkv[:, :H * hd]).reshape(N, H, hd)
            k = np.ascontiguousarray(qkv[:, H * hd:(H + Hkv) * hd]).reshape(N, Hkv, hd)
            v = np.ascontiguousarray(qkv[:, (H + Hkv) * hd:]).reshape(N, Hkv, hd)
            ops.rope_inplace(q, pos, self.rope_cos, self.rope_sin, c.rope_dim)
            ops.rope_inplace(k, pos, self.rope_cos, self.rope_sin, c.rope_dim)
            att = attend(li, q, k, v, seqs, scale)
            x += L["wo"].matmul(att.reshape(N, H * hd))
            swiglu_ffn(x, L, h, n_ff, c.norm_eps)
        return output_logits(self, x, seqs, logits)
