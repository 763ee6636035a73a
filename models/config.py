"""What a model is: one frozen config dataclass, built from GGUF metadata (or, in converters, HF config.json)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from gguf import Keys


class ConfigError(ValueError):
    """Metadata missing, of the wrong type or out of range (the runtime reports it as a GGUF error)."""


def _int(meta: Mapping[str, Any], key: str, default: int | None = None, lo: int = 1, hi: int = 1 << 24) -> int:
    v = meta.get(key, default)
    if v is None:
        raise ConfigError(f"missing metadata key {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"metadata {key!r} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _per_layer(meta: Mapping[str, Any], key: str, default: int | None = None, lo: int = 1) -> int:
    """A count that may be one integer or one per layer (deci: head_count_kv, feed_forward_length): the largest
    (every entry checked); the per-layer list stays in ModelConfig.extra under the key's name."""
    v = meta.get(key, default)
    if isinstance(v, (list, tuple)):
        if not v:
            raise ConfigError(f"metadata {key!r} is an empty array")
        for x in v:
            _int({key: x}, key, lo=lo)
        return max(v)
    return _int(meta, key, default, lo=lo)


def _float(meta: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise ConfigError(f"metadata {key!r} = {v!r} is not a number in [{lo}, {hi}]")
    return float(v)


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx_train: int
    head_dim: int = 0          # derived: n_embd // n_head unless the file says otherwise
    rope_dim: int = 0          # derived: head_dim unless the file says otherwise
    rope_theta: float = 10000.0
    rope_scale: float = 1.0    # linear position scaling (rope.scaling.type = linear)
    norm_eps: float = 1e-5
    extra: Mapping[str, Any] = field(default_factory=dict)  # per-architecture keys

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.rope_dim == 0:
            object.__setattr__(self, "rope_dim", self.head_dim)
        if self.n_head % self.n_head_kv:
            raise ConfigError(f"head_count {self.n_head} is not a multiple of head_count_kv {self.n_head_kv}")
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            raise ConfigError(f"rope dimension {self.rope_dim} does not fit head size {self.head_dim}")

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def extra_int(self, key: str, default: int | None = None, lo: int = 1, hi: int = 1 << 20) -> int:
        """extra[key] (an architecture key without its `arch.` prefix) -> an integer in [lo, hi], else ConfigError
        naming the whole key (e.g. 'deepseek2.attention.kv_lora_rank')."""
        name = f"{self.arch}.{key}"
        return _int({name: self.extra.get(key, default)}, name, lo=lo, hi=hi)

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any]) -> "ModelConfig":
        arch = meta.get(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str):
            raise ConfigError(f"missing metadata key {Keys.General.ARCHITECTURE!r}")
        k = lambda key: key.format(arch=arch)  # noqa: E731
        n_head = _per_layer(meta, k(Keys.Attention.HEAD_COUNT))
        n_embd = _int(meta, k(Keys.LLM.EMBEDDING_LENGTH))
        n_vocab = meta.get(k(Keys.LLM.VOCAB_SIZE))
        if n_vocab is None:
            n_vocab = len(meta.get(Keys.Tokenizer.LIST) or [])
        scaling = meta.get(k(Keys.Rope.SCALING_TYPE), "none")
        rope_scale = 1.0
        if scaling == "linear":
            rope_scale = _float(meta, k(Keys.Rope.SCALING_FACTOR), 1.0, 1e-3, 1e6)
        elif scaling not in ("none", None):
            raise ConfigError(f"rope scaling type {scaling!r} is not supported (edgellm supports none, linear, "
                              "and llama3 via the rope_freqs tensor)")
        return cls(
            arch=arch,
            n_layer=_int(meta, k(Keys.LLM.BLOCK_COUNT), hi=4096),
            n_embd=n_embd,
            n_ff=_per_layer(meta, k(Keys.LLM.FEED_FORWARD_LENGTH)),
            n_head=n_head,
            n_head_kv=_per_layer(meta, k(Keys.Attention.HEAD_COUNT_KV), n_head),
            n_vocab=_int(meta, k(Keys.LLM.VOCAB_SIZE), n_vocab, hi=1 << 22),
            n_ctx_train=_int(meta, k(Keys.LLM.CONTEXT_LENGTH), 2048, hi=1 << 24),
            head_dim=_int(meta, k(Keys.Attention.KEY_LENGTH), n_embd // n_head if n_embd % n_head == 0 else None),
            rope_dim=_int(meta, k(Keys.Rope.DIMENSION_COUNT), 0, lo=0),
            rope_theta=_float(meta, k(Keys.Rope.FREQ_BASE), 10000.0, 1.0, 1e12),
            rope_scale=rope_scale,
            norm_eps=_float(meta, k(Keys.Attention.LAYERNORM_RMS_EPS), 1e-5, 0.0, 1.0),
            # every architecture key (e.g. bitnet.hidden_act, deci's per-layer arrays, deepseek2.attention.*),
            # without the arch prefix: an architecture validates what it reads from here
            extra={key.split(".", 1)[1]: v for key, v in meta.items() if key.startswith(arch + ".")},
        )
