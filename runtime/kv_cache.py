"""KV caches: how a sequence remembers its past. The model writes k/v rows for new tokens and
advances `n`; `fork()` gives search a child that shares nothing it could overwrite."""
from __future__ import annotations

import numpy as np


class KVCache:
    """Dense float32 cache, head-major per layer: k[l] is (n_head_kv, n_ctx, head_dim), so that one
    head's keys are contiguous for attention."""

    def __init__(self, n_layer: int, n_head_kv: int, n_ctx: int, head_dim: int):
        self.n_ctx = n_ctx
        self.k = np.zeros((n_layer, n_head_kv, n_ctx, head_dim), dtype=np.float32)
        self.v = np.zeros_like(self.k)
        self.n = 0  # tokens stored

    @property
    def nbytes_per_token(self) -> int:
        L, H, _, D = self.k.shape
        return 2 * L * H * D * self.k.itemsize

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (for reusing a common prefix)."""
        if not 0 <= n <= self.n:
            raise ValueError(f"cannot truncate a cache of {self.n} tokens to {n}")
        self.n = n

    def fork(self) -> "KVCache":
        """An independent copy holding the same tokens (only the filled part is copied)."""
        c = KVCache.__new__(KVCache)
        c.n_ctx, c.n = self.n_ctx, self.n
        c.k = np.zeros_like(self.k)
        c.v = np.zeros_like(self.v)
        c.k[:, :, :self.n] = self.k[:, :, :self.n]
        c.v[:, :, :self.n] = self.v[:, :, :self.n]
        return c
