"""The latent cache of multi-head latent attention (MLA, llama.cpp's `deepseek2`): per layer and token one row
[c_kv (r) | k_pe (dr)] in f32, shared by all heads -- (r + dr) values instead of 2 n_head_kv head_dim.

Implements the `Cache` interface (n, n_ctx, truncate, fork, nbytes_per_token) and the pair the MLA model calls:
`store(layer, c, k_pe)` and `attend(layer, q, scale, k_b, v_b, out)` (absorbed decode for one token, explicit
decompression for several; see kernels/mla.py).
"""
from __future__ import annotations

import time

import numpy as np

from ..kernels import mla as K
from .kv_cache import DECODE, PREFILL, AttentionStats, Cache


class LatentCache(Cache):
    def __init__(self, n_layer: int, n_ctx: int, rank: int, rope_dim: int, n_head: int,
                 stats: AttentionStats | None = None):
        self.n_layer, self.n_ctx, self.rank, self.rope_dim, self.n_head = n_layer, n_ctx, rank, rope_dim, n_head
        self.n = 0
        self.kv = np.zeros((n_layer, n_ctx, rank + rope_dim), dtype=np.float32)
        self.stats = stats or AttentionStats(n_layer, n_head)
        self._qa = np.empty((n_head, rank + rope_dim), dtype=np.float32)
        self._lat = np.empty((n_head, rank), dtype=np.float32)

    @property
    def nbytes_per_token(self) -> int:
        """f32 bytes of [c_kv | k_pe] per token, all layers."""
        return 4 * self.n_layer * (self.rank + self.rope_dim)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.n:
            raise ValueError(f"cannot truncate a cache of {self.n} tokens to {n}")
        self.n = n

    def fork(self) -> "LatentCache":
        """An independent copy holding the same tokens (only the filled part is copied); statistics are shared."""
        c = LatentCache.__new__(LatentCache)
        c.__dict__.update(self.__dict__)
        c.kv = np.zeros_like(self.kv)
        c.kv[:, :self.n] = self.kv[:, :self.n]
        c._qa, c._lat = np.empty_like(self._qa), np.empty_like(self._lat)
        return c

    # ------------------------------------------------------------------ what the model calls
    def store(self, layer: int, c: np.ndarray, k_pe: np.ndarray) -> None:
        """c (T, r) normalised latents and k_pe (T, dr) rotated rope keys of the tokens at positions n .. n + T - 1."""
        T = c.shape[0]
        self.kv[layer, self.n:self.n + T, :self.rank] = c
        self.kv[layer, self.n:self.n + T, self.rank:] = k_pe

    def attend(self, layer: int, q: np.ndarray, scale: float, k_b: np.ndarray, v_b: np.ndarray,
               out: np.ndarray) -> np.ndarray:
        """q (T, H, dn + dr) (rope part rotated) of the tokens at n .. n + T - 1 (already stored), k_b (H, r, dn),
        v_b (H, dv, r) -> out (T, H, dv)."""
        t0 = time.perf_counter()
        T = q.shape[0]
        N = self.n + T
        if T == 1:  # absorbed: scores against the latent rows, values summed in latent space, then W_UV
            K.absorb_queries(q[0], k_b.shape[2], k_b, self._qa)
            K.mla_decode(self._qa, self.kv[layer], N, np.float32(scale), self._lat)
            np.matmul(v_b, self._lat[:, :, None], out=out[0][:, :, None])
            phase = DECODE
        else:
            out[:] = K.mla_prefill(q, self.kv[layer], self.rank, self.n, scale, k_b, v_b)
            phase = PREFILL
        self.stats.seconds[phase] += time.perf_counter() - t0
        self.stats.calls[phase] += 1
        return out
