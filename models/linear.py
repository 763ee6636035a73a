"""`edgellm-linear`: a Llama whose softmax attention is normalised gated linear attention with causal convolutions
over q and k (written by `edgellm convert --variant linear`, converters/linear.py; llama.cpp has no such
architecture, so only edgellm runs these files). Tensors: the Llama ones (q/k/v rows in HF order: there is no RoPE)
plus per layer `attn_q_conv` (H·d, K), `attn_k_conv` (Hkv·d, K), `attn_gate` (Hkv·d, n_embd) and `attn_gate.bias`.
Metadata: `conv_kernel`, `feature_map`, `chunk_size`, `attention.eps`, `attention.log_decay_min` (log α is
clamped there). The cache is a constant-size state
(runtime/linear_state.py); decode runs the recurrence, prefill the chunked parallel form."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT, MODEL_TENSOR as T

from ..kernels import linear_attention as LA
from ..kernels import ops
from .cache_spec import CacheSpec
from .config import ConfigError, ModelConfig
from .llama import output_logits, swiglu_ffn, tname


def _extra(cfg: ModelConfig, key: str, types, check, what: str):
    v = cfg.extra.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, types) or not check(v):
        raise ConfigError(f"metadata {cfg.arch}.{key} = {v!r} is not {what}")
    return v


class LinearLlama:
    arch = "edgellm-linear"

    def __init__(self, cfg: ModelConfig, w):
        self.cfg = cfg
        self.K = int(_extra(cfg, "conv_kernel", int, lambda v: 1 <= v <= 64, "an integer in [1, 64]"))
        self.fmap = _extra(cfg, "feature_map", str, lambda v: v in LA.FEATURE_MAPS, f"one of {LA.FEATURE_MAPS}")
        self.chunk = int(_extra(cfg, "chunk_size", int, lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"))
        self.eps = np.float32(_extra(cfg, "attention.eps", (int, float), lambda v: 0 < v < 1, "a number in (0, 1)"))
        self.la_min = np.float32(_extra(cfg, "attention.log_decay_min", (int, float), lambda v: -100 <= v <= 0,
                                        "a number in [-100, 0]"))
        d, hd, H, Hkv = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_head_kv
        self.tok_embd = w.matrix(tname(T.TOKEN_EMBD), (cfg.n_vocab, d))
        self.output_norm = w.vector(tname(T.OUTPUT_NORM), d)
        self.output = w.matrix(tname(T.OUTPUT), (cfg.n_vocab, d)) if w.has(tname(T.OUTPUT)) else self.tok_embd
        self.layers = []
        for i in range(cfg.n_layer):
            conv = [w._info(f"blk.{i}.attn_{x}_conv.weight", (n * hd, self.K), (QT.F32, QT.F16)) for x, n in (("q", H), ("k", Hkv))]
            self.layers.append(dict(
                attn_norm=w.vector(tname(T.ATTN_NORM, i), d),
                # q, k, v and the decay gate share their input: one fused matrix when their types agree
                qkvg=w.fused([(tname(T.ATTN_Q, i), (H * hd, d)), (tname(T.ATTN_K, i), (Hkv * hd, d)),
                              (tname(T.ATTN_V, i), (Hkv * hd, d)), (f"blk.{i}.attn_gate.weight", (Hkv * hd, d))]),
                gate_b=w.vector(f"blk.{i}.attn_gate.bias", Hkv * hd),
                conv_q=np.ascontiguousarray(conv[0].data, dtype=np.float32),
                conv_k=np.ascontiguousarray(conv[1].data, dtype=np.float32),
                wo=w.matrix(tname(T.ATTN_OUT, i), (d, H * hd)),
                ffn_norm=w.vector(tname(T.FFN_NORM, i), d),
                gate_up=w.fused([(tname(T.FFN_GATE, i), (cfg.n_ff, d)), (tname(T.FFN_UP, i), (cfg.n_ff, d))]),
                down=w.matrix(tname(T.FFN_DOWN, i), (d, cfg.n_ff)),
            ))
            for c in ("conv_q", "conv_k"):
                if not np.isfinite(self.layers[-1][c]).all():
                    raise ConfigError(f"blk.{i}.attn_{c[-1]}_conv.weight is not finite")

    # ------------------------------------------------------------------ the state
    def cache_spec(self) -> CacheSpec:
        c = self.cfg
        return CacheSpec.state(c.n_layer, c.n_head, c.n_head_kv, c.head_dim, self.K)

    def state_bytes(self) -> int:
        c = self.cfg
        return 4 * c.n_layer * (c.n_head_kv * c.head_dim * (c.head_dim + 1) + (self.K - 1) * (c.n_head + c.n_head_kv) * c.head_dim)

    # ------------------------------------------------------------------ forward
    def attend(self, li: int, L: dict, q, k, v, g, seqs) -> np.ndarray:
        """q (N, H·d), k / v / g (N, Hkv·d) pre-conv projections and gate pre-activations of the new tokens of each
        sequence -> attention output (N, H, d); each sequence's state advances."""
        c = self.cfg
        H, Hkv, hd = c.n_head, c.n_head_kv, c.head_dim
        out = np.empty((q.shape[0], H, hd), dtype=np.float32)
        qc, kc = np.empty_like(q), np.empty_like(k)
        la = np.maximum(LA.log_sigmoid(g + L["gate_b"]), self.la_min).reshape(-1, Hkv, hd)
        r = 0
        for cache, n in seqs:
            s = slice(r, r + n)
            LA.causal_conv(q[s], cache.conv_q[li], L["conv_q"], qc[s])
            LA.causal_conv(k[s], cache.conv_k[li], L["conv_k"], kc[s])
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

    def forward(self, tokens: np.ndarray, seqs: list, logits: str = "last") -> np.ndarray:
        """As Llama.forward (models/llama.py): `seqs` = [(cache, n_new)], one row of logits per sequence unless
        logits="all"; the caches here are LinearStateCache."""
        c = self.cfg
        N = tokens.shape[0]
        H, Hkv, hd = c.n_head, c.n_head_kv, c.head_dim
        x = self.tok_embd.embed(tokens)
        h = np.empty_like(x)
        a, b = H * hd, (H + Hkv) * hd
        for li, L in enumerate(self.layers):
            ops.rmsnorm(x, L["attn_norm"], c.norm_eps, h)
            p = L["qkvg"].matmul(h)  # (N, (H + 3 Hkv) d)
            att = self.attend(li, L, np.ascontiguousarray(p[:, :a]), np.ascontiguousarray(p[:, a:b]),
                              p[:, b:b + Hkv * hd], p[:, b + Hkv * hd:], seqs)
            x += L["wo"].matmul(att.reshape(N, H * hd))
            swiglu_ffn(x, L, h, c.n_ff, c.norm_eps)
        return output_logits(self, x, seqs, logits)
