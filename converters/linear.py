"""Variant `linear` (LAWCAT-style linearisation): every softmax attention of a Llama becomes normalised gated linear
attention with a causal depthwise convolution over queries and keys. This file holds the torch reference
implementation (the student: healing trains it, the ONNX export traces it, the runtime's logits are tested against
it), the transform from a teacher, the two healing stages and the GGUF writer (architecture `edgellm-linear`, which
only edgellm runs: llama.cpp has no such graph).

Per layer, with x the normed hidden state, q/k/v/o the teacher's projections and K the conv kernel size:
    q̃ = conv_q(W_q x), k̃ = conv_k(W_k x)          causal depthwise Conv1D over tokens, per channel (no bias)
    α_t = max(σ(W_α x_t + b_α), e^-4) ∈ (0, 1)^d      data-dependent decay, one per kv head and key dimension
    S_t = diag(α_t) S_{t-1} + φ(k̃_t)ᵀ v_t,  z_t = diag(α_t) z_{t-1} + φ(k̃_t)
    o_t = φ(q̃_t) S_t / (φ(q̃_t) · z_t + eps),  out = W_o o
Choices (the paper's gate and φ are not public in code; measured in the README):
  - φ: "elu1" (elu(x) + 1, elementwise; default) or "softmax" (over the head dimension, Hedgehog-like); shared by q
    and k, positive, so the normaliser φ(q)·z is > 0.
  - no RoPE: position comes from the convolution and the decay (rotary features do not make φ(q)·φ(k) relative).
    The q/k rows therefore stay in HF's order; nothing is permuted.
  - GQA: the state is kept per kv head (S is (Hkv, d, d)): the group's query heads read one state, as they read one
    K/V in the teacher; the gate is per kv head and key dimension (a full-rank W_α: Hkv·d × n_embd).
  - initialisation: q/k/v/o from the teacher; conv = identity (a delta at the current token); W_α = 0 and b_α spread
    log-uniformly over the key dimensions so that 1 - α runs from 1/16 to 1/1024 (multi-scale memory, α ≈ 1).
Healing (`--heal N`): stage 1, N // 2 steps matching every layer's attention output to the teacher's on the
teacher's own layer inputs (MSE normalised by the output power, all layers at once; attention parameters only, lr
10 x --lr); stage 2, the remaining steps of end-to-end KL distillation (converters/variant.py `distill`, attention
parameters only).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .checkpoint import ConversionError, HFCheckpoint
from .variant import Context, Variant, distill, register_variant, write_gguf

ARCH = "edgellm-linear"
FEATURE_MAPS = ("elu1", "softmax")
DEFAULT_CONV = 4
DEFAULT_CHUNK = 16  # torch's chunk (training); the runtime's chunk is its own (metadata chunk_size)
MAX_TRAIN_CHUNK = 16
LOG_DECAY_MIN = -4.0  # log α_t is clamped here (α ≥ 0.018: forgetting at once); keeps torch's chunked form finite
RUNTIME_CHUNK = 32
EPS = 1e-6
GATE_MIN, GATE_MAX = 1 / 16, 1 / 1024  # initial 1 - α over the key dimensions (log-uniform)


def _torch():
    import torch
    return torch


# ---------------------------------------------------------------- the math (torch)
def phi(x, kind: str):
    torch = _torch()
    if kind == "elu1":
        return torch.nn.functional.elu(x) + 1
    if kind == "softmax":
        return torch.softmax(x, -1)
    raise ConversionError(f"unknown feature map {kind!r} (choose from {', '.join(FEATURE_MAPS)})")


def gla_recurrent(fq, fk, v, la, eps: float = EPS, state=None):
    """Token by token. fq (B, H, T, d), fk / la (B, Hkv, T, d), v (B, Hkv, T, dv); state (S (B, Hkv, d, dv),
    z (B, Hkv, d)) or None -> (out (B, H, T, dv), (S, z))."""
    torch = _torch()
    B, H, T, d = fq.shape
    Hkv, dv = fk.shape[1], v.shape[-1]
    G = H // Hkv
    S, z = state if state is not None else (fq.new_zeros(B, Hkv, d, dv), fq.new_zeros(B, Hkv, d))
    q = fq.reshape(B, Hkv, G, T, d)
    outs = []
    for t in range(T):
        a = la[:, :, t].exp()
        S = a[..., None] * S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = a * z + fk[:, :, t]
        qt = q[:, :, :, t]  # (B, Hkv, G, d)
        num = qt @ S  # (B, Hkv, G, dv)
        den = (qt * z[:, :, None]).sum(-1, keepdim=True)
        outs.append(num / (den + eps))
    return torch.stack(outs, 3).reshape(B, H, T, dv), (S, z)


def gla_chunked(fq, fk, v, la, eps: float = EPS, chunk: int = DEFAULT_CHUNK, state=None):
    """The chunked parallel form (same arguments and result as gla_recurrent). Inside a chunk the pair (t, s ≤ t)
    weighs (φq_t e^{b_t}) · (φk_s e^{-b_s}) with b the cumulative log decay from the chunk start: two matmuls.
    e^{-b_s} stays finite because every log decay is ≥ LOG_DECAY_MIN and a chunk is at most MAX_TRAIN_CHUNK
    tokens (|b| ≤ 64); the state crosses chunk boundaries with exponents ≤ 0."""
    torch = _torch()
    F = torch.nn.functional
    if chunk * -LOG_DECAY_MIN > 64:
        raise ConversionError(f"chunk {chunk} is too long for the exact factorised form (at most {MAX_TRAIN_CHUNK})")
    B, H, T, d = fq.shape
    Hkv, dv = fk.shape[1], v.shape[-1]
    G = H // Hkv
    C = chunk
    pad = (-T) % C
    if pad:  # padded tokens: φk = 0 and no decay, so they leave the state as it is
        fq, fk, v, la = (F.pad(a, (0, 0, 0, pad)) for a in (fq, fk, v, la))
    n = (T + pad) // C
    k = fk.reshape(B, Hkv, n, C, d)
    vv = v.reshape(B, Hkv, n, C, dv)
    b = la.reshape(B, Hkv, n, C, d).cumsum(-2)
    qe = fq.reshape(B, Hkv, G, n, C, d) * b.exp()[:, :, None]
    ke = k * (-b).exp()
    mask = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    A = (qe @ ke[:, :, None].transpose(-1, -2)).masked_fill(~mask, 0.0)  # (B, Hkv, G, n, C, C)
    num = A @ vv[:, :, None]  # (B, Hkv, G, n, C, dv)
    den = A.sum(-1)  # (B, Hkv, G, n, C)
    S0, z0 = state if state is not None else (fq.new_zeros(B, Hkv, d, dv), fq.new_zeros(B, Hkv, d))
    # the state at each chunk start, all chunks at once: S_j = e^{P_j} S0 + Σ_{j'<j} e^{P_j - Q_j'} U_j', with U_j'
    # chunk j''s own contribution at its end, Q the cumulative log decay through a chunk, P = Q - the chunk's own
    last = b[:, :, :, -1]  # (B, Hkv, n, d)
    kd = k * (last[:, :, :, None, :] - b).exp()
    U, u = kd.transpose(-1, -2) @ vv, kd.sum(-2)  # (B, Hkv, n, d, dv), (B, Hkv, n, d)
    Q = last.cumsum(2)
    P = Q - last
    before = torch.ones(n, n, dtype=torch.bool, device=fq.device).tril(-1)[:, :, None]  # j' < j
    W = torch.where(before, P[:, :, :, None, :] - Q[:, :, None, :, :], float("-inf")).exp()  # (B, Hkv, j, j', d)
    S = torch.einsum("bhjki,bhkie->bhjie", W, U) + P.exp()[..., None] * S0[:, :, None]
    z = torch.einsum("bhjki,bhki->bhji", W, u) + P.exp() * z0[:, :, None]
    num = num + qe @ S[:, :, None]
    den = den + (qe * z[:, :, None, :, None, :]).sum(-1)
    o = (num / (den[..., None] + eps)).reshape(B, H, n * C, dv)[:, :, :T]
    wl = (Q[:, :, -1:] - Q).exp()  # (B, Hkv, n, d): decay from each chunk's end to the last
    S_end = Q[:, :, -1].exp()[..., None] * S0 + (wl[..., None] * U).sum(2)
    z_end = Q[:, :, -1].exp() * z0 + (wl * u).sum(2)
    return o, (S_end, z_end)


def gla_parallel(fq, fk, v, la, eps: float = EPS, state=None):
    """The whole input as one chunk (same arguments and result as gla_recurrent, state required): no Python loop
    and no size-dependent constants, so a traced graph (ONNX) takes any length T; memory O(T² d) per call."""
    torch = _torch()
    S, z = state
    B, H, T, d = fq.shape
    Hkv, dv = fk.shape[1], v.shape[-1]
    q = fq.reshape(B, Hkv, H // Hkv, T, d)
    b = la.cumsum(-2)  # (B, Hkv, T, d)
    mask = torch.ones_like(b[0, 0, :, :1]).expand(b.shape[-2], b.shape[-2]).tril().bool()[:, :, None]
    D = torch.where(mask, b[..., :, None, :] - b[..., None, :, :], torch.full_like(b[0, 0, :1, :1], -1e30)[:, :, None])
    A = torch.einsum("bhgtd,bhtsd->bhgts", q, D.exp() * fk[..., None, :, :])
    qd = q * b.exp()[:, :, None]
    num = A @ v[:, :, None] + qd @ S[:, :, None]
    den = A.sum(-1) + (qd * z[:, :, None, None, :]).sum(-1)
    o = (num / (den[..., None] + eps)).reshape(B, H, T, dv)
    last = b[:, :, -1]
    kd = fk * (last[:, :, None, :] - b).exp()
    return o, (last.exp()[..., None] * S + kd.transpose(-1, -2) @ v, last.exp() * z + kd.sum(-2))


def causal_conv(x, w, buf=None):
    """x (B, T, C), w (C, K), buf (B, K-1, C) the inputs before x (None: zeros) -> (out (B, T, C), new buf)."""
    torch = _torch()
    B, T, Cn = x.shape
    K = w.shape[1]
    if buf is None:
        buf = x.new_zeros(B, K - 1, Cn)
    full = torch.cat([buf, x], 1)  # (B, K-1+T, C)
    out = torch.nn.functional.conv1d(full.transpose(1, 2), w[:, None, :], groups=Cn).transpose(1, 2)
    return out, full[:, full.shape[1] - (K - 1):]


# ---------------------------------------------------------------- the student's attention
def _make_attention_class():
    torch = _torch()
    nn = torch.nn

    class LinearAttention(nn.Module):
        """Drop-in for LlamaAttention (same call, returns (out, None)); `step` runs with an explicit state."""

        def __init__(self, attn, n_embd, n_head, n_head_kv, head_dim, conv_kernel=DEFAULT_CONV, feature_map="elu1",
                     chunk=DEFAULT_CHUNK, eps=EPS):
            super().__init__()
            self.n_head, self.n_head_kv, self.head_dim = n_head, n_head_kv, head_dim
            self.K, self.feature_map, self.chunk, self.eps = conv_kernel, feature_map, chunk, eps
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
            dev = self.q_proj.weight.device
            qc = torch.zeros(n_head * head_dim, conv_kernel, device=dev)
            qc[:, -1] = 1
            kc = torch.zeros(n_head_kv * head_dim, conv_kernel, device=dev)
            kc[:, -1] = 1
            self.q_conv, self.k_conv = nn.Parameter(qc), nn.Parameter(kc)
            self.gate = nn.Linear(n_embd, n_head_kv * head_dim, bias=True, device=dev)
            one_minus = np.exp(np.linspace(math.log(GATE_MIN), math.log(GATE_MAX), head_dim))
            bias = np.log((1 - one_minus) / one_minus)  # logit(α)
            with torch.no_grad():
                self.gate.weight.zero_()
                self.gate.bias.copy_(torch.tensor(np.tile(bias, n_head_kv), dtype=torch.float32))

        def features(self, x, state=None):
            """x (B, T, n_embd) -> φq (B, H, T, d), φk, v, log α (B, Hkv, T, d), new conv buffers."""
            B, T, _ = x.shape
            H, Hkv, d = self.n_head, self.n_head_kv, self.head_dim
            bq, bk = (None, None) if state is None else state[2:]
            q, bq = causal_conv(self.q_proj(x), self.q_conv, bq)
            k, bk = causal_conv(self.k_proj(x), self.k_conv, bk)
            v = self.v_proj(x)
            la = torch.nn.functional.logsigmoid(self.gate(x)).clamp_min(LOG_DECAY_MIN)
            fq = phi(q.view(B, T, H, d), self.feature_map).transpose(1, 2)
            fk = phi(k.view(B, T, Hkv, d), self.feature_map).transpose(1, 2)
            return (fq, fk, v.view(B, T, Hkv, d).transpose(1, 2), la.view(B, T, Hkv, d).transpose(1, 2), bq, bk)

        def step(self, x, state=None, recurrent=False, parallel=False):
            """x (B, T, n_embd), state (S, z, conv_q buffer, conv_k buffer) or None -> (out, new state).
            Chunked parallel form by default; `recurrent` token by token; `parallel` one chunk (for ONNX)."""
            B, T, _ = x.shape
            fq, fk, v, la, bq, bk = self.features(x, state)
            st = None if state is None else state[:2]
            if recurrent:
                o, (S, z) = gla_recurrent(fq, fk, v, la, self.eps, st)
            elif parallel:
                o, (S, z) = gla_parallel(fq, fk, v, la, self.eps, st)
            else:
                o, (S, z) = gla_chunked(fq, fk, v, la, self.eps, self.chunk, st)
            out = self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            return out, (S, z, bq, bk)

        def forward(self, hidden_states, **kwargs):
            return self.step(hidden_states)[0], None

    return LinearAttention


def linear_layers(student):
    return [layer.self_attn for layer in student.model.layers]


def attention_params(student):
    ps = []
    for a in linear_layers(student):
        ps += list(a.parameters())
    return ps


def state_bytes(cfg: dict) -> int:
    """Bytes of the constant decode state (f32, all layers): S, z and the conv buffers of q and k."""
    H, Hkv, d, K, L = cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"], cfg["conv_kernel"], cfg["n_layer"]
    return 4 * L * (Hkv * d * d + Hkv * d + (K - 1) * (H + Hkv) * d)


@register_variant("linear")
class Linear(Variant):
    """--variant linear [--conv-kernel K]; Python API also takes feature_map ("elu1" | "softmax") and chunk."""

    def __init__(self, **opts):
        super().__init__(**opts)
        k = opts.get("conv_kernel")
        self.conv_kernel = DEFAULT_CONV if k is None else int(k)
        if not 1 <= self.conv_kernel <= 64:
            raise ConversionError(f"--conv-kernel must be in [1, 64] (got {k})")
        self.feature_map = opts.get("feature_map") or "elu1"
        if self.feature_map not in FEATURE_MAPS:
            raise ConversionError(f"unknown feature map {self.feature_map!r} (choose from {', '.join(FEATURE_MAPS)})")
        self.chunk = int(opts.get("chunk") or DEFAULT_CHUNK)
        if not 1 <= self.chunk <= MAX_TRAIN_CHUNK:
            raise ConversionError(f"chunk must be in [1, {MAX_TRAIN_CHUNK}] (got {self.chunk})")
        for o in ("target_params", "kv_rank", "q_rank", "rope_dim"):
            if opts.get(o) is not None:
                raise ConversionError(f"--{o.replace('_', '-')} is not an option of --variant linear")

    def transform(self, model, ctx: Context):
        c = model.config
        if getattr(c, "attention_bias", False):
            raise ConversionError("--variant linear supports Llama attention without biases")
        H, Hkv = c.num_attention_heads, c.num_key_value_heads
        d = getattr(c, "head_dim", None) or c.hidden_size // H
        cls = _make_attention_class()
        for layer in model.model.layers:
            layer.self_attn = cls(layer.self_attn, c.hidden_size, H, Hkv, d, self.conv_kernel, self.feature_map,
                                  self.chunk)
        model.config.use_cache = False
        model.linear_config = dict(n_layer=c.num_hidden_layers, n_head=H, n_head_kv=Hkv, head_dim=d,
                                   conv_kernel=self.conv_kernel, feature_map=self.feature_map, chunk=self.chunk,
                                   eps=EPS)
        ctx.log(f"linear: state {state_bytes(model.linear_config):,} bytes (constant), feature map "
                f"{self.feature_map}, conv kernel {self.conv_kernel}")
        return model

    def kv_bytes_per_token(self, model) -> int:
        return 0

    def heal(self, student, ctx: Context) -> list[float]:
        n1 = ctx.heal_steps // 2
        losses = match_attention(student, ctx, n1)
        return losses + distill(student, ctx, ctx.heal_steps - n1, params=attention_params(student), stage="heal-kl")

    def write_gguf(self, student, ckpt: HFCheckpoint, out: Path, outtype: str, progress) -> None:
        write_linear_gguf(student, ckpt, out, outtype, progress)

    def write_onnx(self, student, ckpt: HFCheckpoint, out: Path, dtype: str, progress) -> None:
        write_linear_onnx(student, ckpt, out, dtype, progress)


# ---------------------------------------------------------------- healing stage 1
def match_attention(student, ctx: Context, steps: int, lr: float | None = None) -> list[float]:
    """Per-layer attention-output matching: the teacher's layers are run (without the output head), each student
    attention gets the teacher attention's own input and is pulled towards its output (MSE / output power, summed
    over layers). AdamW on the attention parameters, warm-up and cosine decay; returns the losses."""
    torch = _torch()
    if steps <= 0:
        return []
    teacher = ctx.teacher
    acts: dict[int, tuple] = {}

    def hook(i):
        def f(mod, args, kwargs, output):
            acts[i] = (kwargs.get("hidden_states", args[0] if args else None).detach(), output[0].detach())
        return f

    handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(teacher.model.layers)]
    layers = linear_layers(student)

    def loss_fn(x):
        with torch.no_grad():
            teacher.model(input_ids=x)
        loss = 0.0
        for li, attn in enumerate(layers):
            h, y = acts[li]
            loss = loss + ((attn(hidden_states=h)[0] - y) ** 2).mean() / (y ** 2).mean().clamp_min(1e-12)
        return loss / len(layers)

    try:
        return distill(student, ctx, steps, params=attention_params(student), lr=lr or 10 * ctx.lr,
                       stage="heal-attn", loss_fn=loss_fn, what="normalised MSE")
    finally:
        for hd in handles:
            hd.remove()


def attention_mse(student, teacher, ids) -> list[float]:
    """Per-layer normalised MSE of the student's attention output vs the teacher's, on the teacher's inputs."""
    torch = _torch()
    acts = {}
    handles = [layer.self_attn.register_forward_hook(
        (lambda i: lambda m, a, kw, o: acts.__setitem__(i, (kw["hidden_states"], o[0])))(i), with_kwargs=True)
        for i, layer in enumerate(teacher.model.layers)]
    try:
        with torch.no_grad():
            teacher.model(input_ids=ids)
            return [float(((a(hidden_states=acts[i][0])[0] - acts[i][1]) ** 2).mean() / (acts[i][1] ** 2).mean())
                    for i, a in enumerate(linear_layers(student))]
    finally:
        for hd in handles:
            hd.remove()


# ---------------------------------------------------------------- GGUF
def gguf_tensors(student):
    """The student's tensors under their GGUF names (f32 arrays)."""
    sd = {k: v.detach().float().numpy() for k, v in student.state_dict().items()}
    tied = bool(getattr(student.config, "tie_word_embeddings", False))
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    if not tied:
        yield "output.weight", sd["lm_head.weight"]
    for i in range(student.config.num_hidden_layers):
        p = f"model.layers.{i}."
        names = [("attn_norm", "input_layernorm.weight"), ("attn_q", "self_attn.q_proj.weight"),
                 ("attn_k", "self_attn.k_proj.weight"), ("attn_v", "self_attn.v_proj.weight"),
                 ("attn_output", "self_attn.o_proj.weight"), ("attn_q_conv", "self_attn.q_conv"),
                 ("attn_k_conv", "self_attn.k_conv"), ("attn_gate", "self_attn.gate.weight"),
                 ("ffn_norm", "post_attention_layernorm.weight"), ("ffn_gate", "mlp.gate_proj.weight"),
                 ("ffn_up", "mlp.up_proj.weight"), ("ffn_down", "mlp.down_proj.weight")]
        for g, h in names:
            yield f"blk.{i}.{g}.weight", sd[p + h]
        yield f"blk.{i}.attn_gate.bias", sd[p + "self_attn.gate.bias"]


def write_linear_gguf(student, ckpt: HFCheckpoint, out: Path, outtype: str, progress=None) -> None:
    import gguf
    from gguf import GGMLQuantizationType as QT
    from .gguf_convert import OUTTYPES
    c, lc = student.config, student.linear_config
    n_vocab = c.vocab_size

    def set_params(w):
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(int(getattr(c, "max_position_embeddings", 2048) or 2048))
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(lc["n_head"])
        w.add_head_count_kv(lc["n_head_kv"])
        w.add_key_length(lc["head_dim"])
        w.add_value_length(lc["head_dim"])
        w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        w.add_vocab_size(n_vocab)
        w.add_uint32(f"{ARCH}.conv_kernel", lc["conv_kernel"])
        w.add_string(f"{ARCH}.feature_map", lc["feature_map"])
        w.add_uint32(f"{ARCH}.chunk_size", RUNTIME_CHUNK)
        w.add_float32(f"{ARCH}.attention.eps", float(lc["eps"]))
        w.add_float32(f"{ARCH}.attention.log_decay_min", LOG_DECAY_MIN)

    qt = OUTTYPES[outtype] if outtype in OUTTYPES else QT.F32

    def quant_type(name, a):
        if a.ndim < 2 or qt == QT.F32 or name.endswith("_conv.weight"):
            return QT.F32  # norms, gate bias and the small conv kernels stay exact
        return qt if a.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0] == 0 else QT.F16

    n = 3 - bool(getattr(c, "tie_word_embeddings", False)) + 13 * c.num_hidden_layers
    write_gguf(out, ARCH, ckpt, n_vocab, set_params, gguf_tensors(student), outtype, quant_type, n, progress)


# ---------------------------------------------------------------- ONNX
def state_shapes(student, batch: int) -> list[tuple[str, tuple]]:
    """Names and shapes of the recurrent state inputs (`state.{i}.S|z|conv_q|conv_k`); outputs are `new_state.*`."""
    lc = student.linear_config
    H, Hkv, d, K = lc["n_head"], lc["n_head_kv"], lc["head_dim"], lc["conv_kernel"]
    out = []
    for i in range(lc["n_layer"]):
        out += [(f"state.{i}.S", (batch, Hkv, d, d)), (f"state.{i}.z", (batch, Hkv, d)),
                (f"state.{i}.conv_q", (batch, K - 1, H * d)), (f"state.{i}.conv_k", (batch, K - 1, Hkv * d))]
    return out


def onnx_step_module(student):
    """A torch module (input_ids (B, T), *state) -> (logits (B, T, V), *new state): the student with an explicit
    state, every call one chunk (gla_parallel), so one graph serves prefill (any T) and decode (T = 1)."""
    torch = _torch()

    class Step(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, *state):
            m = self.m.model
            h = m.embed_tokens(input_ids)
            new = []
            for i, layer in enumerate(m.layers):
                out, st = layer.self_attn.step(layer.input_layernorm(h), tuple(state[4 * i:4 * i + 4]), parallel=True)
                h = h + out
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                new += list(st)
            return (self.m.lm_head(m.norm(h)), *new)

    return Step(student).eval()


def write_linear_onnx(student, ckpt: HFCheckpoint, out: Path, dtype: str = "fp32", progress=None) -> None:
    """`--format onnx`: OUT/model.onnx (inputs input_ids + the state, outputs logits + the new state, see
    state_shapes), OUT/linear_config.json, and the checkpoint's tokenizer / config files. fp32 only."""
    import json
    import warnings
    from .onnx_export import MODEL_FILE, write_onnx_folder
    torch = _torch()
    if dtype != "fp32":
        raise ConversionError(f"--variant linear exports ONNX in fp32 only (got --dtype {dtype})")
    if student.linear_config["conv_kernel"] < 2:
        raise ConversionError("ONNX export needs --conv-kernel >= 2 (the conv buffer is a state input)")

    def export(tmp: Path) -> None:
        B, T = 2, 3
        shapes = state_shapes(student, B)
        state = [torch.rand(s) for _, s in shapes]
        ins = ["input_ids"] + [n for n, _ in shapes]
        outs = ["logits"] + ["new_" + n for n, _ in shapes]
        dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"}}
        for n in ins[1:] + outs[1:]:
            dyn[n] = {0: "batch_size"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(onnx_step_module(student), (torch.zeros((B, T), dtype=torch.long), *state),
                              str(tmp / MODEL_FILE), input_names=ins, output_names=outs, dynamic_axes=dyn,
                              opset_version=17, do_constant_folding=True, dynamo=False)
        (tmp / "linear_config.json").write_text(json.dumps(dict(student.linear_config, architecture=ARCH,
                                                                inputs=ins, outputs=outs), indent=1))

    write_onnx_folder(Path(out), ckpt.path, export, dtype, progress)
