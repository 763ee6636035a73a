"""MLA variant (X-EcoMLA, 2025): each Llama attention becomes multi-head latent attention, initialised by SVD.

    edgellm convert HF_DIR -o OUT --variant mla --kv-rank 128 [--q-rank R] [--rope-dim 32] [--heal STEPS]

Per layer, with H query heads of size hd in Hkv KV groups, dr = --rope-dim (the cached rope dims), r_q, r_kv:
  q      = q_b (q_a x)                          q_a (r_q, d) = diag(S[:r_q]) Vᵀ[:r_q],  q_b = U[:, :r_q]  (SVD of W_q)
           per head [q_nope (dn) | q_pe (dr)]
  c_kv   = kv_a[:r_kv] x   (the cached latent)  from the SVD of [W_k; W_v] (KV heads repeated to all H heads, nope
  k_pe   = kv_a[r_kv:] x   (cached, shared)     rows of W_k only): kv_a = diag(S[:r_kv]) Vᵀ[:r_kv], k_b / v_b = U_K / U_V
  k_nope = k_b[h] c_kv,  v = v_b[h] c_kv        per head (k_b (H, dn, r_kv), v_b (H, hd, r_kv))
  score  = (q_nope · k_nope + rope(q_pe) · rope(k_pe)) / sqrt(dn + dr);  o_proj, MLP and norms are copied.
With calibration text (the converter always has some: --calib, or the teacher's own) the two SVDs are
activation-aware (SVD-LLM's whitening, `_svd_whitened`): they minimise E|W x - U C x|^2 over the layer's attention
inputs x on that text instead of |W - U C|_F -- on SmolLM2 at r_kv 28 the held-out perplexity before healing is 192
instead of 19 915. `svd="weight"` keeps the plain SVD.
Which dims are rope dims: the cached rope key has dr/2 slots; slot i holds HF pair i (dims (i, i + hd/2), frequency
theta^(-2i/hd)) as an adjacent pair -- the highest-frequency pairs. llama.cpp's `deepseek2` ropes with the NORM type
(adjacent pairs) at frequency base'^(-2i/dr): base' = theta^(dr/hd) gives exactly the original frequencies.
One rope key is shared by all heads, but a GQA model has Hkv different keys. Two ways (rope_share):
  "mean" (X-EcoMLA's description): every head rotates all dr/2 slots against the mean over KV heads of W_k's rope
         rows; dn = hd - dr. With Hkv > 1 this is a large error (SmolLM2-135M, Hkv = 3, even with 31 of 32 pairs
         rotated and full ranks: held-out perplexity 54 -> 568).
  "split" (default): slot i belongs to KV group i mod Hkv, whose key it holds exactly; the heads of the other groups
         have zeros there (their q_b rows are zero), so each head rotates dr / (2 Hkv) pairs and dn = hd - dr / Hkv.
         dr must be a multiple of 2 Hkv. q is scaled by sqrt((dn + dr) / hd) so that llama.cpp's score scale
         1/sqrt(dn + dr) is the original 1/sqrt(hd).
The nope dims (the pairs a head does not rotate) lose their rotation: that is the approximation; with full ranks and
rope_share=split it is the only one (plus, for Llama-3 rope scaling, the scaling factors of the kept pairs, which
deepseek2 cannot express: factor 1 for Llama-3.2's 14 highest-frequency pairs).
The cache holds [c_kv (r_kv) | k_pe (dr)] per token and layer.

GGUF: llama.cpp's `deepseek2`, dense (leading_dense_block_count = block_count), with q_lora_rank, split attn_k_b /
attn_v_b. Its graph always RMS-normalises the q and kv latents; this reference has no latent norms (X-EcoMLA), so
the writer makes each norm act linearly: the latent projection is scaled by s = 2^-k so that the latent's RMS is far
below sqrt(eps), and the norm weight is sqrt(eps)/s: RMSNorm(s c) = c / sqrt(1 + mean((s c)^2)/eps) ~= c (the
relative change, one scalar per token, is < 1e-6 for latents with RMS below LATENT_RMS_BOUND). Those two latent
projections are written in F32 (scaled weights underflow F16's range).
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .checkpoint import ConversionError, HFCheckpoint
from .llama import rope_params
from .variant import Variant, _torch, register_variant, write_gguf as _write_gguf

DEFAULT_ROPE_DIM = 32
DEFAULT_ROPE_SHARE = "split"  # "mean" (one key averaged over KV heads) ruins GQA models: see the README
LATENT_RMS_BOUND = 1024.0  # the norm trick keeps a latent of RMS up to this within 1e-6 (relative) of linear


# ---------------------------------------------------------------- the torch reference of the variant
def rope_adjacent(x, pos, inv_freq):
    """x (..., T, ..., dr) with T at dim 1 -> rotated: adjacent pairs (x[2i], x[2i+1]) by pos * inv_freq[i] (as
    llama.cpp's NORM rope and edgellm's ops.rope_inplace)."""
    torch = _torch()
    ang = pos.double()[:, None] * inv_freq.double()[None, :]  # (T, dr/2), as ops.rope_tables: f64 then f32
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    shape = [1, x.shape[1]] + [1] * (x.dim() - 3) + [cos.shape[1]]
    cos, sin = cos.view(shape), sin.view(shape)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def _build_classes():
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class MLAAttention(nn.Module):
        """Multi-head latent attention without latent norms (X-EcoMLA); dv = hd."""

        def __init__(self, d, n_head, dn, dr, dv, r_q, r_kv, rope_base):
            super().__init__()
            self.n_head, self.dn, self.dr, self.dv, self.r_q, self.r_kv = n_head, dn, dr, dv, r_q, r_kv
            self.rope_base = float(rope_base)
            self.q_a = nn.Linear(d, r_q, bias=False)
            self.q_b = nn.Linear(r_q, n_head * (dn + dr), bias=False)
            self.kv_a = nn.Linear(d, r_kv + dr, bias=False)
            self.k_b = nn.Parameter(torch.zeros(n_head, dn, r_kv))
            self.v_b = nn.Parameter(torch.zeros(n_head, dv, r_kv))
            self.o_proj = nn.Linear(n_head * dv, d, bias=False)
            inv = self.rope_base ** (-np.arange(0, dr, 2, dtype=np.float64) / dr)
            self.register_buffer("inv_freq", torch.tensor(inv, dtype=torch.float64), persistent=False)

        def project(self, x, pos):
            """x (B, T, d) -> q (B, T, H, dn + dr), c_kv (B, T, r_kv), k_pe (B, T, dr) (rotated)."""
            B, T, _ = x.shape
            q = self.q_b(self.q_a(x)).view(B, T, self.n_head, self.dn + self.dr)
            q = torch.cat([q[..., :self.dn], rope_adjacent(q[..., self.dn:], pos, self.inv_freq)], -1)
            ckv = self.kv_a(x)
            return q, ckv[..., :self.r_kv], rope_adjacent(ckv[..., self.r_kv:], pos, self.inv_freq)

        def forward(self, x, pos):
            B, T, _ = x.shape
            q, c, k_pe = self.project(x, pos)
            k_nope = torch.einsum("btr,hnr->bthn", c, self.k_b)
            v = torch.einsum("btr,hvr->bthv", c, self.v_b)
            k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, T, self.n_head, self.dr)], -1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=1.0 / math.sqrt(self.dn + self.dr))
            return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_head * self.dv))

    class MLABlock(nn.Module):
        def __init__(self, input_layernorm, attn, post_attention_layernorm, mlp):
            super().__init__()
            self.input_layernorm, self.self_attn = input_layernorm, attn
            self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

        def forward(self, x, pos):
            x = x + self.self_attn(self.input_layernorm(x), pos)
            return x + self.mlp(self.post_attention_layernorm(x))

    class MLAForCausalLM(nn.Module):
        """The student: the teacher's embeddings, norms, MLPs and head around MLA attention.
        `(input_ids=...)` -> object with `.logits` (B, T, vocab)."""

        def __init__(self, hf, attns, mla: dict):
            super().__init__()
            self.config = hf.config
            self.mla = dict(mla)
            self.embed_tokens = hf.model.embed_tokens
            self.layers = nn.ModuleList(MLABlock(L.input_layernorm, a, L.post_attention_layernorm, L.mlp)
                                        for L, a in zip(hf.model.layers, attns))
            self.norm = hf.model.norm
            self.lm_head = hf.lm_head  # tied: the same Parameter as embed_tokens

        def forward(self, input_ids, **_):
            x = self.embed_tokens(input_ids)
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            for blk in self.layers:
                x = blk(x, pos)
            return SimpleNamespace(logits=self.lm_head(self.norm(x)))

    return MLAAttention, MLAForCausalLM


# ---------------------------------------------------------------- the SVD transform
def rope_layout(hd: int, dr: int, n_head_kv: int = 1, share: str = "mean", group: int = 0):
    """Dims of an HF (half-split rotary) head of KV group `group`: (nope dims, rope dims, rope slots). The cached rope
    key has dr dims = dr/2 slots, slot i holding HF pair i (dims (i, i + hd/2), frequency theta^(-2i/hd)) as an
    adjacent pair, i.e. the dr/2 highest-frequency pairs. share="mean": every group rotates every slot (the shared
    key is the mean over KV groups); share="split": slot i belongs to group i mod n_head_kv only (the key is that
    group's, exact; the other groups' heads see zeros there). Nope dims: the rest of the head, in order."""
    h = hd // 2
    slots = np.arange(dr // 2) if share == "mean" else np.arange(group, dr // 2, n_head_kv)
    rope = np.stack([slots, h + slots], 1).reshape(-1)
    nope = np.setdiff1d(np.arange(hd), rope)
    return nope, rope, slots


def mla_shapes(cfg, opts: dict) -> dict:
    """Validated MLA sizes from a LlamaConfig and the options (kv_rank, q_rank, rope_dim, rope_share; None =
    default)."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    Hkv = cfg.num_key_value_heads or H
    hd = getattr(cfg, "head_dim", None) or d // H
    share = opts.get("rope_share") or DEFAULT_ROPE_SHARE
    if share not in ("mean", "split"):
        raise ConversionError(f"rope_share must be mean or split (got {share!r})")
    dr = opts.get("rope_dim")
    step = 2 if share == "mean" else 2 * Hkv
    dr = max(step, min(DEFAULT_ROPE_DIM, hd // 2) // step * step) if dr is None else int(dr)
    dn = hd - (dr if share == "mean" else dr // Hkv)  # nope dims per head
    if dr < 2 or dr % step or dr > hd or dn < 1:
        raise ConversionError(f"--rope-dim must be a multiple of {step} in [2, {hd}] leaving nope dims (rope_share "
                              f"{share}) for this model (got {dr})")
    max_kv, max_q = min(d, Hkv * (dn + hd)), min(d, H * (dn + dr))
    r_kv = opts.get("kv_rank")
    r_kv = max(1, Hkv * hd // 4) if r_kv is None else int(r_kv)
    if not 1 <= r_kv <= max_kv:
        raise ConversionError(f"--kv-rank must be in [1, {max_kv}] for this model (got {r_kv})")
    r_q = opts.get("q_rank")
    r_q = max_q if r_q is None else int(r_q)
    if not 1 <= r_q <= max_q:
        raise ConversionError(f"--q-rank must be in [1, {max_q}] for this model (got {r_q})")
    theta, scaling = rope_params(cfg.to_dict())
    if scaling and scaling.get("rope_type") not in ("llama3",):
        raise ConversionError(f"the mla variant does not support rope scaling {scaling.get('rope_type')!r}")
    return dict(d=d, n_head=H, n_head_kv=Hkv, head_dim=hd, dn=dn, dr=dr, dv=hd, r_q=r_q, r_kv=r_kv,
                rope_share=share, rope_theta=theta, rope_base=theta ** (dr / hd), max_q_rank=max_q,
                max_kv_rank=max_kv)


def _svd(m: np.ndarray, r: int):
    """m (rows, cols) -> (U[:, :r] (rows, r), diag(S[:r]) Vt[:r] (r, cols)), in float64."""
    U, S, Vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    if r > len(S):  # rank above min(rows, cols): pad with zero directions (exact)
        U = np.concatenate([U, np.zeros((U.shape[0], r - len(S)))], 1)
        Vt = np.concatenate([Vt, np.zeros((r - len(S), Vt.shape[1]))], 0)
        S = np.concatenate([S, np.zeros(r - len(S))])
    return U[:, :r], S[:r, None] * Vt[:r]


def _svd_whitened(m: np.ndarray, r: int, cov: np.ndarray | None):
    """Rank-r factors (U, c) of m (rows, d) with the least E|m x - U c x|^2 over inputs x of second moment cov (d, d)
    (SVD-LLM's whitening: SVD of m L with cov = L Lᵀ, then c <- c L⁻¹); cov None: plain SVD (least |m - U c|_F)."""
    if cov is None:
        return _svd(m, r)
    d = cov.shape[0]
    L = np.linalg.cholesky(cov + (1e-6 * np.trace(cov) / d + 1e-12) * np.eye(d))  # damped: a rank-deficient cov
    U, c = _svd(m @ L, r)
    return U, np.linalg.solve(L.T, c.T).T


def input_moments(model, calib, max_tokens: int = 8192, batch: int = 4) -> list[np.ndarray]:
    """Per decoder layer, the second moment E[x xᵀ] (d, d) float64 of its attention's input (the output of
    input_layernorm) over up to max_tokens tokens of the calibration windows calib (n_seq, seq_len)."""
    torch = _torch()
    layers = model.model.layers
    d = model.config.hidden_size
    acc = [np.zeros((d, d)) for _ in layers]
    n_seq = max(1, min(calib.shape[0], max_tokens // max(1, calib.shape[1])))

    def hook(i):
        def f(mod, inp, out):
            x = out.detach().double().reshape(-1, d)
            acc[i] += (x.T @ x).numpy()
        return f

    hooks = [L.input_layernorm.register_forward_hook(hook(i)) for i, L in enumerate(layers)]
    try:
        with torch.no_grad():
            for b in range(0, n_seq, batch):
                model(calib[b:min(n_seq, b + batch)])
    finally:
        for h in hooks:
            h.remove()
    return [a / (n_seq * calib.shape[1]) for a in acc]


def mla_from_llama_attention(attn_hf, s: dict, MLAAttention, cov: np.ndarray | None = None):
    """One LlamaAttention (q/k/v/o_proj) -> an MLAAttention initialised by SVD (see the module docstring); with cov
    (the second moment of the attention's input), by activation-aware SVD (`_svd_whitened`)."""
    torch = _torch()
    H, Hkv, hd, dn, dr, share = s["n_head"], s["n_head_kv"], s["head_dim"], s["dn"], s["dr"], s["rope_share"]
    G = H // Hkv
    Wq = attn_hf.q_proj.weight.detach().double().numpy()
    d = Wq.shape[1]
    Wq = Wq.reshape(H, hd, d) * math.sqrt((dn + dr) / hd)  # the score scale becomes 1/sqrt(dn + dr)
    Wk = attn_hf.k_proj.weight.detach().double().numpy().reshape(Hkv, hd, d)
    Wv = attn_hf.v_proj.weight.detach().double().numpy().reshape(Hkv, hd, d)
    q = np.zeros((H, dn + dr, d))  # per head [nope | rope slots (adjacent pairs)]
    k_nope = np.zeros((H, dn, d))
    k_pe = np.zeros((Hkv, dr // 2, 2, d))
    for g in range(Hkv):
        nope, rope, slots = rope_layout(hd, dr, Hkv, share, g)
        hs = slice(g * G, (g + 1) * G)
        q[hs, :dn] = Wq[hs][:, nope]
        q[hs, dn:] = 0
        qs = q[hs, dn:].reshape(G, dr // 2, 2, d)
        qs[:, slots] = Wq[hs][:, rope].reshape(G, len(slots), 2, d)
        q[hs, dn:] = qs.reshape(G, dr, d)
        k_nope[hs] = Wk[g, nope]
        k_pe[g, slots] = Wk[g, rope].reshape(len(slots), 2, d)
    # mean: every group fills every slot, the shared key is their mean; split: each slot has one owner
    k_pe = (k_pe.mean(0) if share == "mean" else k_pe.sum(0)).reshape(dr, d)
    q_b, q_a = _svd_whitened(q.reshape(H * (dn + dr), d), s["r_q"], cov)
    v = Wv[np.arange(H) // G].reshape(H * hd, d)
    U, c = _svd_whitened(np.concatenate([k_nope.reshape(H * dn, d), v]), s["r_kv"], cov)
    m = MLAAttention(d, H, dn, dr, hd, s["r_q"], s["r_kv"], s["rope_base"])
    f32 = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        m.q_a.weight.copy_(f32(q_a))
        m.q_b.weight.copy_(f32(q_b))
        m.kv_a.weight.copy_(f32(np.concatenate([c, k_pe])))
        m.k_b.copy_(f32(U[:H * dn].reshape(H, dn, -1)))
        m.v_b.copy_(f32(U[H * dn:].reshape(H, hd, -1)))
        m.o_proj.weight.copy_(attn_hf.o_proj.weight.detach())
    return m


def to_mla(model, moments=None, **opts):
    """transformers LlamaForCausalLM (f32) -> MLAForCausalLM (shares the model's embeddings, norms and MLPs).
    moments: per layer the second moment of the attention input (`input_moments`) for activation-aware SVD, or None
    (plain SVD of the weights)."""
    MLAAttention, MLAForCausalLM = _build_classes()
    cfg = model.config
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ConversionError("the mla variant does not support attention / MLP biases")
    s = mla_shapes(cfg, opts)
    if moments is not None and len(moments) != len(model.model.layers):
        raise ConversionError(f"moments: {len(moments)} matrices for {len(model.model.layers)} layers")
    attns = [mla_from_llama_attention(L.self_attn, s, MLAAttention, None if moments is None else moments[i])
             for i, L in enumerate(model.model.layers)]
    student = MLAForCausalLM(model, attns, s)
    return student.to(next(model.parameters()).dtype)


# ---------------------------------------------------------------- GGUF (llama.cpp's deepseek2)
def latent_scale(eps: float) -> float:
    """A power of two s with (LATENT_RMS_BOUND s)^2 / eps <= 2e-6: RMSNorm(s c) * sqrt(eps) / s = c (1 - <1e-6)."""
    return 2.0 ** math.floor(math.log2(math.sqrt(2e-6 * eps) / LATENT_RMS_BOUND))


def gguf_tensors(student) -> list[tuple[str, np.ndarray]]:
    """The student's weights under deepseek2's GGUF names (f32 NumPy), latent norm trick applied."""
    from gguf import MODEL_TENSOR as T
    from ..models.llama import tname
    s, c = student.mla, student.config
    eps = float(c.rms_norm_eps)
    sc = latent_scale(eps)
    g = np.float32(math.sqrt(eps) / sc)
    npy = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    out = [(tname(T.TOKEN_EMBD), npy(student.embed_tokens.weight)), (tname(T.OUTPUT_NORM), npy(student.norm.weight))]
    if not c.tie_word_embeddings:
        out.append((tname(T.OUTPUT), npy(student.lm_head.weight)))
    for i, blk in enumerate(student.layers):
        a = blk.self_attn
        kv_a = npy(a.kv_a.weight).copy()
        kv_a[:s["r_kv"]] *= sc
        out += [(tname(T.ATTN_NORM, i), npy(blk.input_layernorm.weight)),
                (tname(T.ATTN_Q_A, i), npy(a.q_a.weight) * np.float32(sc)),
                (tname(T.ATTN_Q_A_NORM, i), np.full(s["r_q"], g, np.float32)),
                (tname(T.ATTN_Q_B, i), npy(a.q_b.weight)),
                (tname(T.ATTN_KV_A_MQA, i), kv_a),
                (tname(T.ATTN_KV_A_NORM, i), np.full(s["r_kv"], g, np.float32)),
                (tname(T.ATTN_K_B, i), np.ascontiguousarray(npy(a.k_b).transpose(0, 2, 1))),  # (H, r_kv, dn)
                (tname(T.ATTN_V_B, i), npy(a.v_b)),  # (H, dv, r_kv)
                (tname(T.ATTN_OUT, i), npy(a.o_proj.weight)),
                (tname(T.FFN_NORM, i), npy(blk.post_attention_layernorm.weight)),
                (tname(T.FFN_GATE, i), npy(blk.mlp.gate_proj.weight)),
                (tname(T.FFN_UP, i), npy(blk.mlp.up_proj.weight)),
                (tname(T.FFN_DOWN, i), npy(blk.mlp.down_proj.weight))]
    return out


def set_deepseek2_params(w, student, n_vocab: int) -> None:
    import gguf
    s, c = student.mla, student.config
    n_layer = len(student.layers)
    w.add_block_count(n_layer)
    w.add_context_length(int(getattr(c, "max_position_embeddings", 2048)))
    w.add_embedding_length(s["d"])
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(1)
    w.add_key_length(s["r_kv"] + s["dr"])  # the MQA view of absorbed MLA: [c_kv | k_pe]
    w.add_value_length(s["r_kv"])
    w.add_key_length_mla(s["dn"] + s["dr"])
    w.add_value_length_mla(s["dv"])
    w.add_rope_freq_base(s["rope_base"])
    w.add_rope_dimension_count(s["dr"])
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(n_vocab)
    w.add_q_lora_rank(s["r_q"])
    w.add_kv_lora_rank(s["r_kv"])
    w.add_leading_dense_block_count(n_layer)
    w.add_expert_count(0)
    w.add_expert_used_count(0)
    w.add_expert_shared_count(0)
    w.add_expert_feed_forward_length(0)
    w.add_expert_weights_scale(1.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


@register_variant("mla")
class MLA(Variant):
    """Options: kv_rank (default n_head_kv * head_dim / 4), q_rank (default full: exact queries), rope_dim
    (default min(32, head_dim / 2)), svd ("act": activation-aware on the calibration text when there is some (the
    default), "weight": plain SVD of the weights)."""

    def __init__(self, **opts):
        super().__init__(**opts)
        dr, r_kv, r_q = opts.get("rope_dim"), opts.get("kv_rank"), opts.get("q_rank")
        if opts.get("svd", "act") not in ("act", "weight"):
            raise ConversionError(f"svd must be act (activation-aware) or weight (got {opts.get('svd')!r})")
        if dr is not None and (dr < 2 or dr % 2):  # what needs the model's sizes is checked by the transform
            raise ConversionError(f"--rope-dim must be even and >= 2 (got {dr})")
        for name, v in (("--kv-rank", r_kv), ("--q-rank", r_q)):
            if v is not None and v < 1:
                raise ConversionError(f"{name} must be >= 1 (got {v})")

    def transform(self, model, ctx):
        # activation-aware SVD when there is calibration text (svd="weight" or no text: plain SVD of the weights)
        opts = {k: v for k, v in self.opts.items() if k != "svd"}
        act = self.opts.get("svd", "act") == "act" and ctx is not None and ctx.calib.numel() > 0
        moments = input_moments(model, ctx.calib) if act else None
        student = to_mla(model, moments=moments, **opts)
        s = student.mla
        if ctx is not None:
            ctx.log(f"mla: r_kv {s['r_kv']} + rope {s['dr']} ({s['rope_share']}) cached per token and layer, "
                    f"r_q {s['r_q']}, {'activation-aware' if act else 'plain'} SVD")
        return student

    def heal(self, student, ctx) -> list[float]:
        """Distillation (KL to the teacher's logits) of the attention weights only (latent projections, up-projections,
        o_proj); embeddings, norms and MLPs stay the teacher's."""
        from .variant import distill
        student.requires_grad_(False)
        params = [p.requires_grad_(True) for blk in student.layers for p in blk.self_attn.parameters()]
        return distill(student, ctx, ctx.heal_steps, params=params)

    def kv_bytes_per_token(self, model) -> int:
        """f16 bytes of [c_kv | k_pe] per token, all layers."""
        s = model.mla
        return 2 * len(model.layers) * (s["r_kv"] + s["dr"])

    def write_gguf(self, student, ckpt: HFCheckpoint, out: Path, outtype: str, progress) -> None:
        import gguf
        from gguf import GGMLQuantizationType as QT
        from .gguf_convert import OUTTYPES
        tensors = gguf_tensors(student)
        n_vocab = int(student.config.vocab_size)
        qt = OUTTYPES.get(outtype)

        def quant_type(name, a):
            if a.ndim < 2 or qt == QT.F32 or ".attn_q_a." in name or ".attn_kv_a_mqa." in name:
                return QT.F32  # vectors; the latent projections carry the norm trick's tiny scale
            if ".attn_k_b." in name or ".attn_v_b." in name:
                return QT.F16  # small 3-D up-projections: runtime reads them as floats
            return qt if a.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0] == 0 else QT.F16

        _write_gguf(out, "deepseek2", ckpt, n_vocab, lambda w: set_deepseek2_params(w, student, n_vocab),
                    iter(tensors), outtype, quant_type, len(tensors), progress)

    def write_onnx(self, student, ckpt: HFCheckpoint, out: Path, dtype: str, progress) -> None:
        write_mla_onnx(student, ckpt, out, dtype, progress)


def mla_block(layer, linear, cfg):
    """The shared ONNX builder's block for a student layer: latent attention, the teacher's norms and MLP."""
    from .onnx_graph import GatedMLP, LatentAttention, PreNormBlock, activation, norm_from
    a, mlp = layer.self_attn, layer.mlp
    attn = LatentAttention(linear(a.q_a), linear(a.q_b), linear(a.kv_a), a.k_b, a.v_b, linear(a.o_proj),
                           a.n_head, a.dn, a.dr, a.dv, a.r_kv)
    ffn = GatedMLP(linear(mlp.gate_proj), linear(mlp.up_proj), linear(mlp.down_proj), activation(cfg.hidden_act))
    return PreNormBlock(norm_from(layer.input_layernorm), attn, norm_from(layer.post_attention_layernorm), ffn)


def write_mla_onnx(student, ckpt: HFCheckpoint, out: Path, dtype: str = "fp32", progress=None) -> None:
    """The student through the shared ONNX builder with a latent cache: past_key_values.N.key is c_kv
    (B, 1, P, r_kv) and .value the rotated rope key (B, 1, P, rope dim), so the cache is as small as the GGUF's.
    config.json is the teacher's plus the `mla` sizes (optimum's ORTModelForCausalLM cannot size this cache)."""
    import json
    from .onnx_export import MODEL_FILE, write_onnx_folder
    from .onnx_graph import Rotary, build_decoder, export_decoder
    inv = student.layers[0].self_attn.inv_freq
    graph = build_decoder(student, block=mla_block, rotary=Rotary(inv.float()))

    def export(tmp: Path) -> None:
        export_decoder(graph, tmp / MODEL_FILE)
        cfg = student.config.to_dict()
        cfg["mla"] = dict(student.mla)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))

    write_onnx_folder(Path(out), ckpt.path, export, dtype, progress)
