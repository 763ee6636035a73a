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

from dataclasses import dataclass

import numpy as np
from gguf import MODEL_TENSOR as T

from ..kernels import ops
from .config import ConfigError, ModelConfig
from .llama import Attention, FeedForward, Llama, tname
from .weights import Matrix, Weights

ACTIVATIONS = ("relu2", "silu")


def neox_to_pairs(n_head: int, head_dim: int) -> np.ndarray:
    """Row order that turns per-head halves (i, i + hd/2) into adjacent pairs (2i, 2i + 1)."""
    return np.arange(n_head * head_dim).reshape(n_head, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


@dataclass(kw_only=True)
class BitNetAttention(Attention):
    sub_norm: np.ndarray  # (H·hd,) attn_sub_norm, before the output projection


@dataclass(kw_only=True)
class BitNetFeedForward(FeedForward):
    sub_norm: np.ndarray  # (n_ff,) ffn_sub_norm, before the down projection


class BitNet(Llama):
    arch = "bitnet"

    def __init__(self, cfg: ModelConfig, w: Weights):
        self.act = str(cfg.extra.get("hidden_act", cfg.extra.get("hidden_activation", "relu2")))  # edgellm's, llama.cpp's
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"bitnet.hidden_act {self.act!r} is not supported ({', '.join(ACTIVATIONS)})")
        super().__init__(cfg, w)

    def load_output(self, w: Weights) -> Matrix:
        return self.tok_embd  # llama.cpp's bitnet graph always uses the embedding as the output head

    def load_attention(self, w: Weights, i: int, H: int, Hkv: int) -> BitNetAttention:
        d, hd = self.cfg.n_embd, self.cfg.head_dim
        return BitNetAttention(
            norm=w.vector(tname(T.ATTN_NORM, i), d),
            # q, k, v share their input: one stacked matrix when their types agree (as gate and up)
            qkv=w.bitlinear_fused([(tname(T.ATTN_Q, i), (H * hd, d), neox_to_pairs(H, hd)),
                                   (tname(T.ATTN_K, i), (Hkv * hd, d), neox_to_pairs(Hkv, hd)),
                                   (tname(T.ATTN_V, i), (Hkv * hd, d), None)]),
            wo=w.bitlinear_fused([(tname(T.ATTN_OUT, i), (d, H * hd), None)]), n_head=H, n_head_kv=Hkv,
            sub_norm=w.vector(tname(T.ATTN_SUB_NORM, i), H * hd))

    def load_feed_forward(self, w: Weights, i: int, n_ff: int) -> BitNetFeedForward:
        d = self.cfg.n_embd
        return BitNetFeedForward(
            norm=w.vector(tname(T.FFN_NORM, i), d),
            gate_up=w.bitlinear_fused([(tname(T.FFN_GATE, i), (n_ff, d), None), (tname(T.FFN_UP, i), (n_ff, d), None)]),
            down=w.bitlinear_fused([(tname(T.FFN_DOWN, i), (d, n_ff), None)]), n_ff=n_ff,
            sub_norm=w.vector(tname(T.FFN_SUB_NORM, i), n_ff))

    def attention_output(self, A: BitNetAttention, att: np.ndarray) -> np.ndarray:
        ops.rmsnorm(att, A.sub_norm, self.cfg.norm_eps, att)
        return A.wo.matmul(att)

    def feed_forward(self, F: BitNetFeedForward, h: np.ndarray) -> np.ndarray:
        """h (N, d) -> down(subnorm(act(gate(h)) * up(h))), act = relu² (or silu)."""
        gu = F.gate_up.matmul(h)  # (N, 2 n_ff): one int8 quantization of h for both
        g, u = np.ascontiguousarray(gu[:, :F.n_ff]), gu[:, F.n_ff:]
        if self.act == "relu2":
            np.maximum(g, 0, out=g)
            g *= g
            g *= u
        else:
            g = ops.swiglu(g, u, np.empty_like(g))
        ops.rmsnorm(g, F.sub_norm, self.cfg.norm_eps, g)
        return F.down.matmul(g)
