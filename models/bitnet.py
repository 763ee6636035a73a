"""BitNet b1.58 (GGUF `bitnet`, as transformers' BitNetForCausalLM computes it): a Llama-shaped decoder whose
projections are ternary with per-token int8 activations (absmax), with sub-norms before the output and down
projections and a squared-ReLU gated feed-forward (2B4T; `bitnet.hidden_act` or llama.cpp's
`bitnet.hidden_activation` = silu selects SiLU).

    h = x + W_o(subnorm_a(attn(norm_a(x))));  x' = h + W_down(subnorm_f(act(W_gate n) * W_up n)), n = norm_f(h)

Each projection computes scale_W * (T @ q(x)) / s_x with q(x) = clamp(round(x * s_x)), s_x = 127 / max|x|.
Rotary embeddings: the file keeps HF's half-split (NEOX) layout; Q/K rows are permuted at load into the
interleaved pairs the rope kernel rotates (attention scores do not change under a shared permutation).
"""
from __future__ import annotations

import numpy as np
from gguf import MODEL_TENSOR as T

from ..kernels import ops
from .config import ModelConfig
from .llama import Llama, attend, output_logits, tname


def neox_to_pairs(n_head: int, head_dim: int) -> np.ndarray:
    """Row order that turns per-head halves (i, i + hd/2) into adjacent pairs (2i, 2i + 1)."""
    return np.arange(n_head * head_dim).reshape(n_head, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


class BitNet(Llama):
    arch = "bitnet"

    def __init__(self, cfg: ModelConfig, w):
        self.cfg = cfg
        d, dkv, hd, H, Hkv = cfg.n_embd, cfg.n_embd_kv, cfg.head_dim, cfg.n_head, cfg.n_head_kv
        self.act = str(cfg.extra.get("hidden_act", cfg.extra.get("hidden_activation", "relu2")))  # edgellm's, llama.cpp's
        if self.act not in ("relu2", "silu"):
            raise ValueError(f"bitnet.hidden_act {self.act!r} is not supported (relu2, silu)")
        self.tok_embd = w.matrix(tname(T.TOKEN_EMBD), (cfg.n_vocab, d))
        self.output_norm = w.vector(tname(T.OUTPUT_NORM), d)
        self.output = self.tok_embd  # llama.cpp's bitnet graph always uses the embedding as the output head
        self.freq_factors = None
        self.layers = []
        for i in range(cfg.n_layer):
            self.layers.append(dict(
                attn_norm=w.vector(tname(T.ATTN_NORM, i), d),
                # q, k, v share their input: one stacked matrix when their types agree (as gate and up)
                qkv=w.bitlinear_fused([(tname(T.ATTN_Q, i), (H * hd, d), neox_to_pairs(H, hd)),
                                       (tname(T.ATTN_K, i), (dkv, d), neox_to_pairs(Hkv, hd)),
                                       (tname(T.ATTN_V, i), (dkv, d), None)]),
                attn_sub_norm=w.vector(tname(T.ATTN_SUB_NORM, i), H * hd),
                wo=w.bitlinear(tname(T.ATTN_OUT, i), (d, H * hd)),
                ffn_norm=w.vector(tname(T.FFN_NORM, i), d),
                gate_up=w.bitlinear_fused([(tname(T.FFN_GATE, i), (cfg.n_ff, d), None),
                                           (tname(T.FFN_UP, i), (cfg.n_ff, d), None)]),
                ffn_sub_norm=w.vector(tname(T.FFN_SUB_NORM, i), cfg.n_ff),
                down=w.bitlinear(tname(T.FFN_DOWN, i), (d, cfg.n_ff)),
            ))
        self.rope_cos, self.rope_sin = None, None

    def forward(self, tokens: np.ndarray, seqs: list, logits: str = "last") -> np.ndarray:
        """As `Llama.forward`: tokens (N,) of the sequences `seqs` = [(cache, n_new)] -> logits."""
        c = self.cfg
        N = tokens.shape[0]
        H, Hkv, hd = c.n_head, c.n_head_kv, c.head_dim
        pos = np.concatenate([np.arange(cache.n, cache.n + n, dtype=np.int64) for cache, n in seqs])
        self.ensure_rope(int(pos.max()) + 1)
        x = self.tok_embd.embed(tokens)  # (N, d)
        h = np.empty_like(x)
        scale = np.float32(1.0 / np.sqrt(hd))
        for li, L in enumerate(self.layers):
            ops.rmsnorm(x, L["attn_norm"], c.norm_eps, h)
            qkv = L["qkv"].matmul(h)  # one int8 quantization of h for q, k and v
            q = np.ascontiguousarray(qkv[:, :H * hd]).reshape(N, H, hd)
            k = np.ascontiguousarray(qkv[:, H * hd:(H + Hkv) * hd]).reshape(N, Hkv, hd)
            v = np.ascontiguousarray(qkv[:, (H + Hkv) * hd:]).reshape(N, Hkv, hd)
            ops.rope_inplace(q, pos, self.rope_cos, self.rope_sin, c.rope_dim)
            ops.rope_inplace(k, pos, self.rope_cos, self.rope_sin, c.rope_dim)
            att = attend(li, q, k, v, seqs, scale).reshape(N, H * hd)
            ops.rmsnorm(att, L["attn_sub_norm"], c.norm_eps, att)
            x += L["wo"].matmul(att)
            ops.rmsnorm(x, L["ffn_norm"], c.norm_eps, h)
            gu = L["gate_up"].matmul(h)
            g, u = np.ascontiguousarray(gu[:, :c.n_ff]), gu[:, c.n_ff:]
            if self.act == "relu2":
                np.maximum(g, 0, out=g)
                g *= g
                g *= u
            else:
                g = ops.swiglu(g, u, np.empty_like(g))
            ops.rmsnorm(g, L["ffn_sub_norm"], c.norm_eps, g)
            x += L["down"].matmul(g)
        return output_logits(self, x, seqs, logits)
