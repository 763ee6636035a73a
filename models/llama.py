"""Llama (Llama-2/3.x, SmolLM2, ...): the decoder loop every architecture runs, composed from kernels.

    x = embed(tokens)
    for each layer:  x += attention(rmsnorm(x));  x += feed_forward(rmsnorm(x))
    logits = output(rmsnorm(x))

An architecture (bitnet.py, deci.py, mla.py, linear.py) subclasses `Llama` and overrides only what differs: the
widths of its layers, how it loads and runs attention or the feed-forward, its output head, its cache.

Weights are looked up by their GGUF names. The runtime hands the model a `Weights` source (models/weights.py,
implemented by runtime/weights.py) that returns quantized matrices (`.matmul(X)`, `.embed(ids)`) and float32
vectors, already checked against the shapes named here. Each layer's weights are a small dataclass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR as T, TENSOR_NAMES

from ..kernels import ops
from .cache_spec import CacheSpec
from .config import ModelConfig
from .weights import Matrix, Weights


def tname(t: T, bid: int | None = None) -> str:
    """GGUF name of a weight: tname(T.ATTN_Q, 3) -> 'blk.3.attn_q.weight'."""
    return TENSOR_NAMES[t].format(bid=bid) + ".weight"


@dataclass
class Attention:
    """Softmax attention of one layer, over a KV cache."""
    norm: np.ndarray  # (d,) attn_norm
    qkv: Matrix       # (H·hd + 2·Hkv·hd, d): q, k, v stacked (one matrix when their types agree)
    wo: Matrix        # (d, H·hd)
    n_head: int       # H
    n_head_kv: int    # Hkv

    def matrices(self) -> list:
        return [self.qkv, self.wo]


@dataclass
class FeedForward:
    """The gated feed-forward of one layer: down(act(gate(x)) * up(x))."""
    norm: np.ndarray  # (d,) ffn_norm
    gate_up: Matrix   # (2·n_ff, d): gate, up stacked
    down: Matrix      # (d, n_ff)
    n_ff: int

    def matrices(self) -> list:
        return [self.gate_up, self.down]


@dataclass
class Layer:
    attn: Any         # Attention, or an architecture's own (bitnet, mla, linear)
    ffn: Any          # FeedForward (bitnet: with a sub-norm)

    def matrices(self) -> list:
        """The matrices one decode step reads (what `weight_bytes_per_token` counts)."""
        return self.attn.matrices() + self.ffn.matrices()


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


class Llama:
    arch = "llama"

    def __init__(self, cfg: ModelConfig, w: Weights):
        self.cfg = cfg
        d = cfg.n_embd
        self.tok_embd = w.matrix(tname(T.TOKEN_EMBD), (cfg.n_vocab, d))
        self.output_norm = w.vector(tname(T.OUTPUT_NORM), d)
        self.output = self.load_output(w)
        self.freq_factors = None  # llama3 rope scaling: a per-dimension divisor of the rotary frequencies
        if w.has(TENSOR_NAMES[T.ROPE_FREQS] + ".weight"):
            self.freq_factors = w.vector(TENSOR_NAMES[T.ROPE_FREQS] + ".weight", cfg.rope_dim // 2)
        self.scale = np.float32(1.0 / np.sqrt(cfg.head_dim))  # of the attention scores
        self.widths = self.layer_widths()
        self.layers = [Layer(self.load_attention(w, i, H, Hkv), self.load_feed_forward(w, i, n_ff))
                       for i, (H, Hkv, n_ff) in enumerate(self.widths)]
        self.rope_cos, self.rope_sin = None, None

    # ------------------------------------------------------------------ what the runtime asks
    def cache_spec(self) -> CacheSpec:
        """Per-head keys and values, each layer with its own head counts."""
        return CacheSpec.kv([(H, Hkv) for H, Hkv, _ in self.widths], self.cfg.head_dim)

    def layer_widths(self) -> list[tuple[int, int, int]]:
        """(n_head, n_head_kv, n_ff) of each layer: all alike here; per layer in a pruned model (models/deci.py)."""
        c = self.cfg
        return [(c.n_head, c.n_head_kv, c.n_ff)] * c.n_layer

    # ------------------------------------------------------------------ loading
    def load_output(self, w: Weights) -> Matrix:
        """The output head: output.weight, or the token embedding when they are tied (no output.weight)."""
        c = self.cfg
        return w.matrix(tname(T.OUTPUT), (c.n_vocab, c.n_embd)) if w.has(tname(T.OUTPUT)) else self.tok_embd

    def load_attention(self, w: Weights, i: int, H: int, Hkv: int) -> Attention:
        d, hd = self.cfg.n_embd, self.cfg.head_dim
        return Attention(norm=w.vector(tname(T.ATTN_NORM, i), d),
                         qkv=w.fused([(tname(T.ATTN_Q, i), (H * hd, d)), (tname(T.ATTN_K, i), (Hkv * hd, d)),
                                      (tname(T.ATTN_V, i), (Hkv * hd, d))]),
                         wo=w.matrix(tname(T.ATTN_OUT, i), (d, H * hd)), n_head=H, n_head_kv=Hkv)

    def load_feed_forward(self, w: Weights, i: int, n_ff: int) -> FeedForward:
        d = self.cfg.n_embd
        return FeedForward(norm=w.vector(tname(T.FFN_NORM, i), d),
                           gate_up=w.fused([(tname(T.FFN_GATE, i), (n_ff, d)), (tname(T.FFN_UP, i), (n_ff, d))]),
                           down=w.matrix(tname(T.FFN_DOWN, i), (d, n_ff)), n_ff=n_ff)

    # ------------------------------------------------------------------ rotary tables
    def ensure_rope(self, n_ctx: int) -> None:
        if self.rope_cos is None or self.rope_cos.shape[0] < n_ctx:
            c = self.cfg
            self.rope_cos, self.rope_sin = ops.rope_tables(ops.grown_rows(n_ctx, self.rope_cos), c.rope_dim,
                                                           c.rope_theta, self.freq_factors, 1.0 / c.rope_scale)

    def positions(self, seqs: list) -> np.ndarray | None:
        """Positions (N,) of the new tokens (each sequence's continue at its cache.n), with rotary tables that
        reach them."""
        pos = np.concatenate([np.arange(cache.n, cache.n + n, dtype=np.int64) for cache, n in seqs])
        self.ensure_rope(int(pos.max()) + 1)
        return pos

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: np.ndarray, seqs: list, logits: str = "last") -> np.ndarray:
        """Run `tokens` (N,) through the model and append them to the caches.

        `seqs` is a list of (cache, n_new): the rows of `tokens` are the new tokens of each sequence in
        turn (a prefill is one sequence with n_new = N; a batched decode step is B sequences with 1 each),
        placed at positions cache.n, cache.n + 1, ... Returns logits (N, n_vocab) for logits="all",
        else one row per sequence (its last token), and advances each cache.n.
        """
        eps = self.cfg.norm_eps
        pos = self.positions(seqs)
        x = self.tok_embd.embed(tokens)  # (N, d)
        h = np.empty_like(x)             # (N, d) the normalised input of each block
        for li, L in enumerate(self.layers):
            ops.rmsnorm(x, L.attn.norm, eps, h)
            x += self.attention(li, L.attn, h, pos, seqs)
            ops.rmsnorm(x, L.ffn.norm, eps, h)
            x += self.feed_forward(L.ffn, h)
        return self.output_logits(x, seqs, logits)

    def attention(self, li: int, A: Attention, h: np.ndarray, pos: np.ndarray, seqs: list) -> np.ndarray:
        """h (N, d) normalised input of layer li -> (N, d) attention output (new keys and values stored)."""
        N, hd = h.shape[0], self.cfg.head_dim
        H, Hkv = A.n_head, A.n_head_kv
        qkv = A.qkv.matmul(h)  # (N, (H + 2 Hkv) hd)
        q = np.ascontiguousarray(qkv[:, :H * hd]).reshape(N, H, hd)
        k = np.ascontiguousarray(qkv[:, H * hd:(H + Hkv) * hd]).reshape(N, Hkv, hd)
        v = np.ascontiguousarray(qkv[:, (H + Hkv) * hd:]).reshape(N, Hkv, hd)
        ops.rope_inplace(q, pos, self.rope_cos, self.rope_sin, self.cfg.rope_dim)
        ops.rope_inplace(k, pos, self.rope_cos, self.rope_sin, self.cfg.rope_dim)
        att = attend(li, q, k, v, seqs, self.scale).reshape(N, H * hd)
        return self.attention_output(A, att)

    def attention_output(self, A: Attention, att: np.ndarray) -> np.ndarray:
        """att (N, H·hd) -> (N, d)."""
        return A.wo.matmul(att)

    def feed_forward(self, F: FeedForward, h: np.ndarray) -> np.ndarray:
        """h (N, d) -> (N, d) = down(silu(gate(h)) * up(h))."""
        gu = F.gate_up.matmul(h)  # (N, 2 n_ff)
        act = ops.swiglu(gu[:, :F.n_ff], gu[:, F.n_ff:], np.empty((h.shape[0], F.n_ff), dtype=np.float32))
        return F.down.matmul(act)

    def output_logits(self, x: np.ndarray, seqs: list, logits: str) -> np.ndarray:
        """The end of every forward: advance each cache by its new tokens, keep the last row of each sequence unless
        logits == "all", final norm and output head -> logits."""
        for cache, n in seqs:
            cache.n += n
        if logits == "last":
            last = np.cumsum([n for _, n in seqs]) - 1
            x = np.ascontiguousarray(x[last])
        ops.rmsnorm(x, self.output_norm, self.cfg.norm_eps, x)
        return self.output.matmul(x)
