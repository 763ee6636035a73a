"""LlamaForCausalLM (Llama-3.x, SmolLM2) -> GGUF `llama`: hyper-parameters, Q/K row permutation
(llama.cpp rotates adjacent pairs, HF rotates halves) and `rope_freqs` for llama3 rope scaling.

config.json is validated before anything is computed (`read_hparams`: every value typed and bounded, head and
hidden sizes consistent, rope settings in range, both config dialects), and so is every tensor's entry in the
safetensors headers (`check_tensors`: the layers the config names, the shapes it implies), so that a config
value that disagrees with the tensors is an error, never a file that loads and computes something else."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import gguf
from gguf import MODEL_TENSOR as T, TENSOR_NAMES

from ..kernels.ops import llama3_freq_factors
from .checkpoint import (FLOAT_DTYPES, ConversionError, HFCheckpoint, cfg_bool, cfg_dict, cfg_float, cfg_int,
                         cfg_str)
from .gguf_convert import Converter, decoder_shapes, register

# bounds as the runtime reads them back from GGUF (models/config.py): a file edgellm would refuse is refused here
MAX_LAYERS = 4096
MAX_SIZE = 1 << 24
MAX_VOCAB = 1 << 22
ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class HParams:
    """A Llama-shaped decoder's hyper-parameters, validated (see read_hparams)."""
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    theta: float
    scaling: dict | None  # {"rope_type": "llama3" | "linear", "factor": ..., ...} or None
    tied: bool
    act: str


def rope_params(hp: dict, where: str = "config.json", types: tuple[str, ...] = ROPE_TYPES) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config dialect: Llama-3.2's `rope_theta` + `rope_scaling`, or
    transformers 5's `rope_parameters` (theta inside), every value checked: the scaling comes back with
    `rope_type` and typed, bounded values (llama3: factor, low/high_freq_factor, original_max_position_embeddings;
    linear: factor), or None for plain RoPE."""
    rp = cfg_dict(hp, "rope_parameters", where)
    if rp is not None:
        sc, label = rp, "rope_parameters"
        theta = cfg_float(rp, "rope_theta", f"{where}: rope_parameters",
                          cfg_float(hp, "rope_theta", where, 10000.0, 1.0, 1e12), 1.0, 1e12)
    else:
        sc, label = cfg_dict(hp, "rope_scaling", where), "rope_scaling"
        theta = cfg_float(hp, "rope_theta", where, 10000.0, 1.0, 1e12)
    if sc is None:
        return theta, None
    w = f"{where}: {label}"
    kind = sc.get("rope_type", sc.get("type"))
    kind = "default" if kind is None else kind
    if not isinstance(kind, str) or kind not in types:
        raise ConversionError(f"{w}: rope_type {kind!r} is not supported (supported: {', '.join(types)})")
    if kind == "default":
        return theta, None
    out = dict(sc, rope_type=kind, factor=cfg_float(sc, "factor", w, None, 0.0, 1e6, lo_open=True))
    if kind == "linear":
        out["factor"] = cfg_float(sc, "factor", w, None, 1e-3, 1e6)
    if kind == "llama3":
        lo = cfg_float(sc, "low_freq_factor", w, 1.0, 0.0, 1e6, lo_open=True)
        hi = cfg_float(sc, "high_freq_factor", w, 4.0, 0.0, 1e6, lo_open=True)
        if hi <= lo:
            raise ConversionError(f"{w}: high_freq_factor {hi:g} must be larger than low_freq_factor {lo:g}")
        out.update(low_freq_factor=lo, high_freq_factor=hi, original_max_position_embeddings=cfg_int(
            sc, "original_max_position_embeddings", w, 8192, 1, MAX_SIZE))
    return theta, out


def read_hparams(ckpt: HFCheckpoint, *, tied_default: bool = False, acts: tuple[str, ...] = ("silu",),
                 act_default: str = "silu", rope_types: tuple[str, ...] = ROPE_TYPES,
                 bias_keys: tuple[str, ...] = ("attention_bias", "mlp_bias")) -> HParams:
    """config.json of a Llama-shaped decoder, validated: positive integers where counts are meant (layers within
    what the runtime loads), heads that divide (kv heads divide query heads; hidden size divides into heads when
    head_dim is not given), an even head size (RoPE rotates pairs), rope settings in range (both dialects), a
    supported activation, no bias terms (edgellm's Llama has none)."""
    hp, w = ckpt.config, ckpt.config_path
    n_layer = cfg_int(hp, "num_hidden_layers", w, None, 1, MAX_LAYERS)
    n_embd = cfg_int(hp, "hidden_size", w, None, 1, MAX_SIZE)
    n_ff = cfg_int(hp, "intermediate_size", w, None, 1, MAX_SIZE)
    n_head = cfg_int(hp, "num_attention_heads", w, None, 1, n_embd)
    n_head_kv = cfg_int(hp, "num_key_value_heads", w, n_head, 1, n_head)
    if n_head % n_head_kv:
        raise ConversionError(f"{w}: num_attention_heads {n_head} is not a multiple of num_key_value_heads "
                              f"{n_head_kv}")
    if hp.get("head_dim") is None and n_embd % n_head:
        raise ConversionError(f"{w}: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head} "
                              "(and no head_dim is given)")
    head_dim = cfg_int(hp, "head_dim", w, n_embd // n_head, 2, MAX_SIZE // n_head)
    if head_dim % 2:
        raise ConversionError(f"{w}: head_dim {head_dim} is odd (RoPE rotates pairs of dimensions)")
    n_vocab = cfg_int(hp, "vocab_size", w, None, 1, MAX_VOCAB)
    n_ctx = cfg_int(hp, "max_position_embeddings", w, 2048, 1, MAX_SIZE)
    eps = cfg_float(hp, "rms_norm_eps", w, 1e-5, 0.0, 1.0, lo_open=True)
    theta, scaling = rope_params(hp, w, rope_types)
    tied = cfg_bool(hp, "tie_word_embeddings", w, tied_default)
    act = cfg_str(hp, "hidden_act", w, act_default, acts)
    for key in bias_keys:
        if cfg_bool(hp, key, w, False):
            raise ConversionError(f"{w}: {key} = true is not supported (edgellm's {ckpt.architecture} has no biases)")
    return HParams(n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, n_vocab, n_ctx, eps, theta, scaling, tied,
                   act)


def layer_tensors(h: HParams, i: int, sub_norms: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, the config keys that imply it) of layer i's tensors."""
    d, q, kv, ff = h.n_embd, h.n_head * h.head_dim, h.n_head_kv * h.head_dim, h.n_ff
    qw, kvw = "num_attention_heads x head_dim", "num_key_value_heads x head_dim"
    p = f"model.layers.{i}."
    out = {p + "input_layernorm.weight": ((d,), "hidden_size"),
           p + "post_attention_layernorm.weight": ((d,), "hidden_size"),
           p + "self_attn.q_proj.weight": ((q, d), f"{qw}, hidden_size"),
           p + "self_attn.k_proj.weight": ((kv, d), f"{kvw}, hidden_size"),
           p + "self_attn.v_proj.weight": ((kv, d), f"{kvw}, hidden_size"),
           p + "self_attn.o_proj.weight": ((d, q), f"hidden_size, {qw}"),
           p + "mlp.gate_proj.weight": ((ff, d), "intermediate_size, hidden_size"),
           p + "mlp.up_proj.weight": ((ff, d), "intermediate_size, hidden_size"),
           p + "mlp.down_proj.weight": ((d, ff), "hidden_size, intermediate_size")}
    if sub_norms:
        out[p + "self_attn.attn_sub_norm.weight"] = ((q,), qw)
        out[p + "mlp.ffn_sub_norm.weight"] = ((ff,), "intermediate_size")
    return out


def check_layers(ckpt: HFCheckpoint, n_layer: int) -> None:
    """The layers the checkpoint holds (model.layers.N.*) are exactly 0 .. num_hidden_layers - 1."""
    held = set()
    for name in ckpt.tensor_names():
        if name.startswith("model.layers."):
            idx = name.split(".")[2]
            if not idx.isdigit() or len(idx) > 6:
                raise ConversionError(f"{ckpt.file_of(name)}: tensor {name!r} has no layer number")
            held.add(int(idx))
    if held != set(range(n_layer)):
        have = f"layers 0..{max(held)} ({len(held)} layers)" if held else "no layers"
        if held and held != set(range(len(held))):
            have = f"{len(held)} layers numbered {sorted(held)[:3]}..{max(held)}"
        raise ConversionError(f"{ckpt.config_path}: num_hidden_layers = {n_layer}, but the checkpoint holds {have}")


def check_tensors(ckpt: HFCheckpoint, h: HParams, sub_norms: bool = False, special=None) -> None:
    """Every tensor's header entry against the config, before any tensor data is read: the layers, each
    expected tensor present with the implied shape and a float dtype, nothing unexpected. `special(name, dtype,
    shape, expected)` may accept a tensor stored another way (BitNet's packed weights); it returns True if it did."""
    check_layers(ckpt, h.n_layer)
    d, V = h.n_embd, h.n_vocab
    expected = {"model.embed_tokens.weight": ((V, d), "vocab_size, hidden_size"),
                "model.norm.weight": ((d,), "hidden_size")}
    if not h.tied:
        expected["lm_head.weight"] = ((V, d), "vocab_size, hidden_size")
    for i in range(h.n_layer):
        expected.update(layer_tensors(h, i, sub_norms))
    optional = {"lm_head.weight": ((V, d), "vocab_size, hidden_size")} if h.tied else {}
    names = set(ckpt.tensor_names())
    for name in sorted(names):
        f, dt, shape = ckpt.file_of(name), ckpt.dtype(name), ckpt.shape(name)
        exp = expected.get(name) or optional.get(name)
        if exp is None:
            if name.endswith("rotary_emb.inv_freq") and dt in FLOAT_DTYPES:
                continue  # recomputed from rope_theta
            if special is not None and special(name, dt, shape, None):
                continue
            raise ConversionError(f"{f}: unexpected tensor {name!r} (not part of a {ckpt.architecture} with this "
                                  "config.json)")
        if special is not None and special(name, dt, shape, exp[0]):
            continue
        if dt not in FLOAT_DTYPES:
            raise ConversionError(f"{f}: tensor {name!r} has dtype {dt}, expected a floating-point type")
        if shape != exp[0]:
            raise ConversionError(f"{f}: tensor {name!r} has shape {list(shape)}, but config.json implies "
                                  f"{list(exp[0])} ({exp[1]})")
    missing = sorted(set(expected) - names)
    if missing:
        raise ConversionError(f"{ckpt.path}: the checkpoint lacks {len(missing)} tensor(s) config.json implies, "
                              f"e.g. {', '.join(missing[:3])}")


def llama3_factors(ckpt: HFCheckpoint, h: HParams) -> np.ndarray | None:
    """The `rope_freqs` tensor of llama3 rope scaling (None for other kinds), checked finite and positive."""
    s = h.scaling
    if not s or s["rope_type"] != "llama3":
        return None
    with np.errstate(all="ignore"):
        ff = llama3_freq_factors(h.head_dim, h.theta, s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                 s["original_max_position_embeddings"])
    if not (np.isfinite(ff).all() and (ff > 0).all()):
        raise ConversionError(f"{ckpt.config_path}: rope_scaling gives rope frequency factors that are not finite "
                              "and positive")
    return ff


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout -> llama.cpp's interleaved pairs, per head (rows of q_proj/k_proj)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_decoder_parameters(w, c) -> None:
    """The decoder's hyperparameters as llama.cpp reads them, for a converter `c` of a Llama-shaped model (Llama,
    BitNet): blocks, context, widths, heads, rope base and dimensions, norm epsilon, vocabulary size."""
    h = c.h
    w.add_block_count(c.n_layer)
    w.add_context_length(h.n_ctx_train)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(h.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    w.add_rope_freq_base(c.theta)
    w.add_layer_norm_rms_eps(h.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size())


@register("LlamaForCausalLM")
class LlamaConverter(Converter):
    arch = gguf.MODEL_ARCH.LLAMA

    def __init__(self, ckpt):
        h = read_hparams(ckpt)  # before the base class builds anything from the layer count
        check_tensors(ckpt, h)
        super().__init__(ckpt)
        self.h = h
        self.n_head, self.n_head_kv, self.n_embd, self.head_dim = h.n_head, h.n_head_kv, h.n_embd, h.head_dim
        self.tied = h.tied
        self.theta, self.scaling = h.theta, h.scaling
        self.rope_freqs = llama3_factors(ckpt, h)

    def set_gguf_parameters(self, w):
        write_decoder_parameters(w, self)
        if self.head_dim != self.n_embd // self.n_head:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        if self.scaling and self.scaling["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(self.scaling["factor"])

    def expected_shapes(self):
        h = self.h
        return decoder_shapes(self.n_layer, self.n_embd, h.n_ff, self.n_head, self.n_head_kv, self.head_dim,
                              self.vocab_size(), self.tied)

    def vocab_size(self) -> int:
        return self.h.n_vocab

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
        if self.rope_freqs is not None:
            yield TENSOR_NAMES[T.ROPE_FREQS] + ".weight", self.rope_freqs
