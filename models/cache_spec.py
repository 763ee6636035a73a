"""What cache a model needs, described by the model and built by the runtime (runtime/caches.py).

Three kinds:
  KV      per-head keys and values of every layer (the Llama family): `layer_heads` gives each layer's
          (n_head, n_head_kv) (a pruned `deci` model's differ), `head_dim` the head size; the runtime chooses the
          storage (f32, f16, q8_0, q4_0) and the attention (dense or delta)
  LATENT  multi-head latent attention (`deepseek2`): one row [c_kv (rank) | k_pe (rope_dim)] per layer and token,
          shared by the layer's `layer_heads[l][0]` query heads
  STATE   a constant-size recurrent state (`edgellm-linear`): per layer S (Hkv, d, d), z (Hkv, d) and the last
          conv_kernel - 1 inputs of the q and k convolutions
"""
from __future__ import annotations

from dataclasses import dataclass

KV, LATENT, STATE = "kv", "latent", "state"
KINDS = (KV, LATENT, STATE)


@dataclass(frozen=True)
class CacheSpec:
    kind: str
    layer_heads: tuple[tuple[int, int], ...]  # (n_head, n_head_kv) of each layer
    head_dim: int = 0                         # KV / STATE: head size
    rank: int = 0                             # LATENT: kv_lora_rank
    rope_dim: int = 0                         # LATENT: rope dimensions of the shared key
    conv_kernel: int = 0                      # STATE: causal convolution kernel size

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown cache kind {self.kind!r} (one of {', '.join(KINDS)})")
        if not self.layer_heads or any(hkv < 1 or h % hkv for h, hkv in self.layer_heads):
            raise ValueError("a cache needs (n_head, n_head_kv) per layer, n_head a multiple of n_head_kv >= 1")

    @classmethod
    def kv(cls, layer_heads, head_dim: int) -> "CacheSpec":
        return cls(KV, tuple((int(h), int(hkv)) for h, hkv in layer_heads), head_dim=head_dim)

    @classmethod
    def latent(cls, n_layer: int, n_head: int, rank: int, rope_dim: int) -> "CacheSpec":
        return cls(LATENT, ((n_head, 1),) * n_layer, rank=rank, rope_dim=rope_dim)

    @classmethod
    def state(cls, n_layer: int, n_head: int, n_head_kv: int, head_dim: int, conv_kernel: int) -> "CacheSpec":
        return cls(STATE, ((n_head, n_head_kv),) * n_layer, head_dim=head_dim, conv_kernel=conv_kernel)

    @property
    def n_layer(self) -> int:
        return len(self.layer_heads)

    @property
    def n_head(self) -> int:
        """The most query heads of any layer."""
        return max(h for h, _ in self.layer_heads)

    @property
    def n_head_kv(self) -> int:
        """The most KV heads of any layer."""
        return max(hkv for _, hkv in self.layer_heads)

    @property
    def uniform(self) -> bool:
        """Every layer has the same head counts (then per-layer arrays are stacked into one)."""
        return len(set(self.layer_heads)) == 1

    @property
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """STATE: the shapes of S, z, conv_q, conv_k (all layers)."""
        L, H, Hkv, d, K = self.n_layer, self.n_head, self.n_head_kv, self.head_dim, self.conv_kernel
        return {"S": (L, Hkv, d, d), "z": (L, Hkv, d), "conv_q": (L, K - 1, H * d), "conv_k": (L, K - 1, Hkv * d)}
