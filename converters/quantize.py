"""`edgellm quantize IN.gguf OUT.gguf TYPE`: requantize a GGUF file, as llama.cpp's `llama-quantize` does.

Each tensor's type follows llama.cpp's mixture rules (`llama_tensor_get_type` in src/llama-quant.cpp), for the
file types edgellm writes:
  - only weights are quantized: 2-D (or more) tensors whose name ends in "weight", except norms, the MoE router,
    position / token-type embeddings and SSM convolutions; everything else is copied unchanged;
  - the output head (and the token embedding when it doubles as the head, i.e. no `output.weight`) takes Q6_K,
    or Q8_0 when its rows are not a multiple of the default type's block (a Q8_0 file keeps Q8_0);
  - a separate token embedding of a ternary (TQ1_0 / TQ2_0) file takes Q4_K;
  - Q4_K_M: `attn_v` (and fused `attn_qkv` / `attn_kv_b`) and `ffn_down` take Q6_K in the layers where
    llama.cpp's `use_more_bits(i, n)` holds: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2;
  - a row length that the chosen type's block does not divide falls back: Q4_K -> Q5_0, Q6_K -> Q8_0,
    TQ1_0 / TQ2_0 -> Q4_0; F16 if even that does not divide it (llama.cpp's `tensor_type_fallback`).
The rules llama.cpp applies only to 70B Llamas and mixtures of experts (which need Q5_K) are not implemented:
such files are refused rather than quantized differently.

Sources: F32, F16, BF16, Q8_0, TQ1_0 and TQ2_0 tensors (decoded with gguf-py); a tensor already of its target
type is copied byte for byte. Encoders: gguf-py for F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, TQ1_0, TQ2_0 (bit-exact
with ggml's reference quantizers) and `kquants` for Q4_K and Q6_K. Metadata and tokenizer are carried over;
`general.file_type` and `general.quantization_version` are set. The output is written to a temporary name
beside it and renamed into place at the end; the input is never overwritten.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T, TENSOR_NAMES

from ..runtime.dirs import atomic_output
from ..runtime.errors import UnsupportedError
from ..runtime.gguf_file import GGUFFile
from . import kquants
from .checkpoint import ConversionError

LFT = gguf.LlamaFileType


@dataclass(frozen=True)
class FileType:
    name: str  # as llama-quantize prints it
    ftype: LFT  # general.file_type
    default: QT  # the type of most weights


FILE_TYPES = {
    "f32": FileType("F32", LFT.ALL_F32, QT.F32),
    "f16": FileType("F16", LFT.MOSTLY_F16, QT.F16),
    "bf16": FileType("BF16", LFT.MOSTLY_BF16, QT.BF16),
    "q8_0": FileType("Q8_0", LFT.MOSTLY_Q8_0, QT.Q8_0),
    "q4_0": FileType("Q4_0", LFT.MOSTLY_Q4_0, QT.Q4_0),
    "q4_1": FileType("Q4_1", LFT.MOSTLY_Q4_1, QT.Q4_1),
    "q4_k_m": FileType("Q4_K_M", LFT.MOSTLY_Q4_K_M, QT.Q4_K),
    "tq1_0": FileType("TQ1_0", LFT.MOSTLY_TQ1_0, QT.TQ1_0),
    "tq2_0": FileType("TQ2_0", LFT.MOSTLY_TQ2_0, QT.TQ2_0),
}
ALIASES = {"q4_k": "q4_k_m"}  # llama-quantize takes Q4_K for Q4_K_M too
SOURCE_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.TQ1_0, QT.TQ2_0)
TERNARY = (QT.TQ1_0, QT.TQ2_0)
FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0, QT.TQ1_0: QT.Q4_0, QT.TQ2_0: QT.Q4_0}


def _encode_gguf_py(qtype: QT):
    return lambda rows: gguf.quants.quantize(rows, qtype)


# type -> (rows (R, C) f32 -> the file's encoding: f32 / f16 arrays, or (R, row_bytes) uint8)
ENCODERS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.F32: lambda rows: np.ascontiguousarray(rows, dtype=np.float32),
    QT.F16: lambda rows: rows.astype(np.float16),
    QT.Q4_K: kquants.quantize_q4_k,
    QT.Q6_K: kquants.quantize_q6_k,
    **{q: _encode_gguf_py(q) for q in (QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.TQ1_0, QT.TQ2_0)},
}


# ----------------------------------------------------------------------------------------- the mixture
def _tname(t: T) -> str:
    return TENSOR_NAMES[t] + ".weight"


def _kind(t: T) -> str:
    return TENSOR_NAMES[t].rsplit(".", 1)[-1]  # "blk.{bid}.attn_v" -> "attn_v"


OUTPUT, TOKEN_EMBD = _tname(T.OUTPUT), _tname(T.TOKEN_EMBD)
TOKEN_EMBDS = (TOKEN_EMBD, _tname(T.PER_LAYER_TOKEN_EMBD))
ATTN_V_LIKE = tuple(_kind(t) + ".weight" for t in (T.ATTN_QKV, T.ATTN_KV_B, T.ATTN_V))  # llama.cpp: substrings
FFN_DOWN = _kind(T.FFN_DOWN)  # also matches ffn_down_exps / ffn_down_shexp, as in llama.cpp
NOT_QUANTIZED = tuple(_kind(t) + ".weight" for t in (T.FFN_GATE_INP, T.SSM_CONV1D)) + (
    _tname(T.POS_EMBD), _tname(T.TOKEN_TYPES))
_LAYER = re.compile(r"blk\.(\d+)\.")


def _layer(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the *_M mixtures."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _n_dims(shape: tuple[int, ...]) -> int:
    # ggml_n_dims: trailing ne of 1 (leading in NumPy order) do not count
    for i, d in enumerate(shape):
        if d > 1:
            return len(shape) - i
    return 1


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    return (_n_dims(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and not any(s in name for s in NOT_QUANTIZED))


def tensor_types(tensors: dict[str, tuple[tuple[int, ...], QT]], ft: FileType, n_layer: int,
                 fallbacks: list[str] | None = None) -> dict[str, QT]:
    """{name: (NumPy shape, current type)} -> {name: output type}, by llama.cpp's rules for the file type
    (names whose row length forced a fallback type are appended to `fallbacks`)."""
    default = ft.default
    quantized = default not in (QT.F32, QT.F16, QT.BF16)
    # llama.cpp visits tensors sorted by layer, then name; its attn_v counter runs in that order
    order = sorted(tensors, key=lambda n: (_layer(n), n))
    n_attn_v = sum(1 for n in order if any(s in n for s in ATTN_V_LIKE))
    tied = OUTPUT not in tensors
    i_attn_v = i_ffn_down = 0
    out = {}
    for name in order:
        shape, cur = tensors[name]
        if not allows_quantization(name, shape):
            out[name] = cur
            continue
        new = default
        if quantized:
            if name == OUTPUT or (tied and name in TOKEN_EMBDS):
                new = QT.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[default][0] else (
                    default if default == QT.Q8_0 else QT.Q6_K)
            elif name in TOKEN_EMBDS:
                if default in TERNARY:
                    new = QT.Q4_K
            elif any(s in name for s in ATTN_V_LIKE):
                if ft.ftype == LFT.MOSTLY_Q4_K_M and use_more_bits(i_attn_v, n_attn_v):
                    new = QT.Q6_K
                i_attn_v += 1
            elif FFN_DOWN in name:
                if ft.ftype == LFT.MOSTLY_Q4_K_M and use_more_bits(i_ffn_down, n_layer):
                    new = QT.Q6_K
                i_ffn_down += 1
            fb = _fallback(name, shape, new)
            if fb != new and fallbacks is not None:
                fallbacks.append(name)
            new = fb
        out[name] = new
    return out


def _fallback(name: str, shape: tuple[int, ...], qtype: QT) -> QT:
    cols = shape[-1]
    if cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    if qtype not in FALLBACK:
        raise ConversionError(f"tensor {name!r}: {cols} columns are not a multiple of {qtype.name}'s block of "
                              f"{gguf.GGML_QUANT_SIZES[qtype][0]} values (llama.cpp has no fallback type either)")
    fb = FALLBACK[qtype]
    return fb if cols % gguf.GGML_QUANT_SIZES[fb][0] == 0 else QT.F16


# ----------------------------------------------------------------------------------------- the command
@dataclass
class QuantizeReport:
    input: str
    output: str
    type: str
    file_type: int
    tensors: int
    quantized: int
    copied: int
    types: dict[str, int] = field(default_factory=dict)  # output type name -> tensor count
    fallbacks: list[str] = field(default_factory=list)  # tensors whose row length forced a fallback type
    input_bytes: int = 0
    output_bytes: int = 0
    params: int = 0
    bits_per_weight: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_type(qtype: str) -> FileType:
    key = ALIASES.get(qtype.lower(), qtype.lower())
    if key not in FILE_TYPES:
        raise ConversionError(f"unknown quantization type {qtype!r} (choose from {', '.join(FILE_TYPES)})")
    return FILE_TYPES[key]


def check_paths(src: Path, out: Path, force: bool) -> None:
    """The input exists and is a file; the output is not the input, and not an existing file without force."""
    if not src.exists():
        raise ConversionError(f"no such file: {src}")
    if src.is_dir():
        raise ConversionError(f"{src} is a directory, not a GGUF file")
    if out.exists() or out.is_symlink():
        if out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src)):
            raise ConversionError(f"refusing to write {out}: it is the input file")
        if out.is_dir():
            raise ConversionError(f"{out} is a directory")
        if not force:
            raise ConversionError(f"{out} exists (use --force to overwrite it)")
    elif out.resolve() == src.resolve():
        raise ConversionError(f"refusing to write {out}: it is the input file")
    if not out.parent.resolve().is_dir():
        raise ConversionError(f"output folder {out.parent} does not exist")


def _decode(t) -> np.ndarray:
    """A source tensor -> (rows, cols) f32."""
    cols = t.shape[-1]
    if t.qtype == QT.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(-1, cols)
    if t.qtype == QT.F16:
        return np.asarray(t.data).reshape(-1, cols).astype(np.float32)
    return gguf.quants.dequantize(np.asarray(t.data).reshape(-1, t.data.shape[-1]), t.qtype).reshape(-1, cols)


def _check_ternary(name: str, rows: np.ndarray, qtype: QT) -> None:
    """TQ1_0 / TQ2_0 store {-d, 0, d} per 256 values (d = the block's largest |x|): anything else is lost."""
    b = np.abs(rows.reshape(-1, kquants.QK_K))
    d = b.max(axis=1, keepdims=True)
    if not ((b == 0) | (np.abs(b - d) <= 1e-3 * d)).all():
        raise ConversionError(f"tensor {name!r} is not ternary (values other than 0 and ±d in a block of 256): "
                              f"{qtype.name} is for ternary (BitNet b1.58) weights; choose q8_0, q4_k_m, q4_0 or "
                              f"q4_1 for this file")


def _out_layout(shape: tuple[int, ...], qtype: QT) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes) of a tensor's encoding as GGUFWriter.add_tensor_info takes it."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = math.prod(shape) // block * size
    if qtype == QT.F32:
        return shape, np.dtype(np.float32), nbytes
    if qtype == QT.F16:
        return shape, np.dtype(np.float16), nbytes
    return tuple(gguf.quant_shape_to_byte_shape(shape, qtype)), np.dtype(np.uint8), nbytes


def quantize_gguf(src: str | os.PathLike, out: str | os.PathLike, qtype: str, force: bool = False,
                  progress: Callable[[int, int, str], None] | None = None) -> QuantizeReport:
    """Requantize the GGUF file `src` into `out` with the file type `qtype` (see FILE_TYPES)."""
    t0 = time.perf_counter()
    ft = parse_type(qtype)
    src, out = Path(src), Path(out)
    check_paths(src, out, force)
    f = GGUFFile(src)
    arch = f.get_str(gguf.Keys.General.ARCHITECTURE)
    n_layer = f.get_int(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch), 0, lo=0, hi=1 << 16)
    if f.get_int(gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch), 0, lo=0, hi=1 << 20) > 1 and ft.default == QT.Q4_K:
        raise UnsupportedError("mixture-of-experts files are not supported by q4_k_m (llama.cpp gives their "
                               "expert tensors Q5_K, which edgellm does not write)")
    if (arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA] and n_layer == 80 and ft.default == QT.Q4_K
            and f.get(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch))
            != f.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch))):
        raise UnsupportedError("a 70B Llama is not supported by q4_k_m (llama.cpp gives its attn_v Q5_K, which "
                               "edgellm does not write)")
    fallbacks: list[str] = []
    types = tensor_types({n: (t.shape, t.qtype) for n, t in f.tensors.items()}, ft, n_layer, fallbacks)
    for name, t in f.tensors.items():
        if types[name] != t.qtype and t.qtype not in SOURCE_TYPES:
            raise ConversionError(f"tensor {name!r} is {t.qtype.name}: quantize reads "
                                  f"{', '.join(q.name for q in SOURCE_TYPES)} weights (requantizing "
                                  f"{t.qtype.name} would compound its error)")
    report = QuantizeReport(str(src), str(out), ft.name, int(ft.ftype), len(f.tensors), 0, 0,
                            fallbacks=fallbacks, input_bytes=f.file_size)
    with atomic_output(out) as tmp:
        _write(f, src, tmp, arch, ft, types, report, progress)
    report.output_bytes = out.stat().st_size
    report.params = sum(t.n_elements for t in f.tensors.values())
    report.bits_per_weight = round(8 * sum(_out_layout(t.shape, types[n])[2] for n, t in f.tensors.items())
                                   / max(report.params, 1), 4)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _write(f: GGUFFile, src: Path, path: Path, arch: str, ft: FileType, types: dict[str, QT],
           report: QuantizeReport, progress) -> None:
    reader = gguf.GGUFReader(src)  # the metadata with its value types, to copy it as it is
    w = gguf.GGUFWriter(str(path), arch)
    skip = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION,
            gguf.Keys.General.ALIGNMENT}
    for fld in reader.fields.values():
        if fld.name in skip or fld.name.startswith("GGUF."):
            continue
        sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(fld.name, fld.contents(), fld.types[0], sub_type=sub)
    if f.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        w.add_custom_alignment(f.alignment)
    w.add_file_type(int(ft.ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, t in f.tensors.items():
        shape, dtype, nbytes = _out_layout(t.shape, types[name])
        w.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=types[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    counts: dict[str, int] = {}
    for i, (name, t) in enumerate(f.tensors.items()):
        qt = types[name]
        if qt == t.qtype:
            w.write_tensor_data(np.asarray(t.data))
            report.copied += 1
        else:
            rows = _decode(t)
            if not np.isfinite(rows).all():
                raise ConversionError(f"tensor {name!r} has non-finite values (NaN or inf): the input is damaged")
            if qt in TERNARY:
                _check_ternary(name, rows, qt)
            enc = ENCODERS[qt](rows)
            shape, dtype, _ = _out_layout(t.shape, qt)
            w.write_tensor_data(np.ascontiguousarray(enc, dtype=dtype).reshape(shape))
            report.quantized += 1
        counts[qt.name] = counts.get(qt.name, 0) + 1
        if progress:
            progress(i + 1, len(f.tensors), name)
    w.close()
    report.types = dict(sorted(counts.items()))
