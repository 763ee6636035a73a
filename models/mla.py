"""Dense multi-head latent attention (llama.cpp's `deepseek2` without experts): what `edgellm convert --variant mla`
writes. The decoder block of Llama with MLA attention, as llama.cpp 0.3.36's deepseek2 graph computes it:

  q     = attn_q_b · RMSNorm_{q_a_norm}(attn_q_a · h)                  per head [q_nope (dn) | q_pe (dr)]
  [c | k_pe] = attn_kv_a_mqa · h;  c = RMSNorm_{kv_a_norm}(c)          cached per token: [c (r) | rope(k_pe) (dr)]
  score_h = (q_nope_h · (attn_k_b[h]ᵀ c) + rope(q_pe_h) · rope(k_pe)) / sqrt(dn + dr)
  out_h = attn_v_b[h] · Σ_j p_hj c_j;  x += attn_output · out
RoPE: NORM type (adjacent pairs) over the dr rope dims, frequencies rope.freq_base^(-2i/dr), as llama.cpp ropes
deepseek2. Mixture-of-experts blocks (leading_dense_block_count < block_count), the lite layout without q_lora_rank
and YaRN scaling are not supported (clear errors).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import MODEL_TENSOR as T

from ..kernels import ops
from .cache_spec import CacheSpec
from .config import ConfigError, ModelConfig
from .llama import Llama, tname
from .weights import Matrix, Weights


@dataclass
class LatentAttention:
    """Multi-head latent attention of one layer (r_q, r: query and KV latent ranks; dn + dr = dk per head)."""
    norm: np.ndarray       # (d,) attn_norm
    a: Matrix              # (r_q + r + dr, d): attn_q_a and attn_kv_a_mqa stacked (they share their input)
    q_a_norm: np.ndarray   # (r_q,)
    q_b: Matrix            # (H·dk, r_q)
    kv_a_norm: np.ndarray  # (r,)
    k_b: np.ndarray        # (H, r, dn): the key up-projection, absorbed into the queries in decode
    v_b: np.ndarray        # (H, dv, r): the value up-projection
    wo: Matrix             # (d, H·dv)

    def matrices(self) -> list:
        return [self.a, self.q_b, self.wo]


class DeepSeek2(Llama):
    arch = "deepseek2"

    def __init__(self, cfg: ModelConfig, w: Weights):
        e = cfg.extra
        L = cfg.n_layer
        dense = cfg.extra_int("leading_dense_block_count", 0, lo=0, hi=L)
        if dense != L or e.get("expert_count", 0) not in (0, None):
            raise ConfigError("deepseek2 with mixture-of-experts blocks is not supported (only dense MLA models: "
                              "leading_dense_block_count = block_count)")
        if any(isinstance(e.get(k), list) for k in ("attention.head_count", "attention.head_count_kv",
                                                    "feed_forward_length")):
            raise ConfigError("deepseek2 with per-layer head counts or widths is not supported")
        self.r_q = cfg.extra_int("attention.q_lora_rank")
        self.r = cfg.extra_int("attention.kv_lora_rank")
        self.dk = cfg.extra_int("attention.key_length_mla")
        self.dv = cfg.extra_int("attention.value_length_mla")
        self.dr = cfg.rope_dim
        self.dn = self.dk - self.dr
        if cfg.n_head_kv != 1:
            raise ConfigError(f"deepseek2 (MLA) needs head_count_kv = 1 (got {cfg.n_head_kv})")
        if self.dn < 1 or self.dr < 2 or cfg.head_dim != self.r + self.dr:
            raise ConfigError(f"inconsistent MLA sizes: key_length {cfg.head_dim}, kv_lora_rank {self.r}, rope "
                              f"{self.dr}, key_length_mla {self.dk}")
        if cfg.extra_int("attention.value_length", self.r) != self.r:
            raise ConfigError("deepseek2 (MLA) needs attention.value_length = kv_lora_rank")
        super().__init__(cfg, w)
        self.scale = np.float32(1.0 / np.sqrt(self.dk))

    def cache_spec(self) -> CacheSpec:
        """One latent row [c_kv (r) | k_pe (dr)] per layer and token."""
        return CacheSpec.latent(self.cfg.n_layer, self.cfg.n_head, self.r, self.dr)

    def load_attention(self, w: Weights, i: int, H: int, Hkv: int) -> LatentAttention:
        d, r, dr, dn, dk, dv = self.cfg.n_embd, self.r, self.dr, self.dn, self.dk, self.dv
        return LatentAttention(
            norm=w.vector(tname(T.ATTN_NORM, i), d),
            a=w.fused([(tname(T.ATTN_Q_A, i), (self.r_q, d)), (tname(T.ATTN_KV_A_MQA, i), (r + dr, d))]),
            q_a_norm=w.vector(tname(T.ATTN_Q_A_NORM, i), self.r_q),
            q_b=w.matrix(tname(T.ATTN_Q_B, i), (H * dk, self.r_q)),
            kv_a_norm=w.vector(tname(T.ATTN_KV_A_NORM, i), r),
            k_b=w.array(tname(T.ATTN_K_B, i), (H, r, dn)),
            v_b=w.array(tname(T.ATTN_V_B, i), (H, dv, r)),
            wo=w.matrix(tname(T.ATTN_OUT, i), (d, H * dv)))

    def attention(self, li: int, A: LatentAttention, h: np.ndarray, pos: np.ndarray, seqs: list) -> np.ndarray:
        """h (N, d) -> (N, d): the latents c and rope keys k_pe go to the caches (LatentCache), which attend."""
        c = self.cfg
        N = h.shape[0]
        H, r, dr, dn, dk, dv, rq = c.n_head, self.r, self.dr, self.dn, self.dk, self.dv, self.r_q
        a = A.a.matmul(h)  # (N, r_q + r + dr)
        qa = np.ascontiguousarray(a[:, :rq])
        ops.rmsnorm(qa, A.q_a_norm, c.norm_eps, qa)
        q = A.q_b.matmul(qa).reshape(N, H, dk)
        q_pe = np.ascontiguousarray(q[:, :, dn:])
        ops.rope_inplace(q_pe, pos, self.rope_cos, self.rope_sin, dr)
        q[:, :, dn:] = q_pe
        lat = np.ascontiguousarray(a[:, rq:rq + r])
        ops.rmsnorm(lat, A.kv_a_norm, c.norm_eps, lat)
        k_pe = np.ascontiguousarray(a[:, rq + r:]).reshape(N, 1, dr)
        ops.rope_inplace(k_pe, pos, self.rope_cos, self.rope_sin, dr)
        att = np.empty((N, H, dv), dtype=np.float32)
        i = 0
        for cache, n in seqs:
            cache.store(li, lat[i:i + n], k_pe[i:i + n, 0])
            cache.attend(li, q[i:i + n], self.scale, A.k_b, A.v_b, att[i:i + n])
            i += n
        return A.wo.matmul(att.reshape(N, H * dv))
