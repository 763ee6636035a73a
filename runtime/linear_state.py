"""The decode state of a linear-attention model (architecture `edgellm-linear`): a constant amount of memory per
sequence, whatever its length (see kernels/linear_attention.py). Implements the `Cache` interface of kv_cache.py."""
from __future__ import annotations

import numpy as np

from .errors import EdgeLLMError
from .kv_cache import Cache


class StateTruncateError(EdgeLLMError):
    """A recurrent state holds no per-token rows: it can go back only to the start (0) or stay where it is."""


class RecurrentState(Cache):
    """A cache without per-token rows (a recurrent state): it can go back only to the start (0) or stay where it is.
    Subclasses hold `n`, `n_ctx` and their arrays, and `_zero()` them."""

    @property
    def nbytes_per_token(self) -> int:
        return 0

    def _zero(self) -> None:
        raise NotImplementedError

    def truncate(self, n: int) -> None:
        """Only n == 0 (start afresh) or n == self.n (keep everything) are possible."""
        if n == self.n:
            return
        if n != 0:
            raise StateTruncateError(f"a recurrent state cannot go back to token {n} of {self.n} "
                                     "(only to 0: re-run the prompt)")
        self.n = 0
        self._zero()

    def can_truncate(self, n: int) -> bool:
        return n in (0, self.n)


class LinearStateCache(RecurrentState):
    """Per layer: S (Hkv, d, d) and z (Hkv, d) of the gated linear attention, and the last K-1 inputs of the q and k
    convolutions (K-1, H·d) / (K-1, Hkv·d); all f32. `n` counts the tokens seen; n_ctx only bounds it (the state does
    not grow)."""

    def __init__(self, n_layer: int, n_head: int, n_head_kv: int, head_dim: int, conv_kernel: int, n_ctx: int):
        self.n, self.n_ctx = 0, n_ctx
        self.S = np.zeros((n_layer, n_head_kv, head_dim, head_dim), dtype=np.float32)
        self.z = np.zeros((n_layer, n_head_kv, head_dim), dtype=np.float32)
        self.conv_q = np.zeros((n_layer, conv_kernel - 1, n_head * head_dim), dtype=np.float32)
        self.conv_k = np.zeros((n_layer, conv_kernel - 1, n_head_kv * head_dim), dtype=np.float32)

    @property
    def state_nbytes(self) -> int:
        """Bytes of the whole state (constant in the context length)."""
        return self.S.nbytes + self.z.nbytes + self.conv_q.nbytes + self.conv_k.nbytes

    def _zero(self) -> None:
        for a in (self.S, self.z, self.conv_q, self.conv_k):
            a[:] = 0

    def fork(self) -> "LinearStateCache":
        c = LinearStateCache.__new__(LinearStateCache)
        c.n, c.n_ctx = self.n, self.n_ctx
        c.S, c.z, c.conv_q, c.conv_k = self.S.copy(), self.z.copy(), self.conv_q.copy(), self.conv_k.copy()
        return c
