"""Caches built from what a model says it needs (its `CacheSpec`, models/cache_spec.py) and the runtime's options
(KV storage type, attention kind): the one place that maps a spec to a cache type."""
from __future__ import annotations

from ..kernels.kv_store import QK, bytes_per_token as kv_type_bytes
from ..models.cache_spec import KV, LATENT, CacheSpec
from .contracts import Cache
from .errors import ArgumentError, UnsupportedError
from .kv_cache import AttentionConfig, AttentionStats, KVCache, parse_kv
from .latent_cache import LatentCache
from .linear_state import LinearStateCache


def default_kv(spec: CacheSpec) -> str:
    """The storage a cache of this spec gets when none is asked for: f16 for K and V, as llama.cpp's default (half
    the memory and the bytes attention reads of f32; the kernels convert with the machine's instructions); an MLA
    latent cache and a linear-attention state are f32, their only type."""
    return "f16" if spec.kind == KV else "f32"


def check_options(spec: CacheSpec, kv: str, attn: str) -> None:
    """Raise UnsupportedError for a storage (kv) or attention kind (attn) this kind of cache does not have."""
    if spec.kind == KV:
        if attn == "delta" and not spec.uniform:
            raise UnsupportedError("attn delta is not supported for models with per-layer head counts (deci)", "attn")
        for t in parse_kv(kv):
            if t in ("q8_0", "q4_0") and spec.head_dim % QK:
                raise ArgumentError(f"kv {t} stores blocks of {QK} values: it needs a head size that is a multiple of "
                                    f"{QK} (this model's is {spec.head_dim})", "kv")
        return
    what = "the latent cache of an MLA model is f32 with dense attention" if spec.kind == LATENT else \
        "the state of a linear-attention model is f32 and has no softmax attention"
    if parse_kv(kv) != ("f32", "f32") or attn != "dense":
        raise UnsupportedError(f"kv {kv} / attn {attn}: {what}", ("kv", "attn"))


def build_cache(spec: CacheSpec, n_ctx: int, kv: str = "f32", attn: AttentionConfig | None = None,
                stats: AttentionStats | None = None, transform: bool = True) -> Cache:
    """An empty cache of kind spec.kind for n_ctx tokens (kv, attn, transform: see KVCache)."""
    attn = attn or AttentionConfig()
    check_options(spec, kv, attn.kind)
    if spec.kind == KV:
        return KVCache(spec, n_ctx, kv, attn, stats, transform)
    if spec.kind == LATENT:
        return LatentCache(spec, n_ctx, stats)
    return LinearStateCache(spec, n_ctx)


def bytes_per_token(spec: CacheSpec, kv: str = "f32") -> int:
    """Bytes each token takes in a cache of this spec (0 for a constant-size state)."""
    if spec.kind == KV:
        return sum(kv_type_bytes(t, hkv, spec.head_dim) for _, hkv in spec.layer_heads for t in parse_kv(kv))
    if spec.kind == LATENT:
        return 4 * spec.n_layer * (spec.rank + spec.rope_dim)
    return 0
