"""prune: Adapt-Pruner (Pan et al., 2025) — structured, layer-adaptive, incremental pruning of a Llama.

What is removed: whole KV-head groups (a key head, its value head and the query heads that attend with it: rows of
q/k/v_proj and the matching columns of o_proj) and MLP neurons (a row of gate_proj and up_proj and the matching
column of down_proj). The hidden size, the embeddings and the norms stay; every layer keeps at least one KV group
and ALIGN_FF neurons (kept neuron counts are multiples of ALIGN_FF so that quantized blocks fit the rows).

How much per layer: layer importance I_l = -mean cos(x_in, x_out) of the decoder layer over calibration tokens (a
layer that barely turns its input matters less), min-max normalised to Î_l in [-1, 1]; per-layer sparsity
s_l <- clip(s_l + Δ - A Î_l, 0, 0.99) with Δ = 1/50, A = 0.02 (s_l is a fraction of the layer's original attention +
MLP parameters), stepped (fractionally for the last step) until the stage's parameter budget is met.
Which units: first-order Taylor importance Σ|w ∂L/∂w| over each unit's coupled weights, L the LM loss on
calibration windows; each layer greedily drops the units of least importance per parameter until it is within half
a unit of its budget. Incremental: about STAGE (5%) of the original parameters per stage, importances recomputed on
the pruned (and healed) model each stage; `--heal N` splits N distillation steps over the stages.
Refit (ours, not the paper's; on by default, option `refit=False` turns it off): after each stage the projections
that read what was pruned (down_proj, o_proj) are refitted by least squares so that the layer's output on the
calibration tokens changes as little as it can — W' = W C[:, k] (C[k, k] + λI)⁻¹, C the second moment of the
projection's input on the calibration tokens, k its kept columns, λ = DAMP · mean diag C (the compensation of OBS /
SparseGPT, for whole columns). The kept units' weights move; what is removed and the parameter count do not change.

Parameters are counted as `variant.n_params` does: everything, tied embedding counted once (--target-params is a
fraction of that; `nonembedding_fraction` gives the other view).

The student stays a transformers LlamaForCausalLM whose layers have shrunk nn.Linear modules (transformers' Llama
attention reshapes by head_dim and repeats KV heads by num_key_value_groups, which pruning whole groups keeps).
It is written as llama.cpp's `deci` (per-layer head_count / head_count_kv / feed_forward_length arrays, explicit
key/value length) or as plain `llama` when all layers have the same widths.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .checkpoint import ConversionError
from .variant import Context, Variant, distill, n_params, register_variant, write_gguf

DELTA, AMP = 1 / 50, 0.02   # sparsity step and amplitude of the importance term
S_MAX = 0.99
STAGE = 0.05                # fraction of the original parameters removed per stage
ALIGN_FF = 32               # kept neurons: multiples of this (one quantization block of down_proj's rows)
N_IMPORTANCE = 8            # calibration windows per importance estimate
N_REFIT = 16                # calibration windows whose activations the refit of down_proj / o_proj fits
DAMP = 0.01                 # refit ridge: this fraction of the mean diagonal of the input second moment


def _torch():
    import torch
    return torch


def head_dim(model) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def widths(model) -> list[tuple[int, int, int]]:
    """(n_head, n_head_kv, n_ff) of each decoder layer, from the modules' shapes."""
    hd = head_dim(model)
    return [(L.self_attn.q_proj.out_features // hd, L.self_attn.k_proj.out_features // hd,
             L.mlp.gate_proj.out_features) for L in model.model.layers]


def layer_params(d: int, hd: int, H: int, Hkv: int, n_ff: int) -> int:
    """Parameters of one layer's attention and MLP projections (norms excluded: they are never pruned)."""
    return d * hd * (2 * H + 2 * Hkv) + 3 * d * n_ff


def nonembedding_params(model) -> int:
    return n_params(model, embeddings=False)


def _linear(w, requires_grad: bool):
    torch = _torch()
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    lin.weight = torch.nn.Parameter(w.detach().clone().contiguous(), requires_grad=requires_grad)
    return lin


def shrink_layer(layer, keep_kv, keep_ff, hd: int, moments=None) -> None:
    """Keep KV groups `keep_kv` (kv head indices, with their query heads) and neurons `keep_ff` of a decoder layer,
    in place (new, smaller nn.Linear modules; the order of what is kept is preserved). moments = (C_o, C_down):
    refit o_proj / down_proj on them (refit_columns) where columns were dropped; None keeps the weights."""
    torch = _torch()
    att, mlp = layer.self_attn, layer.mlp
    G = att.num_key_value_groups
    keep_kv = torch.as_tensor(sorted(int(i) for i in keep_kv), dtype=torch.long)
    keep_ff = torch.as_tensor(sorted(int(i) for i in keep_ff), dtype=torch.long)
    kv_rows = (keep_kv[:, None] * hd + torch.arange(hd)).reshape(-1)
    q_heads = (keep_kv[:, None] * G + torch.arange(G)).reshape(-1)
    q_rows = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    rg = att.q_proj.weight.requires_grad
    att.q_proj = _linear(att.q_proj.weight[q_rows], rg)
    att.k_proj = _linear(att.k_proj.weight[kv_rows], rg)
    att.v_proj = _linear(att.v_proj.weight[kv_rows], rg)
    n_q, n_ff = att.o_proj.in_features, mlp.down_proj.in_features
    refit = moments is not None
    att.o_proj = _linear(refit_columns(att.o_proj.weight, moments[0], q_rows) if refit and len(q_rows) < n_q
                         else att.o_proj.weight[:, q_rows], rg)
    mlp.gate_proj = _linear(mlp.gate_proj.weight[keep_ff], rg)
    mlp.up_proj = _linear(mlp.up_proj.weight[keep_ff], rg)
    mlp.down_proj = _linear(refit_columns(mlp.down_proj.weight, moments[1], keep_ff) if refit and len(keep_ff) < n_ff
                            else mlp.down_proj.weight[:, keep_ff], rg)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep_ff)


def importance(model, windows, batch: int = 4):
    """Layer importance I_l = -mean cos(x_in, x_out) (L,), and first-order Taylor scores Σ|w ∂L/∂w| of every KV
    group [(Hkv_l,)] and neuron [(n_ff_l,)] of each layer, from the LM loss on `windows` (n, T)."""
    torch = _torch()
    hd = head_dim(model)
    layers = model.model.layers
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    count = [0]

    def hook(i):
        def f(mod, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos_sum[i] += torch.nn.functional.cosine_similarity(x_in.detach().float(), x_out.detach().float(),
                                                                dim=-1).sum().item()
        return f

    handles = [L.register_forward_hook(hook(i), with_kwargs=True) for i, L in enumerate(layers)]
    was_training = model.training
    model.eval()
    saved = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for L in layers:  # gradients of the prunable projections only
        for m in (L.self_attn.q_proj, L.self_attn.k_proj, L.self_attn.v_proj, L.self_attn.o_proj,
                  L.mlp.gate_proj, L.mlp.up_proj, L.mlp.down_proj):
            m.weight.requires_grad_(True)
            m.weight.grad = None
    try:
        n = windows.shape[0]
        for s in range(0, n, batch):
            x = windows[s:s + batch]
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     x[:, 1:].reshape(-1), reduction="sum") / (n * (x.shape[1] - 1))
            loss.backward()
            count[0] += x.numel()
    finally:
        for h in handles:
            h.remove()
    kv_scores, ff_scores = [], []
    with torch.no_grad():
        for L in layers:
            a, m = L.self_attn, L.mlp
            G = a.num_key_value_groups
            t = lambda lin: (lin.weight * lin.weight.grad).abs()  # noqa: E731
            q = t(a.q_proj).sum(1).reshape(-1, G * hd).sum(1)
            k = t(a.k_proj).sum(1).reshape(-1, hd).sum(1)
            v = t(a.v_proj).sum(1).reshape(-1, hd).sum(1)
            o = t(a.o_proj).sum(0).reshape(-1, G * hd).sum(1)
            kv_scores.append((q + k + v + o).double().numpy())
            ff_scores.append((t(m.gate_proj).sum(1) + t(m.up_proj).sum(1) + t(m.down_proj).sum(0)).double().numpy())
    for p, r in saved.items():
        p.grad = None
        p.requires_grad_(r)
    model.train(was_training)
    return -(cos_sum / count[0]).numpy(), kv_scores, ff_scores


def proj_moments(model, windows, batch: int = 4):
    """Second moments C = Σ x xᵀ of the inputs of every layer's o_proj and down_proj over the tokens of `windows`
    (float32 sums, [(C_o, C_down)] per layer), and the token count."""
    torch = _torch()
    layers = model.model.layers
    acc = [[None, None] for _ in layers]

    def hook(i, j):
        def f(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            c = x.T @ x
            acc[i][j] = c if acc[i][j] is None else acc[i][j] + c
        return f

    handles = [h for i, L in enumerate(layers) for h in (L.self_attn.o_proj.register_forward_pre_hook(hook(i, 0)),
                                                          L.mlp.down_proj.register_forward_pre_hook(hook(i, 1)))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch):
                model(input_ids=windows[s:s + batch])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return acc, int(windows.numel())


def refit_columns(w, C, keep):
    """Least-squares refit of a projection W (out, n) after its input columns outside `keep` are dropped: the W'
    (out, len(keep)) minimising Σ_x |W x - W' x[keep]|² over the inputs whose second moment is C (n, n), ridge
    DAMP · mean diag C. Returns W' in W's dtype."""
    torch = _torch()
    keep = torch.as_tensor(keep, dtype=torch.long)
    C = C.double()
    Ckk = C[keep][:, keep]
    lam = DAMP * float(torch.diagonal(C).mean()) + 1e-12
    A = Ckk + lam * torch.eye(len(keep), dtype=C.dtype)
    rhs = C[keep] @ w.detach().double().T            # (k, out) = C[k, :] Wᵀ
    return torch.linalg.solve(A, rhs).T.to(w.dtype).contiguous()


def normalise(I: np.ndarray) -> np.ndarray:
    """Min-max scaling to [-1, 1] (all zeros when the layers are alike)."""
    lo, hi = float(I.min()), float(I.max())
    return np.zeros_like(I) if hi - lo < 1e-12 else 2 * (I - lo) / (hi - lo) - 1


def select(kv_score, ff_score, keep_params: float, d: int, hd: int, G: int):
    """Which KV groups and neurons one layer keeps so that its projection parameters come within half a unit of
    `keep_params`: units of least importance per parameter go first; at least one KV group and ALIGN_FF neurons
    stay, and the kept neuron count is rounded to a multiple of ALIGN_FF."""
    Hkv, n_ff = len(kv_score), len(ff_score)
    kv_size, ff_size = 2 * d * hd * (G + 1), 3 * d
    units = [(kv_score[i] / kv_size, 0, i) for i in range(Hkv)] + [(ff_score[j] / ff_size, 1, j) for j in range(n_ff)]
    units.sort()
    min_ff = min(n_ff, ALIGN_FF)
    keep_kv, keep_ff = Hkv, n_ff
    for _, kind, _i in units:
        cur = layer_params(d, hd, keep_kv * G, keep_kv, keep_ff)
        if cur <= keep_params:
            break
        size = kv_size if kind == 0 else ff_size
        if cur - size < keep_params - size / 2:
            continue  # this unit would overshoot: try smaller ones
        if kind == 0 and keep_kv > 1:
            keep_kv -= 1
        elif kind == 1 and keep_ff > min_ff:
            keep_ff -= 1
    if keep_ff < n_ff and n_ff >= ALIGN_FF:
        keep_ff = int(min(n_ff, max(ALIGN_FF, round(keep_ff / ALIGN_FF) * ALIGN_FF)))
    kv = np.sort(np.argsort(-np.asarray(kv_score), kind="stable")[:keep_kv])
    ff = np.sort(np.argsort(-np.asarray(ff_score), kind="stable")[:keep_ff])
    return kv, ff


def plan_sparsity(s: np.ndarray, I_hat: np.ndarray, base: np.ndarray, fixed: int, budget: float) -> np.ndarray:
    """Step s <- clip(s + t (Δ - A Î), 0, S_MAX) with the smallest t >= 0 whose predicted parameter count
    fixed + Σ (1 - s_l) base_l is within the budget (t = 1 is one step of the rule; t may span several)."""
    step = DELTA - AMP * I_hat
    pred = lambda t: fixed + float(((1 - np.clip(s + t * step, 0, S_MAX)) * base).sum())  # noqa: E731
    if pred(0) <= budget:
        return s
    lo, hi = 0.0, 1.0
    while pred(hi) > budget and hi < 1e4:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pred(mid) > budget else (lo, mid)
    return np.clip(s + hi * step, 0, S_MAX)


def prune(model, ctx: Context, target: float, stage_size: float = STAGE, log=print, refit: bool = True) -> dict:
    """Prune `model` in place to `target` of its parameters (see the module docstring), healing between stages with
    ctx.heal_steps split over them; `refit`: least-squares refit of o_proj / down_proj after each stage. Returns a
    summary (per-stage params, final widths, sparsities)."""
    torch = _torch()
    c = model.config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ConversionError("prune: checkpoints with attention or MLP biases are not supported")
    d, hd = c.hidden_size, head_dim(model)
    w0 = widths(model)
    base = np.array([layer_params(d, hd, *w) for w in w0], dtype=np.float64)
    total0 = n_params(model)
    fixed = total0 - int(base.sum())  # embeddings, norms
    G = [H // Hkv for H, Hkv, _ in w0]
    floor = fixed + sum(layer_params(d, hd, g, 1, min(f, ALIGN_FF)) for g, (_, _, f) in zip(G, w0))
    if target * total0 < floor:
        raise ConversionError(f"--target-params {target} is below what structured pruning can reach here "
                              f"({floor / total0:.3f}: embeddings, norms, one KV group and {ALIGN_FF} neurons a layer)")
    summary = dict(params_original=total0, stages=[])
    if target >= 1.0:
        return summary
    if ctx.calib is None or ctx.calib.numel() == 0:
        raise ConversionError("prune needs calibration windows (give --calib, or let the teacher write them)")
    n_stages = max(1, math.ceil((1 - target) / stage_size - 1e-9))
    heal = [ctx.heal_steps // n_stages + (1 if i < ctx.heal_steps % n_stages else 0) for i in range(n_stages)]
    s = np.zeros(len(w0))
    windows = ctx.calib[:N_IMPORTANCE]
    stage = 0
    while n_params(model) > target * total0 * (1 + 1e-3) and stage < n_stages + 3:
        budget = max(target, 1 - stage_size * (stage + 1)) * total0
        # units are coarse (a KV group, ALIGN_FF rounding): aim lower by what the model holds beyond the plan
        budget -= max(0, n_params(model) - (fixed + float(((1 - s) * base).sum()))) if stage >= n_stages - 1 else 0
        I, kv_scores, ff_scores = importance(model, windows, ctx.batch)
        I_hat = normalise(I)
        s = plan_sparsity(s, I_hat, base, fixed, budget)
        moments = proj_moments(model, ctx.calib[:N_REFIT], ctx.batch)[0] if refit else None
        for li, L in enumerate(model.model.layers):
            kv, ff = select(kv_scores[li], ff_scores[li], (1 - s[li]) * base[li], d, hd, G[li])
            if len(kv) < len(kv_scores[li]) or len(ff) < len(ff_scores[li]):
                shrink_layer(L, kv, ff, hd, moments[li] if refit else None)
            if refit:
                moments[li] = None
        p = n_params(model)
        steps = heal[stage] if stage < n_stages else 0
        log(f"prune stage {stage + 1}: {p:,} params ({p / total0:.1%}), layer importance "
            f"{np.round(I, 3).tolist()}, healing {steps} steps")
        losses = distill(model, dataclasses.replace(ctx, seed=ctx.seed + stage), steps,
                         stage=f"heal {stage + 1}/{n_stages}") if steps else []
        summary["stages"].append(dict(params=p, layer_importance=I.tolist(), heal_steps=steps,
                                      heal_loss=[losses[0], losses[-1]] if losses else []))
        ctx.progress("prune", stage + 1, n_stages)
        stage += 1
    summary.update(params=n_params(model), sparsity=s.tolist(), widths=widths(model))
    model.eval()
    return summary


@register_variant("prune")
class Prune(Variant):
    """Adapt-Pruner structured pruning to `target_params` (fraction of the original parameter count, tied embedding
    counted once; default 0.7; Python API option `stage`: fraction of the parameters removed per stage, default
    STAGE; `refit`: least-squares refit of o_proj / down_proj after each stage, default True). Heals between stages
    itself."""
    heals_in_transform = True

    def target(self) -> float:
        t = self.opts.get("target_params")
        t = 0.7 if t is None else t
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ConversionError(f"--target-params must be a fraction in (0, 1] (got {t!r})")
        return float(t)

    def transform(self, model, ctx: Context):
        stage = self.opts.get("stage") or STAGE
        if not 0 < stage <= 1:
            raise ConversionError(f"prune: stage size must be in (0, 1] (got {stage})")
        refit = self.opts.get("refit")
        self.summary = prune(model, ctx, self.target(), stage, log=ctx.log, refit=refit is None or bool(refit))
        return model

    def heal(self, student, ctx: Context) -> list[float]:
        return []  # healing happens between the pruning stages

    def kv_bytes_per_token(self, model) -> int:
        hd = head_dim(model)
        return sum(2 * 2 * hkv * hd for _, hkv, _ in widths(model))

    def write_gguf(self, student, ckpt, out, outtype, progress) -> None:
        write_pruned_gguf(student, ckpt, out, outtype, progress)

    def write_onnx(self, student, ckpt, out, dtype, progress) -> None:
        write_pruned_onnx(student, ckpt, out, dtype, progress)


def write_pruned_onnx(student, ckpt, out, dtype: str = "fp32", progress=None) -> None:
    """The student through the shared ONNX builder: each layer's past keys/values have its own head count
    (static in the graph, which is where the runtime reads them); config.json is the student's, with the
    per-layer widths [n_head, n_head_kv, n_ff] under `layer_widths`. (optimum's ORTModelForCausalLM sizes
    every layer's cache from config.json alone, so it runs only a uniformly pruned model.)"""
    import json
    from pathlib import Path
    from .onnx_export import MODEL_FILE, write_onnx_folder
    from .onnx_graph import build_decoder, export_decoder
    graph = build_decoder(student)

    def export(tmp: Path) -> None:
        export_decoder(graph, tmp / MODEL_FILE)
        cfg = student.config.to_dict()
        cfg["layer_widths"] = [list(w) for w in widths(student)]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))

    write_onnx_folder(Path(out), ckpt.path, export, dtype, progress)


def write_pruned_gguf(student, ckpt, out, outtype: str = "f16", progress=None) -> str:
    """The student as GGUF `deci` (per-layer widths) or `llama` (all layers alike). Returns the architecture."""
    import gguf
    from gguf import MODEL_TENSOR as T, TENSOR_NAMES
    from ..kernels.ops import llama3_freq_factors
    from .llama import permute_qk, rope_params

    c, hp = student.config, ckpt.config
    d, hd = c.hidden_size, head_dim(student)
    wl = widths(student)
    uniform = len(set(wl)) == 1
    arch = "llama" if uniform else "deci"
    theta, scaling = rope_params(hp)
    if scaling and scaling["rope_type"] not in ("llama3", "linear"):
        raise ConversionError(f"rope scaling {scaling['rope_type']!r} is not supported (llama3, linear)")
    n_vocab = int(c.vocab_size)
    emb = student.model.embed_tokens.weight
    tied = student.lm_head.weight is emb or student.lm_head.weight.data_ptr() == emb.data_ptr()
    H, Hkv, F = ([w[i] for w in wl] for i in range(3))

    def set_params(w):
        w.add_block_count(len(wl))
        w.add_context_length(int(hp.get("max_position_embeddings", 2048)))
        w.add_embedding_length(d)
        w.add_feed_forward_length(F[0] if uniform else F)
        w.add_head_count(H[0] if uniform else H)
        w.add_head_count_kv(Hkv[0] if uniform else Hkv)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-5)))
        w.add_rope_dimension_count(hd)
        w.add_vocab_size(n_vocab)
        if not uniform or hd * H[0] != d:  # llama.cpp derives the head size from layer 0's head count otherwise
            w.add_key_length(hd)
            w.add_value_length(hd)
        if scaling and scaling["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))

    n = lambda t, i=None: TENSOR_NAMES[t].format(bid=i) + ".weight"  # noqa: E731
    a = lambda p: p.detach().float().cpu().numpy()  # noqa: E731

    def tensors():
        yield n(T.TOKEN_EMBD), a(emb)
        yield n(T.OUTPUT_NORM), a(student.model.norm.weight)
        if not tied:
            yield n(T.OUTPUT), a(student.lm_head.weight)
        if scaling and scaling["rope_type"] == "llama3":
            yield n(T.ROPE_FREQS), llama3_freq_factors(
                hd, theta, float(scaling["factor"]), float(scaling.get("low_freq_factor", 1.0)),
                float(scaling.get("high_freq_factor", 4.0)), int(scaling.get("original_max_position_embeddings", 8192)))
        for i, L in enumerate(student.model.layers):
            at, m = L.self_attn, L.mlp
            yield n(T.ATTN_NORM, i), a(L.input_layernorm.weight)
            yield n(T.ATTN_Q, i), permute_qk(a(at.q_proj.weight), H[i])
            yield n(T.ATTN_K, i), permute_qk(a(at.k_proj.weight), Hkv[i])
            yield n(T.ATTN_V, i), a(at.v_proj.weight)
            yield n(T.ATTN_OUT, i), a(at.o_proj.weight)
            yield n(T.FFN_NORM, i), a(L.post_attention_layernorm.weight)
            yield n(T.FFN_GATE, i), a(m.gate_proj.weight)
            yield n(T.FFN_UP, i), a(m.up_proj.weight)
            yield n(T.FFN_DOWN, i), a(m.down_proj.weight)

    n_t = 2 + (not tied) + 9 * len(wl) + bool(scaling and scaling["rope_type"] == "llama3")
    write_gguf(out, arch, ckpt, n_vocab, set_params, tensors(), outtype, n_tensors=n_t, progress=progress)
    return arch
