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

import math

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T, TENSOR_NAMES

from .checkpoint import FLOAT_DTYPES, ConversionError, HFCheckpoint, cfg_dict, cfg_str
from .gguf_convert import Converter, decoder_shapes, register
from .llama import HParams, read_hparams, write_decoder_parameters
from .llama import check_tensors as check_llama_tensors

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


def check_tensors(ckpt: HFCheckpoint, h: HParams) -> set[str]:
    """The checkpoint's header entries against the config (llama's check with the sub-norms), where a projection
    is either a float matrix (ternarized here) or transformers' packed uint8 (rows / 4, cols) with a one-element
    float `weight_scale` beside it. Returns the names of the packed projections."""
    packed: set[str] = set()
    scales: dict[str, tuple[str, tuple[int, ...]]] = {}

    def special(name, dtype, shape, expected) -> bool:
        if name.endswith(".weight_scale"):
            scales[name] = (dtype, shape)
            return True
        if dtype == "U8" and expected is not None and name.split(".")[-2] in PROJ:
            r, c = expected
            if r % 4 or shape != (r // 4, c):
                raise ConversionError(f"{ckpt.file_of(name)}: packed ternary tensor {name!r} has shape "
                                      f"{list(shape)}, but config.json implies {[r, c]} packed as {[r // 4, c]}")
            packed.add(name)
            return True
        return False

    check_llama_tensors(ckpt, h, sub_norms=True, special=special)
    for s, (dtype, shape) in scales.items():
        w = s[: -len("weight_scale")] + "weight"
        if w not in packed:
            raise ConversionError(f"{ckpt.file_of(s)}: unexpected tensor {s!r} (a weight_scale goes with a packed "
                                  "uint8 ternary weight)")
        if dtype not in FLOAT_DTYPES or math.prod(shape) != 1:
            raise ConversionError(f"{ckpt.file_of(s)}: tensor {s!r} has dtype {dtype} and shape {list(shape)}, "
                                  "expected one floating-point value")
    for w in sorted(packed):
        if w[: -len("weight")] + "weight_scale" not in scales:
            raise ConversionError(f"{ckpt.file_of(w)}: packed ternary tensor {w!r} has no "
                                  f"{w[: -len('weight')]}weight_scale")
    return packed


@register("BitNetForCausalLM")
class BitNetConverter(Converter):
    arch = gguf.MODEL_ARCH.BITNET

    def __init__(self, ckpt):
        h = read_hparams(ckpt, tied_default=True, acts=("relu2", "silu"), act_default="relu2",
                         rope_types=("default",), bias_keys=("attention_bias",))
        w = ckpt.config_path
        if h.head_dim != h.n_embd // h.n_head or h.n_embd % h.n_head:
            raise ConversionError(f"{w}: head_dim {h.head_dim} is not hidden_size / num_attention_heads "
                                  f"({h.n_embd} / {h.n_head}), which BitNet requires")
        if not h.tied:
            raise ConversionError(f"{w}: tie_word_embeddings = false is not supported: llama.cpp's bitnet arch "
                                  "uses the token embedding as the output head")
        qc = cfg_dict(ckpt.config, "quantization_config", w) or {}
        if qc:
            wq = f"{w}: quantization_config"
            cfg_str(qc, "quant_method", wq, None, ("bitnet",))
            # transformers' BitLinear divides its output by weight_scale; AutoBitLinear multiplies by it
            linear = cfg_str(qc, "linear_class", wq, "bitlinear", ("bitlinear", "autobitlinear"))
            self.divide_scale = linear == "bitlinear"
        else:
            self.divide_scale = True
        self.packed = check_tensors(ckpt, h)
        super().__init__(ckpt)
        self.h = h
        self.n_head, self.n_head_kv, self.n_embd, self.head_dim = h.n_head, h.n_head_kv, h.n_embd, h.head_dim
        self.theta, self.act = h.theta, h.act
        self.layer_names = set(ckpt.tensor_names())

    def set_gguf_parameters(self, w):
        write_decoder_parameters(w, self)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)  # as llama.cpp's converter writes it
        w.add_rope_scaling_factor(1.0)
        w.add_string(HIDDEN_ACT_KEY, self.act)
        w.add_string(HIDDEN_ACTIVATION_KEY.format(arch=gguf.MODEL_ARCH_NAMES[self.arch]), self.act)

    def expected_shapes(self):
        return decoder_shapes(self.n_layer, self.n_embd, self.h.n_ff, self.n_head, self.n_head_kv, self.head_dim,
                              self.vocab_size(), True, sub_norms=True)

    def vocab_size(self) -> int:
        return self.h.n_vocab

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
        if data.dtype == np.uint8:  # shape and weight_scale checked by check_tensors
            tern = unpack_ternary(data)
            if (tern > 1).any():
                raise ConversionError(f"{self.ckpt.file_of(name)}: packed ternary tensor {name!r} holds the code 3, "
                                      "which is no ternary value (corrupted data?)")
            ws = float(np.asarray(self.ckpt.get(prefix + "weight_scale"), dtype=np.float32).reshape(-1)[0])
            if not np.isfinite(ws) or ws == 0 or not np.isfinite(1.0 / ws):
                raise ConversionError(f"{self.ckpt.file_of(name)}: {prefix}weight_scale is {ws} (a finite, non-zero "
                                      "scale expected)")
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
