"""Efficient variants: HF checkpoint -> transformers model (f32) -> transform -> (heal) -> GGUF | ONNX, with a report.

A variant is a registered class (see `register_variant`) that turns a transformers `LlamaForCausalLM` into its
student (the torch reference implementation of the variant, kept beside it in converters/<variant>.py: the model
healing trains, the ONNX exporter traces and the runtime's logits are tested against), and writes the student as a
GGUF file. This module holds what they share: the registry, calibration and held-out text, perplexity in torch,
the distillation loop and the pipeline that `edgellm convert --variant` runs.

Python API: `transform_model(model, "mla", kv_rank=128)` on a transformers model returns the student.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .checkpoint import ConversionError, HFCheckpoint
from ..runtime.dirs import atomic_output
from .gguf_convert import FILE_TYPES, OUTTYPES, add_quantized, check_output
from .tokenizer import add_tokenizer

VARIANTS: dict[str, type["Variant"]] = {}
VARIANT_MODULES = ("prune", "mla", "linear")  # converters/<name>.py, each registers its Variant on import


def variants() -> dict[str, type["Variant"]]:
    """The registry, with every variant module imported."""
    import importlib
    for m in VARIANT_MODULES:
        try:
            importlib.import_module(f"{__package__}.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{m}":
                raise
    return VARIANTS


def register_variant(name: str):
    def deco(cls):
        cls.name = name
        VARIANTS[name] = cls
        return cls
    return deco


def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError("variants need torch and transformers: pip install 'edgellm[convert]'") from None
    return torch


# ---------------------------------------------------------------- context handed to a variant
@dataclass
class Context:
    """What a transform may use: the frozen teacher, calibration token windows, the healing budget, progress."""
    teacher: object                    # transformers LlamaForCausalLM, f32, eval(), requires_grad False
    calib: "object"                    # torch.LongTensor (n_seq, seq_len): calibration / healing windows
    heal_steps: int = 0                # optimizer steps of healing (0: none)
    lr: float = 1e-4
    batch: int = 4
    seed: int = 0
    progress: Callable[[str, int, int], None] = field(default=lambda stage, i, n: None)
    log: Callable[[str], None] = field(default=lambda msg: None)

    def batches(self, steps: int) -> Iterator[object]:
        """`steps` batches of `batch` calibration windows (a seeded shuffle, cycling)."""
        torch = _torch()
        g = torch.Generator().manual_seed(self.seed)
        n = self.calib.shape[0]
        order = torch.randperm(n, generator=g)
        j = 0
        for _ in range(steps):
            idx = [int(order[(j + i) % n]) for i in range(min(self.batch, n))]
            j += len(idx)
            yield self.calib[idx]


class Variant:
    """One efficient variant. Options arrive as keyword arguments (None = the variant's default)."""
    name = "?"

    def __init__(self, **opts):
        self.opts = opts

    def transform(self, model, ctx: Context):
        """transformers LlamaForCausalLM (f32; may be modified in place) -> student (a torch module whose
        `(input_ids=...)` call returns an object with `.logits`, like transformers' models). Pruning heals between
        its stages itself; the pipeline heals everything else after the transform (see `heal`)."""
        raise NotImplementedError

    def heal(self, student, ctx: Context) -> list[float]:
        """Default healing: end-to-end logit distillation from the teacher."""
        return distill(student, ctx, ctx.heal_steps)

    def kv_bytes_per_token(self, model) -> int:
        """Bytes of cached state per token at f16 (all layers); for constant-state models, 0."""
        c = model.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * 2 * c.num_hidden_layers * c.num_key_value_heads * hd

    def write_gguf(self, student, ckpt: HFCheckpoint, out: Path, outtype: str, progress) -> None:
        raise ConversionError(f"variant {self.name!r} cannot be written as GGUF yet")

    def write_onnx(self, student, ckpt: HFCheckpoint, out: Path, dtype: str, progress) -> None:
        raise ConversionError(f"variant {self.name!r} cannot be exported to ONNX yet")


def n_params(model, embeddings: bool = True) -> int:
    """Parameters of a torch model (tied weights counted once)."""
    seen, n = set(), 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen or (not embeddings and ("embed_tokens" in name or "lm_head" in name)):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def transform_model(model, variant: str, calib=None, heal_steps: int = 0, teacher=None, **opts):
    """Python API: apply a variant to a transformers LlamaForCausalLM (f32), optionally healing it.
    `calib` is a LongTensor (n_seq, seq_len) of token ids (needed by pruning and healing)."""
    import copy
    torch = _torch()
    cls = variants().get(variant)
    if cls is None:
        raise ConversionError(f"unknown variant {variant!r} (choose from {', '.join(sorted(VARIANTS))})")
    if teacher is None:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    ctx = Context(teacher=teacher, calib=calib if calib is not None else torch.zeros((0, 0), dtype=torch.long),
                  heal_steps=heal_steps)
    v = cls(**opts)
    student = v.transform(model, ctx)
    if heal_steps:
        v.heal(student, ctx)
    return student


# ---------------------------------------------------------------- text
def tokenize_windows(tok, text: str, seq_len: int, max_windows: int | None = None):
    """Text -> LongTensor (n, seq_len) of consecutive non-overlapping windows (the tail that does not fill one
    is dropped)."""
    torch = _torch()
    ids = tok.encode(text).ids
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConversionError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).reshape(n, seq_len)


def generate_calibration(teacher, tok, n_seq: int, seq_len: int, seed: int = 0, temperature: float = 1.0):
    """Calibration text written by the teacher itself (no --calib): n_seq samples of seq_len tokens, each started
    from BOS (or token 0) and a seeded random common token, temperature sampling."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    bos = teacher.config.bos_token_id if teacher.config.bos_token_id is not None else 0
    vocab = teacher.config.vocab_size
    starts = torch.randint(min(vocab, 1000), min(vocab, 10000), (n_seq, 1), generator=g)
    ids = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), starts], 1)
    with torch.no_grad():
        out = teacher(input_ids=ids, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1]
        seq = [ids]
        for _ in range(seq_len - ids.shape[1]):
            p = torch.softmax(logits.float() / temperature, -1)
            nxt = torch.multinomial(p, 1, generator=g)
            seq.append(nxt)
            out = teacher(input_ids=nxt, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(seq, 1)


def perplexity(model, windows, batch: int = 4) -> float:
    """exp(mean next-token NLL) of a torch causal LM over token windows (n, seq_len), each window scored alone."""
    torch = _torch()
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            x = windows[i:i + batch]
            logits = model(input_ids=x).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1)
            nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
            count += x[:, 1:].numel()
    return math.exp(nll / count)


# ---------------------------------------------------------------- healing
def kl_to_teacher(student_logits, teacher_logits):
    """Mean over tokens of KL(teacher || student) at temperature 1 (the usual distillation loss; it is zero
    exactly when the student's next-token distributions equal the teacher's)."""
    torch = _torch()
    s = torch.log_softmax(student_logits.float(), -1)
    t = torch.log_softmax(teacher_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def distill(student, ctx: Context, steps: int, params=None, lr: float | None = None, stage: str = "heal",
            loss_fn: Callable | None = None, what: str = "KL") -> list[float]:
    """`steps` AdamW steps (warm-up, cosine decay, gradient clipping) on calibration batches; returns the losses.
    The loss is `loss_fn(batch)`, by default logit distillation (kl_to_teacher); `params`: which parameters train
    (default: all that require grad)."""
    torch = _torch()
    if steps <= 0:
        return []
    params = [p for p in (params if params is not None else student.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr or ctx.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, steps // 10)) *
                                              0.5 * (1 + math.cos(math.pi * i / steps)))

    def kl(x):
        with torch.no_grad():
            t = ctx.teacher(input_ids=x).logits
        return kl_to_teacher(student(input_ids=x).logits, t)

    loss_fn = loss_fn or kl
    student.train()
    losses = []
    for i, x in enumerate(ctx.batches(steps)):
        loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        ctx.progress(stage, i + 1, steps)
    student.eval()
    ctx.log(f"{stage}: {what} {losses[0]:.4f} -> {np.mean(losses[-max(1, steps // 10):]):.4f} over {steps} steps")
    return losses


# ---------------------------------------------------------------- GGUF from a state dict
def write_gguf(out: Path, arch: str, ckpt: HFCheckpoint, n_vocab: int, set_params: Callable, tensors: Iterator,
               outtype: str, quant_type: Callable | None = None, n_tensors: int | None = None, progress=None) -> None:
    """Write `tensors` [(GGUF name, f32 array)] with metadata `set_params(writer)` and the checkpoint's tokenizer to
    `out`, atomically (temporary name, renamed at the end). quant_type(name, array) -> gguf type (default: matrices
    whose rows fit the block take `outtype`, the rest F32)."""
    import gguf
    from gguf import GGMLQuantizationType as QT
    if outtype not in OUTTYPES or outtype in ("q4_k", "tq1_0", "tq2_0"):
        raise ConversionError(f"--outtype {outtype!r} is not available for variants (f32, f16, q8_0, q4_0, q4_1)")
    qt = OUTTYPES[outtype]

    def default_qt(name, a):
        if a.ndim < 2 or qt == QT.F32:
            return QT.F32
        return qt if a.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0] == 0 else QT.F16

    quant_type = quant_type or default_qt
    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        set_params(w)
        w.add_file_type(FILE_TYPES[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, ckpt, n_vocab)
        for i, (name, a) in enumerate(tensors):
            a = np.ascontiguousarray(a, dtype=np.float32)
            add_quantized(w, name, a, quant_type(name, a))
            if progress and n_tensors:
                progress("write", i + 1, n_tensors)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


# ---------------------------------------------------------------- the pipeline
def check_variant(src: Path, variant: str, heal_steps: int, batch: int, seq_len: int) -> None:
    """config.json and tensors validated as for GGUF, and the memory of the transform estimated (teacher and
    student in float32; with healing or pruning's importances, gradients and AdamW's two moments; the logits and
    activations of a calibration batch), before transformers reads the checkpoint."""
    from .checkpoint import check_torch_memory
    from .llama import LlamaConverter
    from .tokenizer import check_tokenizer
    ckpt = HFCheckpoint(src)
    if ckpt.architecture != "LlamaForCausalLM":
        raise ConversionError(f"variants take a LlamaForCausalLM checkpoint (got {ckpt.architecture!r})")
    h = LlamaConverter(ckpt).h
    check_tokenizer(ckpt, h.n_vocab)
    trains = heal_steps > 0 or variant == "prune"
    tokens = batch * seq_len
    act = 4 * tokens * (8 * h.n_vocab + h.n_layer * (12 * h.n_embd + 4 * h.n_ff)) * (2 if trains else 1)
    check_torch_memory(ckpt, 5 if trains else 2.5, f"the {variant} variant of {src}", act,
                       "fewer tokens per batch or a shorter --seq-len need less; healing needs gradients and "
                       "optimizer state for every parameter")


def load_teacher(src: Path):
    torch = _torch()
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConversionError("variants need transformers: pip install 'edgellm[convert]'") from None
    ckpt = HFCheckpoint(src)
    if ckpt.architecture != "LlamaForCausalLM":
        raise ConversionError(f"variants take a LlamaForCausalLM checkpoint (got {ckpt.architecture!r})")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return ckpt, model.eval()


def convert_variant(src, out, variant: str, opts: dict | None = None, heal_steps: int = 0, calib: str | None = None,
                    eval_text: str | None = None, fmt: str = "gguf", outtype: str = "f16", dtype: str = "fp32",
                    force: bool = False, seq_len: int = 256, n_calib: int = 64, n_eval: int = 16, lr: float = 1e-4,
                    batch: int = 4, seed: int = 0, threads: int | None = None,
                    progress: Callable[[str, int, int], None] | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """`edgellm convert SRC -o OUT --variant NAME`: transform, heal, write; returns the report (parameters, KV bytes
    per token, perplexity on held-out text of the original and of the variant before/after healing, wall time).
    calib / eval_text: text (not paths). Without calib the teacher writes its calibration text; without eval_text
    the held-out text is runtime/calibration.py's (or the calib text's last windows when calib is given)."""
    import copy
    t0 = time.time()
    torch = _torch()
    from tokenizers import Tokenizer
    from ..runtime.engine import physical_cores
    cls = variants().get(variant)
    if cls is None:
        raise ConversionError(f"unknown --variant {variant!r} (choose from {', '.join(sorted(VARIANTS))})")
    if fmt not in ("gguf", "onnx"):
        raise ConversionError(f"unknown --format {fmt!r} (choose gguf or onnx)")
    if heal_steps < 0:
        raise ConversionError(f"--heal must be >= 0 (got {heal_steps})")
    src, out = Path(src), Path(out)
    v = cls(**(opts or {}))
    if fmt == "gguf" and (outtype not in OUTTYPES or outtype in ("q4_k", "tq1_0", "tq2_0")):
        raise ConversionError(f"--outtype {outtype!r} is not available for variants (f32, f16, q8_0, q4_0, q4_1)")
    check_output(out, src, force)
    check_variant(src, variant, heal_steps, batch, seq_len)  # config, tensors, memory: before transformers loads
    torch.manual_seed(seed)
    torch.set_num_threads(threads or physical_cores())
    progress = progress or (lambda stage, i, n: None)
    log = log or (lambda msg: None)
    ckpt, teacher = load_teacher(src)
    teacher.requires_grad_(False)
    try:
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - the tokenizers library's own errors, as one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"{src / 'tokenizer.json'}: the tokenizers library cannot read it ({reason})") from None
    if calib is not None:
        windows = tokenize_windows(tok, calib, seq_len)
        if eval_text is None:  # hold out the last windows of the calibration text
            n_ev = min(n_eval, max(1, windows.shape[0] // 5))
            calib_w, eval_w = windows[:-n_ev], windows[-n_ev:]
        else:
            calib_w, eval_w = windows, None  # all of the given text (n_calib bounds only what the teacher writes)
    else:
        log(f"writing {n_calib} calibration sequences of {seq_len} tokens with the teacher")
        calib_w = generate_calibration(teacher, tok, n_calib, seq_len, seed)
        eval_w = None
    if eval_w is None:
        from ..runtime.calibration import CALIBRATION_TEXT
        text = eval_text if eval_text is not None else CALIBRATION_TEXT
        ids = tok.encode(text).ids
        L = min(seq_len, len(ids))
        eval_w = tokenize_windows(tok, text, L, n_eval)
    ctx = Context(teacher=teacher, calib=calib_w, heal_steps=heal_steps, lr=lr, batch=batch, seed=seed,
                  progress=progress, log=log)
    report = dict(variant=variant, options={k: o for k, o in (opts or {}).items() if o is not None}, source=str(src),
                  out=str(out), format=fmt, outtype=outtype if fmt == "gguf" else dtype, heal_steps=heal_steps,
                  calib_tokens=int(calib_w.numel()), eval_tokens=int(eval_w.numel()),
                  params_original=n_params(teacher), kv_bytes_per_token_original=Variant.kv_bytes_per_token(v, teacher))
    report["ppl_original"] = perplexity(teacher, eval_w)
    student = v.transform(copy.deepcopy(teacher).requires_grad_(True), ctx)
    report["params"] = n_params(student)
    report["params_fraction"] = report["params"] / report["params_original"]
    report["kv_bytes_per_token"] = v.kv_bytes_per_token(student)
    in_transform = bool(heal_steps and getattr(v, "heals_in_transform", False))
    # a variant that heals between its stages has no unhealed student to score (None: prune it with --heal 0)
    report["ppl_before_heal"] = None if in_transform else perplexity(student, eval_w)
    if heal_steps and not getattr(v, "heals_in_transform", False):  # pruning heals between its stages
        t = time.time()
        losses = v.heal(student, ctx)
        report["heal_seconds"] = time.time() - t
        report["heal_loss_first_last"] = [losses[0], float(np.mean(losses[-max(1, len(losses) // 10):]))] if losses else []
    report["ppl_after_heal"] = perplexity(student, eval_w) if heal_steps else report["ppl_before_heal"]
    if fmt == "gguf":
        v.write_gguf(student, ckpt, out, outtype, progress)
    else:
        v.write_onnx(student, ckpt, out, dtype, progress)
    report["seconds"] = time.time() - t0
    return report


def format_report(r: dict) -> str:
    """The report as a small Markdown table."""
    rows = [("parameters", f"{r['params_original']:,}", f"{r['params']:,} ({r['params_fraction']:.1%})"),
            ("KV bytes / token (f16)", f"{r['kv_bytes_per_token_original']:,}",
             f"{r['kv_bytes_per_token']:,}" + (f" ({r['kv_bytes_per_token_original'] / r['kv_bytes_per_token']:.1f}x "
                                              "smaller)" if r['kv_bytes_per_token'] else " (constant state)")),
            ("perplexity (held-out)", f"{r['ppl_original']:.3f}",
             ("n/a before healing (healed between stages)" if r['ppl_before_heal'] is None else
              f"{r['ppl_before_heal']:.3f} before healing") + f", {r['ppl_after_heal']:.3f} after {r['heal_steps']} steps")]
    lines = [f"variant {r['variant']} {r['options']} -> {r['out']} ({r['seconds']:.0f} s)", "",
             "| | original | variant |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)
