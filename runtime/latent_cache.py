"""The latent cache of multi-head latent attention (MLA, llama.cpp's `deepseek2`): per layer and token one row
[c_kv (r) | k_pe (dr)] in f32, shared by all heads -- (r + dr) values instead of 2 n_head_kv head_dim.

Implements the `Cache` contract (runtime/contracts.py, through `RowCache`) and the pair the MLA model calls:
`store(layer, c, k_pe)` and `attend(layer, q, scale, k_b, v_b, out)` (absorbed decode for one token, explicit
decompression for several; see kernels/mla.py).
"""
from __future__ import annotations

import time

import numpy as np

from ..kernels import mla as K
from ..models.cache_spec import LATENT, CacheSpec
from .cache_base import RowCache, lazy_zeros
from .kv_cache import DECODE, PREFILL, AttentionStats


class LatentCache(RowCache):
    def __init__(self, spec: CacheSpec, n_ctx: int, stats: AttentionStats | None = None):
        if spec.kind != LATENT:
            raise ValueError(f"LatentCache needs a cache spec of kind {LATENT!r} (got {spec.kind!r})")
        n_layer, rank, rope_dim, n_head = spec.n_layer, spec.rank, spec.rope_dim, spec.n_head
        self.spec, self.n_layer, self.n_ctx, self.rank, self.rope_dim, self.n_head = (spec, n_layer, n_ctx, rank,
                                                                                      rope_dim, n_head)
        self.n = 0
        self.kv = lazy_zeros((n_layer, n_ctx, rank + rope_dim), np.float32)
        self.stats = stats or AttentionStats(n_layer, n_head)
        self._qa = np.empty((n_head, rank + rope_dim), dtype=np.float32)
        self._lat = np.empty((n_head, rank), dtype=np.float32)

    @property
    def nbytes_per_token(self) -> int:
        """f32 bytes of [c_kv | k_pe] per token, all layers."""
        return 4 * self.n_layer * (self.rank + self.rope_dim)

    def _rows(self) -> list:
        return [(self.kv, 1)]

    def _empty(self) -> "LatentCache":
        """An empty cache of the same configuration (statistics shared)."""
        return LatentCache(self.spec, self.n_ctx, self.stats)

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
