"""One ONNX decoder graph builder for the architectures optimum's exporter does not know (BitNet now;
the pruned / MLA / linearized variants later).

A small torch module mirrors the Hugging Face forward with an explicit KV-cache interface and is traced
with `torch.onnx.export`. The graph's inputs and outputs are named as optimum names them, so the
runtime (and anything that speaks optimum's convention) drives every exported decoder the same way:

    input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
    past_key_values.{i}.key / .value (B, n_kv, P, head_dim) float32
      -> logits (B, T, n_vocab), present.{i}.key / .value (B, n_kv, P+T, head_dim)

What differs between architectures is the *block*: `build_decoder(hf_model, linear=..., block=...)`
takes the HF model and two factories. `linear(module)` turns each HF linear layer into the torch
module that computes what it computes (a plain matmul, or BitNet's ternary weights with per-token
int8 activations); `block(layer, linear, cfg)` builds one decoder layer from the HF layer. The shared
parts — embedding, rotary tables (any HF rope type: the HF model's own `inv_freq` and
`attention_scaling` are used), causal + padding mask, KV concatenation, GQA, final norm, LM head —
are written once here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

# torch.finfo(float32).min, as transformers fills masked attention scores
_MASKED = float(np.finfo(np.float32).min)


# ---------------------------------------------------------------------------- pieces
class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, as LlamaRMSNorm / BitNetRMSNorm (f32)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.eps = float(eps)

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.eps))


def norm_from(hf_norm: nn.Module) -> RMSNorm:
    eps = getattr(hf_norm, "variance_epsilon", getattr(hf_norm, "eps", 1e-6))
    return RMSNorm(hf_norm.weight, eps)


class Linear(nn.Module):
    """y = x @ W.T (+ b): a plain f32 matmul (weight-only int4 can be applied to the ONNX graph later)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class _MatMulInteger(torch.autograd.Function):
    """int8 (..., K) @ int8 (K, N) -> int32, exported as ONNX MatMulInteger (MLAS's int8 GEMM/GEMV in
    onnxruntime: a quarter of the f32 weight bytes per token, integer dot products)."""

    @staticmethod
    def forward(ctx, a, b):
        return torch.matmul(a.to(torch.int32), b.to(torch.int32))

    @staticmethod
    def symbolic(g, a, b):
        return g.op("MatMulInteger", a, b)


class TernaryLinear(nn.Module):
    """BitNet b1.58's linear: ternary weights W in {-1, 0, 1} (an int8 initializer, K-major) with one
    per-tensor scale; activations quantized per token to int8 by absmax as transformers' BitNet does:
        s = 127 / max(|x|, 1e-5);  q = clip(round(x * s), -128, 127);  y = (q @ W^T) * scale / s
    q @ W^T is an exact integer sum (MatMulInteger). `pre_norm`: the optional RMSNorm some BitNet
    configs apply inside the linear layer (use_rms_norm)."""

    def __init__(self, weight_int8: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                 pre_norm: nn.Module | None = None):
        super().__init__()
        self.register_buffer("weight_t", weight_int8.detach().to(torch.int8).t().contiguous())  # (K, N)
        self.scale = float(scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.pre_norm = pre_norm

    def forward(self, x):
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        q = (x * s).round().clamp(-128.0, 127.0).to(torch.int8)
        y = _MatMulInteger.apply(q, self.weight_t).float() / s * self.scale
        return y if self.bias is None else y + self.bias


def out_features(m: nn.Module) -> int:
    """Output width of a builder linear (Linear or TernaryLinear)."""
    return int(m.weight.shape[0]) if isinstance(m, Linear) else int(m.weight_t.shape[1])


def plain_linear(module: nn.Module) -> nn.Module:
    """The linear factory for dense models: an nn.Linear as a plain matmul."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected nn.Linear, got {type(module).__name__}")
    return Linear(module.weight, module.bias)


class _Reshape(torch.autograd.Function):
    """x.reshape(shape) with ONNX Reshape semantics (0 keeps that input dimension, -1 is inferred),
    exported as one Reshape with a constant shape: no Shape/Gather/Concat arithmetic per reshape."""

    @staticmethod
    def forward(ctx, x, shape):
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(list(shape), dtype=torch.int64)))


def reshape(x, *shape: int):
    return _Reshape.apply(x, tuple(shape))


def rotate_half(x, head_dim: int):
    h = head_dim // 2  # a Python int: constant slices in the graph
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    """GQA self-attention with rotary embeddings over an explicit cache: returns the output and the
    new (past + current) keys and values. The query heads that share a kv head attend as one group
    (B, n_kv, n_rep, T, D) against (B, n_kv, 1, S, D), so the cache is never copied per query head.
    `sub_norm` (BitNet's attn_sub_norm) normalises the heads' output before o_proj."""

    def __init__(self, q, k, v, o, n_head: int, n_kv: int, head_dim: int, sub_norm: nn.Module | None = None,
                 scaling: float | None = None):
        super().__init__()
        self.q, self.k, self.v, self.o = q, k, v, o
        self.n_head, self.n_kv, self.head_dim = n_head, n_kv, head_dim
        self.sub_norm = sub_norm
        self.scaling = head_dim ** -0.5 if scaling is None else scaling

    def forward(self, x, cos, sin, mask, past_k, past_v):
        """x (B, T, E); cos/sin (B, 1, T, D); mask (B, 1, T, S) additive; past (B, n_kv, P, D), S = P + T."""
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        q = reshape(self.q(x), 0, -1, H, D).transpose(1, 2)                     # (B, H, T, D)
        k = reshape(self.k(x), 0, -1, Hkv, D).transpose(1, 2)                   # (B, Hkv, T, D)
        v = reshape(self.v(x), 0, -1, Hkv, D).transpose(1, 2)
        q = q * cos + rotate_half(q, D) * sin
        k = k * cos + rotate_half(k, D) * sin
        k = torch.cat([past_k, k], dim=2)                                       # (B, Hkv, S, D)
        v = torch.cat([past_v, v], dim=2)
        qg = reshape(q, 0, Hkv, H // Hkv, -1, D)                                # (B, Hkv, rep, T, D)
        att = torch.matmul(qg, k.unsqueeze(2).transpose(3, 4)) * self.scaling + mask.unsqueeze(2)
        att = torch.softmax(att, dim=-1)                                        # (B, Hkv, rep, T, S)
        out = reshape(torch.matmul(att, v.unsqueeze(2)), 0, H, -1, D)           # (B, H, T, D)
        out = reshape(out.transpose(1, 2), 0, -1, H * D)                        # (B, T, H*D)
        if self.sub_norm is not None:
            out = self.sub_norm(out)
        return self.o(out), k, v

    def cache_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, width) of this layer's past key and past value inputs."""
        return (self.n_kv, self.head_dim), (self.n_kv, self.head_dim)


def rope_pairs(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angles of Rotary's tables (B, 1, T, dr; first half used)."""
    h = x.shape[-1] // 2
    c, s = cos[..., :h], sin[..., :h]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


class LatentAttention(nn.Module):
    """Multi-head latent attention (the MLA variant, converters/mla.py) over a latent cache: the past "key" input is
    c_kv (B, 1, P, r_kv), the past "value" input the rotated shared rope key k_pe (B, 1, P, dr). Keys and values
    are decompressed per head from the latent (k_b, v_b: (H, dn or dv, r_kv)); rope on adjacent pairs of the
    last dr dims of each query head and of k_pe."""

    def __init__(self, q_a, q_b, kv_a, k_b, v_b, o, n_head: int, dn: int, dr: int, dv: int, r_kv: int):
        super().__init__()
        self.q_a, self.q_b, self.kv_a, self.o = q_a, q_b, kv_a, o
        self.k_b = nn.Parameter(k_b.detach().float().clone(), requires_grad=False)
        self.v_b = nn.Parameter(v_b.detach().float().clone(), requires_grad=False)
        self.n_head, self.dn, self.dr, self.dv, self.r_kv = n_head, dn, dr, dv, r_kv
        self.scaling = (dn + dr) ** -0.5

    def forward(self, x, cos, sin, mask, past_c, past_pe):
        H, dn, dr, dv, r = self.n_head, self.dn, self.dr, self.dv, self.r_kv
        q = reshape(self.q_b(self.q_a(x)), 0, -1, H, dn + dr).transpose(1, 2)   # (B, H, T, dn + dr)
        q_nope, q_pe = q[..., :dn], rope_pairs(q[..., dn:], cos, sin)
        ckv = self.kv_a(x).unsqueeze(1)                                          # (B, 1, T, r + dr)
        c = torch.cat([past_c, ckv[..., :r]], dim=2)                             # (B, 1, S, r)
        k_pe = torch.cat([past_pe, rope_pairs(ckv[..., r:], cos, sin)], dim=2)  # (B, 1, S, dr)
        k_nope = torch.matmul(c, self.k_b.transpose(1, 2))                       # (B, H, S, dn)
        v = torch.matmul(c, self.v_b.transpose(1, 2))                            # (B, H, S, dv)
        att = (torch.matmul(q_nope, k_nope.transpose(2, 3)) + torch.matmul(q_pe, k_pe.transpose(2, 3))) * self.scaling
        att = torch.softmax(att + mask, dim=-1)                                  # (B, H, T, S)
        out = reshape(torch.matmul(att, v).transpose(1, 2), 0, -1, H * dv)       # (B, T, H*dv)
        return self.o(out), c, k_pe

    def cache_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (1, self.r_kv), (1, self.dr)


class GatedMLP(nn.Module):
    """down(sub_norm(act(gate(x)) * up(x))); sub_norm is BitNet's ffn_sub_norm (None for Llama)."""

    def __init__(self, gate, up, down, act: Callable, sub_norm: nn.Module | None = None):
        super().__init__()
        self.gate, self.up, self.down, self.act, self.sub_norm = gate, up, down, act, sub_norm

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x)
        if self.sub_norm is not None:
            h = self.sub_norm(h)
        return self.down(h)


def activation(name: str) -> Callable:
    acts = {"silu": nn.functional.silu, "relu2": lambda x: torch.relu(x).square(),
            "gelu": nn.functional.gelu, "relu": torch.relu}
    if name not in acts:
        raise ValueError(f"activation {name!r} is not supported by the ONNX builder (supported: {', '.join(acts)})")
    return acts[name]


class PreNormBlock(nn.Module):
    """h += attn(norm1(h)); h += mlp(norm2(h)) — the Llama-family layer shape."""

    def __init__(self, attn_norm, attn, ffn_norm, mlp):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.mlp = attn_norm, attn, ffn_norm, mlp

    def forward(self, h, cos, sin, mask, past_k, past_v):
        a, k, v = self.attn(self.attn_norm(h), cos, sin, mask, past_k, past_v)
        h = h + a
        return h + self.mlp(self.ffn_norm(h)), k, v


def llama_block(layer: nn.Module, linear: Callable, cfg) -> PreNormBlock:
    """A Llama-family decoder layer (LlamaDecoderLayer, BitNetDecoderLayer: sub-norms are picked up
    when the HF layer has them). Head counts are read from the layer's own projections, so layers of
    different widths (a pruned model) each get theirs."""
    at, mlp = layer.self_attn, layer.mlp
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    sub_a = getattr(at, "attn_sub_norm", None)
    sub_f = getattr(mlp, "ffn_sub_norm", None)
    q, k = linear(at.q_proj), linear(at.k_proj)
    attn = Attention(q, k, linear(at.v_proj), linear(at.o_proj), out_features(q) // head_dim,
                     out_features(k) // head_dim, head_dim,
                     sub_norm=norm_from(sub_a) if sub_a is not None else None, scaling=getattr(at, "scaling", None))
    ffn = GatedMLP(linear(mlp.gate_proj), linear(mlp.up_proj), linear(mlp.down_proj), activation(cfg.hidden_act),
                   sub_norm=norm_from(sub_f) if sub_f is not None else None)
    return PreNormBlock(norm_from(layer.input_layernorm), attn, norm_from(layer.post_attention_layernorm), ffn)


class Rotary(nn.Module):
    """cos/sin tables (B, 1, T, head_dim) for position ids, from the HF model's inv_freq and attention_scaling
    (so default, linear, llama3, yarn ... rope types come out as the HF model computes them)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.scaling = float(attention_scaling)

    def forward(self, position_ids):
        freqs = position_ids[:, None, :, None].float() * self.inv_freq          # (B, 1, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling


class DecoderGraph(nn.Module):
    """embedding -> blocks (each over its own past k/v) -> final norm -> LM head."""

    def __init__(self, embed: torch.Tensor, blocks: list[nn.Module], norm: nn.Module, lm_head: nn.Module,
                 rotary: Rotary):
        super().__init__()
        self.embed = nn.Parameter(embed.detach().float().clone(), requires_grad=False)
        self.blocks = nn.ModuleList(blocks)
        self.norm, self.lm_head, self.rotary = norm, lm_head, rotary
        # per layer (heads, width) of the past key and value inputs: a pruned model's layers differ
        self.cache_shapes = [b.attn.cache_shapes() for b in blocks]

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        h = nn.functional.embedding(input_ids, self.embed)                      # (B, T, E)
        cos, sin = self.rotary(position_ids)
        # causal by index (query i of T sits at P+i) and the caller's padding mask, additive
        T = input_ids.shape[1]
        S = attention_mask.shape[1]
        k_pos = torch.arange(S, device=input_ids.device)
        q_pos = torch.arange(T, device=input_ids.device) + (S - T)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, torch.zeros((), dtype=torch.float32), torch.full((), _MASKED))
        presents = []
        for i, blk in enumerate(self.blocks):
            h, k, v = blk(h, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.lm_head(self.norm(h)), *presents)


# ---------------------------------------------------------------------------- building
def build_decoder(hf_model: nn.Module, linear: Callable = plain_linear,
                  block: Callable = llama_block, rotary: Rotary | None = None) -> DecoderGraph:
    """A `DecoderGraph` computing what `hf_model` (a *ForCausalLM with .model.embed_tokens, .layers, .norm,
    .rotary_emb and .lm_head; or a variant's student with those directly on it) computes. `linear` and `block` are
    the per-architecture parts; `rotary` the rope tables when the model has no HF rotary_emb."""
    cfg = hf_model.config
    base = getattr(hf_model, "model", hf_model)
    blocks = [block(layer, linear, cfg) for layer in base.layers]
    if rotary is None:
        rot = base.rotary_emb
        rotary = Rotary(rot.inv_freq, getattr(rot, "attention_scaling", 1.0))
    lm = hf_model.lm_head
    # the LM head stays a plain matmul (BitNet keeps lm_head in full precision too)
    head = Linear(lm.weight, getattr(lm, "bias", None)) if isinstance(lm, nn.Linear) else linear(lm)
    return DecoderGraph(base.embed_tokens.weight, blocks, norm_from(base.norm), head, rotary)


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "attention_mask", "position_ids"]
    outs = ["logits"]
    for i in range(n_layer):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def export_decoder(graph: DecoderGraph, path: str | Path, opset: int = 17,
                   external_over: int = 1800 << 20) -> Path:
    """Trace `graph` to `path`. Weights over `external_over` bytes in total (protobuf's 2 GiB limit) go
    to one external data file beside it, `<name>_data`, as optimum writes them."""
    import shutil
    import warnings
    import onnx
    path = Path(path)
    B, T, P = 2, 3, 4  # distinct sizes so that no dynamic dimension is traced as a constant
    ids = torch.zeros((B, T), dtype=torch.int64)
    am = torch.ones((B, P + T), dtype=torch.int64)
    pos = torch.arange(P, P + T, dtype=torch.int64)[None].expand(B, T).contiguous()
    past = []
    for (hk, dk), (hv, dv) in graph.cache_shapes:
        past += [torch.zeros((B, hk, P, dk)), torch.zeros((B, hv, P, dv))]
    ins, outs = io_names(graph.n_layer)
    dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"},
           "logits": {0: "batch_size", 1: "sequence_length"}}
    for n in ins[3:]:
        dyn[n] = {0: "batch_size", 2: "past_sequence_length"}
    for n in outs[1:]:
        dyn[n] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
    graph.eval()
    # torch writes a model over 2 GiB as one file per tensor: trace into a scratch folder, then lay
    # the result out as one graph file (+ one data file)
    scratch = path.parent / f".{path.name}.trace"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: the sizes are traced
            torch.onnx.export(graph, (ids, am, pos, *past), str(scratch / path.name), input_names=ins,
                              output_names=outs, dynamic_axes=dyn, opset_version=opset, do_constant_folding=True,
                              dynamo=False)
        m = onnx.load(str(scratch / path.name))  # external tensors, if any, are read in
        big = sum(len(t.raw_data) for t in m.graph.initializer) > external_over
        onnx.save_model(m, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path
