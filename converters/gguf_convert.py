"""HF checkpoint -> GGUF: a registry of converters keyed on the HF class name (after llama.cpp's
convert_hf_to_gguf.py), each with hooks `set_gguf_parameters` and `modify_tensors`; tensors are
renamed with gguf-py's name map, quantized with gguf-py, written with `GGUFWriter` to a temporary
file and renamed into place at the end. Every source tensor is consumed or explicitly dropped."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

from ..runtime.dirs import atomic_output
from .checkpoint import ConversionError, HFCheckpoint, check_conversion
from .quantize import quantize_gguf
from .tokenizer import add_tokenizer

OUTTYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1,
            "q4_k": QT.Q4_K, "tq1_0": QT.TQ1_0, "tq2_0": QT.TQ2_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M,
              "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0, "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0}

CONVERTERS: dict[str, type["Converter"]] = {}


def register(*hf_classes: str):
    def deco(cls):
        for n in hf_classes:
            CONVERTERS[n] = cls
        return cls
    return deco


class Converter:
    """Base: a decoder-only model whose tensors gguf-py's name map knows."""
    arch: gguf.MODEL_ARCH

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt, self.hp = ckpt, ckpt.config
        self.n_layer = int(self._hp("num_hidden_layers"))
        self.name_map = gguf.get_tensor_name_map(self.arch, self.n_layer)

    def _hp(self, key: str, default=None):
        v = self.hp.get(key, default)
        if v is None:
            raise ConversionError(f"config.json has no {key!r}")
        return v

    # -- hooks ----------------------------------------------------------------------
    def set_gguf_parameters(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def modify_tensors(self, name: str, data: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """Source tensor (HF name) -> zero or more (GGUF name, float32 array)."""
        mapped = self.name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ConversionError(f"cannot map tensor {name!r} to a GGUF name")
        yield mapped, data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter(())

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF name -> numpy shape of every tensor the output must hold (checked; none may be missing)."""
        return {}

    def vocab_size(self) -> int:
        return int(self._hp("vocab_size"))

    def quant_type(self, name: str, data: np.ndarray, outtype: QT) -> QT:
        """Norms, biases and 1-D tensors stay F32; matrices take the requested type when their rows fit
        its block size (F16 otherwise)."""
        if data.ndim < 2 or outtype == QT.F32:
            return QT.F32
        block = gguf.GGML_QUANT_SIZES[outtype][0]
        if data.shape[-1] % block:
            return QT.F16
        return outtype


def decoder_shapes(n_layer: int, d: int, n_ff: int, n_head: int, n_head_kv: int, head_dim: int, n_vocab: int,
                   tied: bool, sub_norms: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor shapes (numpy order) of a Llama-shaped decoder in llama.cpp's names."""
    from gguf import MODEL_TENSOR as T, TENSOR_NAMES
    n = lambda t, i=None: TENSOR_NAMES[t].format(bid=i) + ".weight"  # noqa: E731
    shapes = {n(T.TOKEN_EMBD): (n_vocab, d), n(T.OUTPUT_NORM): (d,)}
    if not tied:
        shapes[n(T.OUTPUT)] = (n_vocab, d)
    for i in range(n_layer):
        shapes.update({n(T.ATTN_NORM, i): (d,), n(T.ATTN_Q, i): (n_head * head_dim, d),
                       n(T.ATTN_K, i): (n_head_kv * head_dim, d), n(T.ATTN_V, i): (n_head_kv * head_dim, d),
                       n(T.ATTN_OUT, i): (d, n_head * head_dim), n(T.FFN_NORM, i): (d,),
                       n(T.FFN_GATE, i): (n_ff, d), n(T.FFN_UP, i): (n_ff, d), n(T.FFN_DOWN, i): (d, n_ff)})
        if sub_norms:
            shapes.update({n(T.ATTN_SUB_NORM, i): (n_head * head_dim,), n(T.FFN_SUB_NORM, i): (n_ff,)})
    return shapes


# the largest magnitude a tensor may hold in each output type whose values or block scales are float16
_F16_MAX = 65504.0
F16_RANGE = {QT.F16: _F16_MAX, QT.Q8_0: _F16_MAX * 127, QT.Q4_0: _F16_MAX * 8, QT.Q4_1: _F16_MAX,
             QT.TQ1_0: _F16_MAX, QT.TQ2_0: _F16_MAX}


def check_range(name: str, data: np.ndarray, qtype: QT) -> None:
    """A tensor whose values overflow the output type's float16 values or scales is an error (it would be
    written as infinities)."""
    lim = F16_RANGE.get(qtype)
    if lim is not None and data.size and (m := float(np.abs(data).max())) > lim:
        raise ConversionError(f"tensor {name!r} holds values up to {m:.3g}, beyond what {qtype.name} can store "
                              f"(|x| <= {lim:.6g}; the outtype f32 keeps them)")


def add_quantized(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: QT) -> None:
    """One tensor (any float array, GGUF name `name`) -> w, stored as qtype: F32/F16 as arrays, a block type as
    gguf-py's quantized bytes; values beyond what qtype can hold are an error (check_range)."""
    check_range(name, data, qtype)
    if qtype in (QT.F32, QT.F16):
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32 if qtype == QT.F32 else np.float16))
        return
    q = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
    w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)


def check_output(out: Path, src: Path, force: bool) -> None:
    """Never overwrite the input; never overwrite anything else without --force."""
    out, src = out.resolve(), src.resolve()
    if out == src or (out.exists() and src in out.parents):
        raise ConversionError(f"refusing to write {out}: it is part of the input checkpoint")
    if out.exists() and not force:
        raise ConversionError(f"{out} exists (use --force to overwrite it)")
    if not out.parent.exists():
        raise ConversionError(f"output folder {out.parent} does not exist")


def convert_to_gguf(src: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16", force: bool = False,
                    transform: Callable | None = None, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Convert the HF checkpoint folder `src` to the GGUF file `out`. Returns the output path.
    q4_k (or q4_k_m) writes llama.cpp's Q4_K_M mixture: an F16 file first, then `quantize.quantize_gguf`."""
    if outtype == "q4_k_m":
        outtype = "q4_k"
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown --outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    src, out = Path(src), Path(out)
    ckpt = HFCheckpoint(src)
    check_output(out, src, force)
    cls = CONVERTERS.get(ckpt.architecture)
    if cls is None:
        raise ConversionError(f"model class {ckpt.architecture!r} is not supported "
                              f"(supported: {', '.join(sorted(CONVERTERS))})")
    conv = cls(ckpt)
    check_conversion(ckpt, OUTTYPES["f16" if outtype == "q4_k" else outtype])  # memory, before any tensor is read
    if outtype == "q4_k":  # the K-quant mixture is chosen per tensor from the whole file, as llama-quantize does
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            f16 = Path(tmp) / "model-f16.gguf"
            _write(conv, f16, "f16", transform, progress)
            quantize_gguf(f16, out, "q4_k_m", force=force)
        return out
    with atomic_output(out) as tmp:
        _write(conv, tmp, outtype, transform, progress)
    return out


def _write(conv: Converter, path: Path, outtype: str, transform, progress) -> None:
    qt = OUTTYPES[outtype]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[conv.arch])
    conv.set_gguf_parameters(w)
    w.add_file_type(FILE_TYPES[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, conv.ckpt, conv.vocab_size())
    names = conv.ckpt.tensor_names()
    written: set[str] = set()

    expected = conv.expected_shapes()

    def emit(gname: str, data: np.ndarray):
        if gname in written:
            raise ConversionError(f"two source tensors map to {gname!r}")
        if not np.issubdtype(data.dtype, np.floating):
            raise ConversionError(f"tensor {gname!r} has dtype {data.dtype}, expected a floating-point type")
        if gname in expected and tuple(data.shape) != tuple(expected[gname]):
            raise ConversionError(f"tensor {gname!r} has shape {tuple(data.shape)}, the config implies "
                                  f"{tuple(expected[gname])}")
        written.add(gname)
        add_quantized(w, gname, data, conv.quant_type(gname, data, qt))

    for i, name in enumerate(names):
        data = conv.ckpt.get(name)
        for gname, d in conv.modify_tensors(name, data):
            emit(gname, d)
        if progress:
            progress(i + 1, len(names), name)
    for gname, d in conv.extra_tensors():
        emit(gname, d)
    missing = sorted(set(expected) - written)
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensor(s) the config implies, e.g. "
                              f"{', '.join(missing[:3])}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
