"""Deci (llama.cpp's `deci`): a Llama whose layers have their own widths — per-layer arrays
`deci.attention.head_count`, `deci.attention.head_count_kv` and `deci.feed_forward_length` (any of them may be a
single integer). Structured pruning (converters/prune.py) writes it. The block is Llama's (rope on adjacent pairs,
SwiGLU, RMSNorm); only the shapes and the KV cache (one size per layer) differ.

Not supported (refused at load): Nemotron's attention-free or "linear attention" layers (head_count or
head_count_kv 0) and FFN-free layers (feed_forward_length 0).
"""
from __future__ import annotations

from .config import ConfigError, ModelConfig
from .llama import Llama


def per_layer(cfg: ModelConfig, key: str, default: int) -> list[int]:
    """cfg.extra[key] as one integer per layer (validated; a scalar is repeated)."""
    v = cfg.extra.get(key, default)
    v = [v] * cfg.n_layer if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(v, (list, tuple)) or len(v) != cfg.n_layer:
        raise ConfigError(f"deci.{key} must be an integer or one integer per layer ({cfg.n_layer})")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= 1 << 20:
            raise ConfigError(f"deci.{key} has {x!r}: edgellm runs layers with at least one head and one neuron "
                              "(attention-free, linear-attention and FFN-free layers are not supported)")
    return list(v)


class Deci(Llama):
    arch = "deci"

    def layer_widths(self) -> list[tuple[int, int, int]]:
        c = self.cfg
        H = per_layer(c, "attention.head_count", c.n_head)
        Hkv = per_layer(c, "attention.head_count_kv", c.n_head_kv)
        F = per_layer(c, "feed_forward_length", c.n_ff)
        for i, (h, hkv) in enumerate(zip(H, Hkv)):
            if h % hkv:
                raise ConfigError(f"layer {i}: head_count {h} is not a multiple of head_count_kv {hkv}")
        if c.n_head * c.head_dim != c.n_embd and "attention.key_length" not in c.extra:
            raise ConfigError("deci with per-layer head counts needs deci.attention.key_length (the head size)")
        return list(zip(H, Hkv, F))
