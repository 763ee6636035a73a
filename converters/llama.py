"""LlamaForCausalLM (Llama-3.x, SmolLM2) -> GGUF `llama`: hyper-parameters, Q/K row permutation
(llama.cpp rotates adjacent pairs, HF rotates halves) and `rope_freqs` for llama3 rope scaling."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import gguf
from gguf import MODEL_TENSOR as T, TENSOR_NAMES

from ..kernels.ops import llama3_freq_factors
from .checkpoint import ConversionError
from .gguf_convert import Converter, decoder_shapes, register


def rope_params(hp: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config dialect: Llama-3.2's `rope_theta` + `rope_scaling`,
    or transformers 5's `rope_parameters` (theta inside)."""
    rp = hp.get("rope_parameters")
    if isinstance(rp, dict):
        theta = rp.get("rope_theta", hp.get("rope_theta", 10000.0))
        kind = rp.get("rope_type", rp.get("type", "default"))
        return float(theta), (None if kind == "default" else dict(rp, rope_type=kind))
    sc = hp.get("rope_scaling")
    if isinstance(sc, dict):
        sc = dict(sc, rope_type=sc.get("rope_type", sc.get("type")))
    return float(hp.get("rope_theta", 10000.0)), sc


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout -> llama.cpp's interleaved pairs, per head (rows of q_proj/k_proj)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register("LlamaForCausalLM")
class LlamaConverter(Converter):
    arch = gguf.MODEL_ARCH.LLAMA

    def __init__(self, ckpt):
        super().__init__(ckpt)
        hp = self.hp
        self.n_head = int(self._hp("num_attention_heads"))
        self.n_head_kv = int(hp.get("num_key_value_heads") or self.n_head)
        self.n_embd = int(self._hp("hidden_size"))
        self.head_dim = int(hp.get("head_dim") or self.n_embd // self.n_head)
        self.tied = bool(hp.get("tie_word_embeddings", False))
        self.theta, self.scaling = rope_params(hp)
        if self.scaling and self.scaling["rope_type"] not in ("llama3", "linear"):
            raise ConversionError(f"rope scaling {self.scaling['rope_type']!r} is not supported (llama3, linear)")

    def set_gguf_parameters(self, w):
        hp = self.hp
        w.add_block_count(self.n_layer)
        w.add_context_length(int(hp.get("max_position_embeddings", 2048)))
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(int(self._hp("intermediate_size")))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_rope_freq_base(self.theta)
        w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-5)))
        w.add_rope_dimension_count(self.head_dim)
        w.add_vocab_size(self.vocab_size())
        if self.head_dim != self.n_embd // self.n_head:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        if self.scaling and self.scaling["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(self.scaling["factor"]))

    def expected_shapes(self):
        return decoder_shapes(self.n_layer, self.n_embd, int(self._hp("intermediate_size")), self.n_head,
                              self.n_head_kv, self.head_dim, self.vocab_size(), self.tied)

    def modify_tensors(self, name, data):
        if name.endswith("rotary_emb.inv_freq"):
            return  # recomputed by the runtime from rope.freq_base
        if name == "lm_head.weight" and self.tied:
            return  # tied: the token embedding is the output head
        if name.endswith("self_attn.q_proj.weight"):
            data = permute_qk(data, self.n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            data = permute_qk(data, self.n_head_kv)
        yield from super().modify_tensors(name, data)

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        if self.scaling and self.scaling["rope_type"] == "llama3":
            s = self.scaling
            yield TENSOR_NAMES[T.ROPE_FREQS] + ".weight", llama3_freq_factors(
                self.head_dim, self.theta, float(s["factor"]), float(s.get("low_freq_factor", 1.0)),
                float(s.get("high_freq_factor", 4.0)), int(s.get("original_max_position_embeddings", 8192)))
