"""BitNetForCausalLM (BitNet b1.58 2B4T, as transformers defines it) -> GGUF `bitnet` (llama.cpp's names).

Projection weights are ternary: either packed by transformers' BitNet quantizer (uint8, four 2-bit codes per
byte along the output dimension, plus a per-tensor `weight_scale`) or floats ternarized here with BitNet's
absmean rule. They are written as ternary values ({-1, 0, 1}) in TQ1_0 / TQ2_0 (or F16/F32), with the
per-tensor factor in llama.cpp's `blk.N.<proj>.scale` tensor (one f32), so that W = scale * T exactly.
Rotary embeddings stay in HF's half-split layout (llama.cpp's bitnet arch uses NEOX rope); the feed-forward
activation (ReLU^2 for 2B4T) is recorded under `bitnet.hidden_act` and under llama.cpp's `bitnet.hidden_activation`
("relu2" / "silu"), which llama.cpp's and bitnet.cpp's fixes for 2B4T read (older builds apply SiLU regardless).
"""
from __future__ import annotations

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T, TENSOR_NAMES

from .checkpoint import ConversionError
from .gguf_convert import Converter, decoder_shapes, register
from .llama import rope_params

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# 2B4T names that gguf-py's table (from the older 1bitLLM BitNet) does not know
EXTRA_NAMES = {"self_attn.attn_sub_norm.weight": T.ATTN_SUB_NORM, "mlp.ffn_sub_norm.weight": T.FFN_SUB_NORM}
HIDDEN_ACT_KEY = "bitnet.hidden_act"
# llama.cpp's LLM_KV_HIDDEN_ACT (gguf-py > 0.19: Keys.LLM.HIDDEN_ACT); its "relu2" maps to LLM_FFN_RELU_SQR
HIDDEN_ACTIVATION_KEY = "{arch}.hidden_activation"


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """transformers' packing (uint8 (out/4, in); bits 2i..2i+1 of row r = code of row i*out/4 + r, code = t + 1)."""
    return np.concatenate([((packed >> (2 * i)) & 3).astype(np.float32) - 1 for i in range(4)], axis=0)


def ternarize(w: np.ndarray) -> tuple[np.ndarray, float]:
    """BitNet b1.58's absmean weight quantization: W ~ s * round(W / s) clipped to {-1, 0, 1}, s = mean|W|."""
    s = max(float(np.abs(w).mean(dtype=np.float64)), 1e-5)
    return np.clip(np.round(w / np.float32(s)), -1, 1).astype(np.float32), s


@register("BitNetForCausalLM")
class BitNetConverter(Converter):
    arch = gguf.MODEL_ARCH.BITNET

    def __init__(self, ckpt):
        super().__init__(ckpt)
        hp = self.hp
        self.n_head = int(self._hp("num_attention_heads"))
        self.n_head_kv = int(hp.get("num_key_value_heads") or self.n_head)
        self.n_embd = int(self._hp("hidden_size"))
        self.head_dim = self.n_embd // self.n_head
        self.theta, scaling = rope_params(hp)
        if scaling:
            raise ConversionError(f"rope scaling {scaling.get('rope_type')!r} is not supported for BitNet")
        self.act = str(hp.get("hidden_act", "relu2"))
        if self.act not in ("relu2", "silu"):
            raise ConversionError(f"BitNet hidden_act {self.act!r} is not supported (relu2, silu)")
        qc = hp.get("quantization_config") or {}
        if qc and qc.get("quant_method") != "bitnet":
            raise ConversionError(f"quantization method {qc.get('quant_method')!r} is not supported for BitNet")
        # transformers' BitLinear divides its output by weight_scale; AutoBitLinear multiplies by it
        self.divide_scale = qc.get("linear_class", "bitlinear") == "bitlinear"
        names = set(ckpt.tensor_names())
        if "lm_head.weight" in names and not hp.get("tie_word_embeddings", True):
            raise ConversionError("an untied lm_head is not supported: llama.cpp's bitnet arch uses the token "
                                  "embedding as the output head")
        self.layer_names = names

    def set_gguf_parameters(self, w):
        hp = self.hp
        w.add_block_count(self.n_layer)
        w.add_context_length(int(hp.get("max_position_embeddings", 4096)))
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(int(self._hp("intermediate_size")))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_rope_freq_base(self.theta)
        w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-5)))
        w.add_rope_dimension_count(self.head_dim)
        w.add_vocab_size(self.vocab_size())
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)  # as llama.cpp's converter writes it
        w.add_rope_scaling_factor(1.0)
        w.add_string(HIDDEN_ACT_KEY, self.act)
        w.add_string(HIDDEN_ACTIVATION_KEY.format(arch=gguf.MODEL_ARCH_NAMES[self.arch]), self.act)

    def expected_shapes(self):
        return decoder_shapes(self.n_layer, self.n_embd, int(self._hp("intermediate_size")), self.n_head,
                              self.n_head_kv, self.head_dim, self.vocab_size(), True, sub_norms=True)

    def modify_tensors(self, name, data):
        if name.endswith("rotary_emb.inv_freq") or name.endswith(".weight_scale"):
            return  # recomputed by the runtime / consumed with its weight
        if name == "lm_head.weight":
            return  # tied (checked in __init__)
        for suffix, t in EXTRA_NAMES.items():
            if name.endswith(suffix):
                bid = int(name.split(".")[2])
                yield TENSOR_NAMES[t].format(bid=bid) + ".weight", data
                return
        proj = name.split(".")[-2] if name.endswith(".weight") else ""
        if proj not in PROJ:
            yield from super().modify_tensors(name, data)
            return
        prefix = name[: -len("weight")]
        if data.dtype == np.uint8:
            if data.ndim != 2:
                raise ConversionError(f"packed ternary tensor {name!r} has shape {data.shape}")
            tern = unpack_ternary(data)
            if prefix + "weight_scale" not in self.layer_names:
                raise ConversionError(f"packed ternary tensor {name!r} has no {prefix}weight_scale")
            ws = float(np.asarray(self.ckpt.get(prefix + "weight_scale"), dtype=np.float32).reshape(-1)[0])
            if not np.isfinite(ws) or ws == 0:
                raise ConversionError(f"{prefix}weight_scale is {ws}")
            scale = 1.0 / ws if self.divide_scale else ws
        else:
            tern, scale = ternarize(data)
        gname = dict(super().modify_tensors(name, tern))
        (wname, w), = gname.items()
        yield wname, w
        yield wname[: -len(".weight")] + ".scale", np.array([scale], dtype=np.float32)

    def quant_type(self, name, data, outtype):
        if outtype in (QT.TQ1_0, QT.TQ2_0):
            if name == TENSOR_NAMES[T.TOKEN_EMBD] + ".weight":
                return QT.Q8_0  # the embedding (also the output head) is not ternary
            if data.ndim == 2 and data.shape[-1] % 256:
                raise ConversionError(f"{name}: {data.shape[-1]} columns are not a multiple of 256 "
                                      f"(needed by {outtype.name})")
        return super().quant_type(name, data, outtype)
