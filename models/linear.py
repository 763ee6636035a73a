"""`edgellm-linear`: a Llama whose softmax attention is normalised gated linear attention with causal convolutions
over q and k (written by `edgellm convert --variant linear`, converters/linear.py; llama.cpp has no such
architecture, so only edgellm runs these files). Tensors: the Llama ones (q/k/v rows in HF order: there is no RoPE)
plus per layer `attn_q_conv` (H·d, K), `attn_k_conv` (Hkv·d, K), `attn_gate` (Hkv·d, n_embd) and `attn_gate.bias`.
Metadata: `conv_kernel`, `feature_map`, `chunk_size`, `attention.eps`, `attention.log_decay_min` (log α is
clamped there). The cache is a constant-size state
(runtime/linear_state.py); decode runs the recurrence, prefill the chunked parallel form."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import MODEL_TENSOR as T

from ..kernels import linear_attention as LA
from .cache_spec import CacheSpec
from .config import ConfigError, ModelConfig
from .llama import Llama, tname
from .weights import Matrix, Weights


def _extra(cfg: ModelConfig, key: str, types, check, what: str):
    v = cfg.extra.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, types) or not check(v):
        raise ConfigError(f"metadata {cfg.arch}.{key} = {v!r} is not {what}")
    return v


@dataclass
class GatedLinearAttention:
    """Gated linear attention of one layer (no rotary embedding; K the causal convolutions' kernel size)."""
    norm: np.ndarray    # (d,) attn_norm
    qkvg: Matrix        # (H·hd + 3·Hkv·hd, d): q, k, v and the decay gate stacked (they share their input)
    gate_b: np.ndarray  # (Hkv·hd,) the decay gate's bias
    conv_q: np.ndarray  # (H·hd, K) causal convolution over q
    conv_k: np.ndarray  # (Hkv·hd, K) causal convolution over k
    wo: Matrix          # (d, H·hd)

    def matrices(self) -> list:
        return [self.qkvg, self.wo]


class LinearLlama(Llama):
    arch = "edgellm-linear"

    def __init__(self, cfg: ModelConfig, w: Weights):
        self.K = int(_extra(cfg, "conv_kernel", int, lambda v: 1 <= v <= 64, "an integer in [1, 64]"))
        self.fmap = _extra(cfg, "feature_map", str, lambda v: v in LA.FEATURE_MAPS, f"one of {LA.FEATURE_MAPS}")
        self.chunk = int(_extra(cfg, "chunk_size", int, lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"))
        self.eps = np.float32(_extra(cfg, "attention.eps", (int, float), lambda v: 0 < v < 1, "a number in (0, 1)"))
        self.la_min = np.float32(_extra(cfg, "attention.log_decay_min", (int, float), lambda v: -100 <= v <= 0,
                                        "a number in [-100, 0]"))
        super().__init__(cfg, w)

    # ------------------------------------------------------------------ the state
    def cache_spec(self) -> CacheSpec:
        c = self.cfg
        return CacheSpec.state(c.n_layer, c.n_head, c.n_head_kv, c.head_dim, self.K)

    def state_bytes(self) -> int:
        """Bytes of one sequence's state (constant in its length)."""
        return 4 * sum(int(np.prod(s)) for s in self.cache_spec().state_shapes.values())

    # ------------------------------------------------------------------ loading
    def load_attention(self, w: Weights, i: int, H: int, Hkv: int) -> GatedLinearAttention:
        d, hd = self.cfg.n_embd, self.cfg.head_dim
        A = GatedLinearAttention(
            norm=w.vector(tname(T.ATTN_NORM, i), d),
            qkvg=w.fused([(tname(T.ATTN_Q, i), (H * hd, d)), (tname(T.ATTN_K, i), (Hkv * hd, d)),
                          (tname(T.ATTN_V, i), (Hkv * hd, d)), (f"blk.{i}.attn_gate.weight", (Hkv * hd, d))]),
            gate_b=w.vector(f"blk.{i}.attn_gate.bias", Hkv * hd),
            conv_q=w.array(f"blk.{i}.attn_q_conv.weight", (H * hd, self.K)),
            conv_k=w.array(f"blk.{i}.attn_k_conv.weight", (Hkv * hd, self.K)),
            wo=w.matrix(tname(T.ATTN_OUT, i), (d, H * hd)))
        for x, conv in (("q", A.conv_q), ("k", A.conv_k)):
            if not np.isfinite(conv).all():
                raise ConfigError(f"blk.{i}.attn_{x}_conv.weight is not finite")
        return A

    # ------------------------------------------------------------------ forward
    def positions(self, seqs: list) -> None:
        return None  # no rotary embedding

    def attention(self, li: int, A: GatedLinearAttention, h: np.ndarray, pos, seqs: list) -> np.ndarray:
        """h (N, d) -> (N, d); each sequence's state (LinearStateCache) advances."""
        c = self.cfg
        N = h.shape[0]
        H, Hkv, hd = c.n_head, c.n_head_kv, c.head_dim
        a, b = H * hd, (H + Hkv) * hd
        p = A.qkvg.matmul(h)  # (N, (H + 3 Hkv) hd)
        att = self.linear_attend(li, A, np.ascontiguousarray(p[:, :a]), np.ascontiguousarray(p[:, a:b]),
                                 p[:, b:b + Hkv * hd], p[:, b + Hkv * hd:], seqs)
        return A.wo.matmul(att.reshape(N, H * hd))

    def linear_attend(self, li: int, A: GatedLinearAttention, q, k, v, g, seqs) -> np.ndarray:
        """q (N, H·d), k / v / g (N, Hkv·d) pre-conv projections and gate pre-activations of the new tokens of each
        sequence -> attention output (N, H, d); each sequence's state advances."""
        c = self.cfg
        H, Hkv, hd = c.n_head, c.n_head_kv, c.head_dim
        out = np.empty((q.shape[0], H, hd), dtype=np.float32)
        qc, kc = np.empty_like(q), np.empty_like(k)
        la = np.maximum(LA.log_sigmoid(g + A.gate_b), self.la_min).reshape(-1, Hkv, hd)
        r = 0
        for cache, n in seqs:
            s = slice(r, r + n)
            LA.causal_conv(q[s], cache.conv_q[li], A.conv_q, qc[s])
            LA.causal_conv(k[s], cache.conv_k[li], A.conv_k, kc[s])
            fq = LA.feature_map(qc[s].reshape(n, H, hd), self.fmap)
            fk = LA.feature_map(kc[s].reshape(n, Hkv, hd), self.fmap)
            vs = np.ascontiguousarray(v[s].reshape(n, Hkv, hd))
            if n == 1:
                LA.gla_decode(fq[0], fk[0], vs[0], np.ascontiguousarray(la[r]), cache.S[li], cache.z[li], self.eps,
                              out[r])
            else:
                LA.gla_chunked(fq, fk, vs, np.ascontiguousarray(la[s]), cache.S[li], cache.z[li], self.chunk,
                               self.eps, out[s])
            r += n
        return out
