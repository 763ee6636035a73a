"""HF checkpoint -> ONNX folder: one decoder graph with KV cache (prefill and decode) named as optimum
names it, fp32 or int4 weight-only (`MatMulNBits`), with config.json, generation_config.json and the
tokenizer files beside it, so that `optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(OUT_DIR)`
and `edgellm run OUT_DIR` both load it, and a `genai_config.json` so that ONNX Runtime GenAI
(`onnxruntime_genai.Model(OUT_DIR)`) loads and runs it too.

Exporters form a registry keyed on the HF class name. Classes optimum knows (Llama) go through
optimum's own exporter; the others (BitNet) through the shared builder in `onnx_graph.py` with their
per-architecture linear layer / block. Everything is written into a temporary folder beside the
output and renamed into place at the end: a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import ConversionError, HFCheckpoint, check_torch_memory
from .gguf_convert import check_output

DTYPES = ("fp32", "int4")
MODEL_FILE = "model.onnx"
# files copied from the checkpoint when the exporter did not write them
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")
INT4_BLOCK_SIZE = 32  # MatMulNBits block along K (ONNX Runtime GenAI's CPU default)
GENAI_CONFIG = "genai_config.json"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"  # optimum's names, GenAI's %d patterns
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"

Exporter = Callable[[Path, Path], None]  # (checkpoint folder, output folder) -> writes output/model.onnx
ONNX_EXPORTERS: dict[str, Exporter] = {}
BUILDER_EXPORTERS: dict[str, Exporter] = {}  # the shared builder's version, also for classes optimum knows


def register_onnx(*hf_classes: str, builder: bool = False):
    def deco(fn):
        for n in hf_classes:
            (BUILDER_EXPORTERS if builder else ONNX_EXPORTERS)[n] = fn
            if builder:
                ONNX_EXPORTERS.setdefault(n, fn)
        return fn
    return deco


def _need(*mods: str) -> None:
    import importlib
    for m in mods:
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise ConversionError(f"--format onnx needs {e.name or m}: pip install 'edgellm[convert,onnx]'") from None


def _load_hf(src: Path):
    """The checkpoint as a float32 transformers model (torch.compile'd helpers run eagerly)."""
    import torch
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings(), torch.compiler.set_stance("force_eager"):
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ConversionError(f"transformers cannot load {src}: {str(e).strip().splitlines()[0]}") from None
    return model.eval()


# ---------------------------------------------------------------------------- exporters
@register_onnx("LlamaForCausalLM")
def export_with_optimum(src: Path, out: Path) -> None:
    """optimum-onnx's exporter, task text-generation-with-past (one graph for prefill and decode)."""
    _need("optimum.exporters.onnx")
    from optimum.exporters.onnx import main_export
    import logging
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = [logging.getLogger(n) for n in ("optimum", "transformers", "torch.onnx")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            main_export(str(src), output=str(out), task="text-generation-with-past", device="cpu", dtype="fp32",
                        do_validation=False, local_files_only=True, library_name="transformers")
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - optimum's and torch's errors, as one line
            raise ConversionError(f"optimum's ONNX export failed: {type(e).__name__}: "
                                  f"{(str(e).strip().splitlines() or [''])[0]}") from None
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)


@register_onnx("LlamaForCausalLM", builder=True)
def export_llama_builder(src: Path, out: Path) -> None:
    """The shared builder with the plain Llama block (a check of the builder; optimum is the default)."""
    from .onnx_graph import build_decoder, export_decoder
    graph = build_decoder(_load_hf(src))  # the HF model is freed before tracing
    export_decoder(graph, out / MODEL_FILE)


def _unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """transformers' BitNet packing (integrations/bitnet.py pack_weights): uint8 (rows/4, cols), row
    r + i*rows/4 of the ternary matrix in bits 2i..2i+1 of packed row r, stored as value + 1."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.concatenate([((packed >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)], axis=0)


def bitnet_linear(module):
    """The linear factory for BitNet b1.58: each HF linear becomes the ternary matmul it computes.

    - `BitLinear` (packed uint8 weight): y = (q(x) @ W^T) / (s(x) * weight_scale)
    - `AutoBitLinear` offline (ternary float weight): y = (q(x)/s(x) @ W^T) * weight_scale
    - `AutoBitLinear` online (latent weight): W = round(w / mean|w|) clipped to [-1, 1], times mean|w|
    with q(x) = round(x * s(x)) clipped to [-128, 127], s(x) = 127 / max|x| per token; a plain
    nn.Linear (a BitNet config without quantization_config) stays a plain matmul."""
    import torch
    from torch import nn
    from .onnx_graph import Linear, TernaryLinear, norm_from
    cls = type(module).__name__
    pre = getattr(module, "rms_norm", None)
    pre = norm_from(pre) if pre is not None else None
    bias = getattr(module, "bias", None)
    if cls == "BitLinear":
        w = _unpack_ternary(module.weight.detach().cpu().numpy())
        scale = 1.0 / float(module.weight_scale.detach().float().reshape(-1)[0])
        return TernaryLinear(torch.from_numpy(w), scale, bias, pre_norm=pre)
    if cls == "AutoBitLinear":
        w = module.weight.detach().float()
        if module.online_quant:
            s = w.abs().mean().clamp(min=1e-5)
            w, scale = (w / s).round().clamp(-1, 1), float(s)
        else:
            scale = float(module.weight_scale.detach().float().reshape(-1)[0])
        if not torch.equal(w, w.round().clamp(-1, 1)):
            raise ConversionError("a BitNet AutoBitLinear weight is not ternary")
        return TernaryLinear(w.to(torch.int8), scale, bias, pre_norm=pre)
    if isinstance(module, nn.Linear):
        return Linear(module.weight, module.bias)
    raise ConversionError(f"the ONNX builder does not know BitNet linear class {cls}")


@register_onnx("BitNetForCausalLM", builder=True)
def export_bitnet(src: Path, out: Path) -> None:
    """BitNet b1.58 through the shared builder: Llama-shaped block (sub-norms and ReLU² picked up
    from the HF layer and config) with ternary linears."""
    from .onnx_graph import build_decoder, export_decoder
    graph = build_decoder(_load_hf(src), linear=bitnet_linear)  # the HF model is freed before tracing
    export_decoder(graph, out / MODEL_FILE)


# ---------------------------------------------------------------------------- int4
def _untie_transposed_weights(model) -> int:
    """MatMul(x, Transpose(W)) with W an initializer (the tied LM head: optimum's graph reads the token
    embedding through a Transpose) -> MatMul(x, W^T as its own initializer), so that the head is
    quantized too (the embedding's Gather keeps the f32 table). Returns how many were rewritten."""
    from onnx import numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    done = {}
    for n in g.node:
        if n.op_type != "MatMul" or len(n.input) < 2:
            continue
        p = prod.get(n.input[1])
        if p is None or p.op_type != "Transpose" or p.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0] or len(inits[p.input[0]].dims) != 2:
            continue
        name = p.output[0] + "_const"
        if name not in done:
            w = numpy_helper.to_array(inits[p.input[0]], base_dir="")
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
            done[name] = p
        n.input[1] = name
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for p in done.values():
        if not any(o in used for o in p.output):
            g.node.remove(p)
    return len(done)


def quantize_int4(path: Path, block_size: int = INT4_BLOCK_SIZE, accuracy_level: int = 4) -> None:
    """Weight-only int4 in place: every MatMul with a constant 2-D weight (the LM head included) ->
    MatMulNBits, symmetric blocks of `block_size` along K; accuracy_level 4 lets the CPU kernel use
    int8 activations (what ONNX Runtime GenAI's builder picks for CPU)."""
    _need("onnxruntime.quantization.matmul_nbits_quantizer")
    import logging
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)  # the quantizer logs every node at INFO
    try:
        model = onnx.load(str(path))
        _untie_transposed_weights(model)
        q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level)
        q.process()
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    q.model.topological_sort()
    model = q.model.model
    for f in path.parent.glob(path.name + "*data"):
        f.unlink()  # the fp32 weights' external data (already loaded): replaced below
    n_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    big = n_bytes > (1800 << 20)  # protobuf's 2 GiB limit: weights beside the graph, as optimum does
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + "_data", size_threshold=1024)


# ---------------------------------------------------------------------------- the command
def convert_to_onnx(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32", force: bool = False,
                    builder: bool = False, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Convert the HF checkpoint folder `src` to the ONNX folder `out`. builder=True uses the shared
    builder even for classes optimum exports. Returns the output folder."""
    if dtype not in DTYPES:
        raise ConversionError(f"unknown --dtype {dtype!r} for --format onnx (choose from {', '.join(DTYPES)})")
    src, out = Path(src), Path(out)
    ckpt = HFCheckpoint(src)  # config.json, safetensors (all shards present)
    if not (src / "tokenizer.json").exists():
        raise ConversionError(f"{src}: missing tokenizer.json")
    check_output(out, src, force)
    arch = ckpt.architecture
    exporter = (BUILDER_EXPORTERS if builder else ONNX_EXPORTERS).get(arch)
    if exporter is None:
        known = sorted(BUILDER_EXPORTERS if builder else ONNX_EXPORTERS)
        raise ConversionError(f"model class {arch!r} cannot be exported to ONNX (supported: {', '.join(known)})")
    _need("torch", "transformers", "onnx", "onnxruntime")
    from .gguf_convert import CONVERTERS
    from .tokenizer import check_tokenizer
    check_tokenizer(ckpt, CONVERTERS[arch](ckpt).vocab_size())  # config.json, tensors, tokenizer files: as for GGUF
    check_torch_memory(ckpt, 4 if dtype == "fp32" else 6, f"exporting {src} to ONNX")  # model, trace, graph
    if exporter is export_with_optimum and arch in BUILDER_EXPORTERS:
        import importlib.util
        if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.exporters") is None:
            exporter = BUILDER_EXPORTERS[arch]  # the same interface without optimum installed
    write_onnx_folder(out, src, lambda tmp: exporter(src, tmp), dtype, progress)
    return out


def write_onnx_folder(out: Path, src: Path, export: Callable[[Path], None], dtype: str = "fp32",
                      progress: Callable[[int, int, str], None] | None = None) -> None:
    """The one way an ONNX folder is written: `export(tmp)` writes model.onnx (and anything else) into a temporary
    folder, int4 weight-only quantization if asked, the checkpoint `src`'s tokenizer and config files beside it,
    then the folder is renamed into place (nothing partial is left behind on failure)."""
    if dtype not in DTYPES:
        raise ConversionError(f"unknown --dtype {dtype!r} for --format onnx (choose from {', '.join(DTYPES)})")
    steps = ["export", "quantize int4", "tokenizer and config"] if dtype == "int4" else ["export", "tokenizer and config"]
    done = 0

    def step(name):
        nonlocal done
        done += 1
        if progress:
            progress(done, len(steps), name)

    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        export(tmp)
        if not (tmp / MODEL_FILE).exists():
            raise ConversionError(f"the exporter wrote no {MODEL_FILE}")
        step("export")
        if dtype == "int4":
            quantize_int4(tmp / MODEL_FILE)
            step("quantize int4")
        for name in SIDE_FILES:
            if (src / name).exists() and not (tmp / name).exists():
                shutil.copyfile(src / name, tmp / name)
        write_genai_config(tmp)
        step("tokenizer and config")
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _static_dim(value_info, axis: int) -> int | None:
    d = value_info.type.tensor_type.shape.dim
    return int(d[axis].dim_value) if axis < len(d) and d[axis].HasField("dim_value") else None


def genai_config(folder: Path) -> dict | None:
    """ONNX Runtime GenAI's genai_config.json for the decoder graph in `folder` (inputs input_ids,
    attention_mask, [position_ids], past_key_values.N.key/value -> logits, present.N.key/value, the past
    and present held in separate buffers as optimum's graphs need), or None for a graph GenAI cannot drive
    (no KV cache, e.g. the linear-attention variant; per-layer cache shapes, e.g. a pruned variant).
    Stop tokens are edgellm's for the same tokenizer files, so that both stop on the same tokens."""
    import onnx
    from ..runtime.errors import EdgeLLMError
    from ..runtime.tokenizer import Tokenizer
    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    ins = {i.name: i for i in graph.input}
    outs = {o.name for o in graph.output}
    n_layer = 0
    while PAST_KEY % n_layer in ins and PAST_VALUE % n_layer in ins:
        n_layer += 1
    if not n_layer or not {"input_ids", "attention_mask"} <= set(ins) or "logits" not in outs:
        return None
    if any(PRESENT_KEY % i not in outs or PRESENT_VALUE % i not in outs for i in range(n_layer)):
        return None
    dims = {(_static_dim(ins[p % i], 1), _static_dim(ins[p % i], 3)) for i in range(n_layer)
            for p in (PAST_KEY, PAST_VALUE)}
    if len(dims) != 1 or None in next(iter(dims)):
        return None  # GenAI sizes one cache shape for every layer, from static kv-head and head dims
    (n_kv, head_size), = dims
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")) \
        if (folder / "generation_config.json").exists() else {}
    try:
        tok = Tokenizer.from_hf(folder, int(cfg["vocab_size"]))
        eos, tok_bos = sorted(tok.eog_ids, key=lambda i: (i != tok.eos_id, i)), tok.bos_id
    except EdgeLLMError:  # a tokenizer edgellm cannot build: the checkpoint's own stop tokens
        ids = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos, tok_bos = [int(i) for i in (ids if isinstance(ids, list) else [ids] if ids is not None else [])], None
    if not eos:
        return None
    bos = gen.get("bos_token_id", cfg.get("bos_token_id", tok_bos))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    ctx = int(cfg.get("max_position_embeddings") or 4096)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    if "position_ids" in ins:
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "type": "llama",  # GenAI's decoder-only model for this graph interface
            "bos_token_id": int(bos if bos is not None else eos[0]),
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": int(pad if pad is not None else eos[0]),
            "context_length": ctx,
            "vocab_size": int(cfg["vocab_size"]),
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_size,
                "hidden_size": int(cfg.get("hidden_size") or head_size * int(cfg["num_attention_heads"])),
                "num_attention_heads": int(cfg.get("num_attention_heads") or n_kv),
                "num_hidden_layers": n_layer,
                "num_key_value_heads": n_kv,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY,
                            "present_value_names": PRESENT_VALUE},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": ctx,
                   "min_length": 0, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_genai_config(folder: Path) -> bool:
    """Write genai_config.json into the ONNX folder when ONNX Runtime GenAI can run its graph."""
    cfg = genai_config(folder)
    if cfg is not None:
        (folder / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return cfg is not None


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place (an existing output, allowed by --force, is moved aside
    first and deleted after)."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
