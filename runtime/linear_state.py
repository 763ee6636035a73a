"""The decode state of a linear-attention model (architecture `edgellm-linear`): a constant amount of memory per
sequence, whatever its length (see kernels/linear_attention.py). Implements the `Cache` contract
(runtime/contracts.py) through `RecurrentState` (runtime/cache_base.py)."""
from __future__ import annotations

import numpy as np

from ..models.cache_spec import STATE, CacheSpec
from .cache_base import RecurrentState


class LinearStateCache(RecurrentState):
    """Per layer: S (Hkv, d, d) and z (Hkv, d) of the gated linear attention, and the last K-1 inputs of the q and k
    convolutions (K-1, H·d) / (K-1, Hkv·d); all f32. `n` counts the tokens seen; n_ctx only bounds it (the state does
    not grow)."""

    def __init__(self, spec: CacheSpec, n_ctx: int):
        if spec.kind != STATE:
            raise ValueError(f"LinearStateCache needs a cache spec of kind {STATE!r} (got {spec.kind!r})")
        self.spec, self.n, self.n_ctx = spec, 0, n_ctx
        shapes = spec.state_shapes
        self.S, self.z, self.conv_q, self.conv_k = (np.zeros(shapes[k], dtype=np.float32)
                                                    for k in ("S", "z", "conv_q", "conv_k"))

    def _state(self) -> list:
        return [self.S, self.z, self.conv_q, self.conv_k]

    def _empty(self) -> "LinearStateCache":
        return LinearStateCache(self.spec, self.n_ctx)
