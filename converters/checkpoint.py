"""Reading a local Hugging Face checkpoint: config.json, tokenizer files, and safetensors weights
(single file or sharded with an index) tensor by tensor, memory-mapped, never all in memory at once.

safetensors' own NumPy loader cannot return bfloat16; the format is a JSON header plus raw
little-endian arrays, so tensors are memory-mapped here and bf16 is widened to f32 per tensor.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from ..runtime.errors import EdgeLLMError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_MAX_DIM = 1 << 40


class ConversionError(EdgeLLMError):
    """A checkpoint that cannot be converted: missing file or shard, shape or dtype mismatch, leftovers."""


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def _no_duplicates(pairs: list) -> dict:
    """json object_pairs_hook: a key given twice is an error (json.loads would keep the last silently)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
    """A safetensors file, its header validated before any tensor is read: every entry has a known dtype, a shape
    of non-negative integers and `data_offsets` inside the file whose size is dtype size x elements; no two
    entries overlap."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConversionError(f"{path}: not a safetensors file ({size} bytes: too small for a header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > _MAX_HEADER:
                    raise ConversionError(f"{path}: corrupted safetensors header (its length {n} does not fit in "
                                          f"the file's {size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError) as e:
            raise ConversionError(f"{path}: corrupted safetensors header (not JSON: {e})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: corrupted safetensors header (a JSON object expected)")
        meta = header.pop("__metadata__", None)
        if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
            raise ConversionError(f"{path}: safetensors __metadata__ must map strings to strings")
        self.base = 8 + n
        data_size = size - self.base
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self.entries[name] = self._entry(name, e, data_size)
        spans = sorted((a, b, name) for name, (_, _, a, b) in self.entries.items() if b > a)
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ConversionError(f"{path}: corrupted safetensors header: tensors {an!r} and {bn!r} overlap")
        self.mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else np.zeros(0, np.uint8)

    def _entry(self, name: str, e, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise ConversionError(f"{where}: header entry is not a JSON object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in e:
                raise ConversionError(f"{where}: header entry has no {key!r}")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ConversionError(f"{where} has unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(_is_int(s) and 0 <= s < _MAX_DIM for s in shape)):
            raise ConversionError(f"{where}: shape {shape!r} is not a list of at most 8 non-negative integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise ConversionError(f"{where}: data_offsets {offs!r} is not a pair of integers")
        a, b = offs
        if not 0 <= a <= b <= data_size:
            raise ConversionError(f"{where}: data_offsets [{a}, {b}] lie outside the file's {data_size} bytes of "
                                  "tensor data (truncated or corrupted file)")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if b - a != nbytes:
            raise ConversionError(f"{where}: data_offsets [{a}, {b}] hold {b - a} bytes, but shape {shape} of "
                                  f"{dtype} needs {nbytes}")
        return dtype, tuple(shape), a, b

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (or its integer type), copied out of the memory map; a float tensor holding NaN or
        infinity is an error (a corrupted checkpoint)."""
        dtype, shape, a, b = self.entries[name]
        raw = np.frombuffer(self.mm, dtype=_DTYPES[dtype], count=math.prod(shape), offset=self.base + a).reshape(shape)
        if dtype == "BF16":
            out = bf16_to_f32(raw)
        elif dtype in ("F16", "F64"):
            with np.errstate(over="ignore"):
                out = raw.astype(np.float32)
        else:
            out = np.array(raw)
        if dtype in FLOAT_DTYPES and not np.isfinite(out).all():
            raise ConversionError(f"{self.path}: tensor {name!r} holds NaN or infinite values (corrupted data?)")
        return out

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]


def read_json(path: Path, what: str = "a JSON object", required: bool = False):
    """A JSON file's top-level object (None when absent and not required); any failure is a ConversionError
    naming the file. Keys given twice are an error."""
    if not path.exists():
        if required:
            raise ConversionError(f"{path.parent}: missing {path.name}")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys
        raise ConversionError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected {what}, found a JSON {type(data).__name__}")
    return data


# -- typed config values: each failure names the file, the key and what was expected -------------------
def cfg_int(d: dict, key: str, where: str, default: int | None = None, lo: int = 1, hi: int = 1 << 31) -> int:
    """d[key] as an integer in [lo, hi]; missing or null -> default (an error when there is none)."""
    v = d.get(key)
    if v is None:
        if default is None:
            raise ConversionError(f"{where}: missing {key!r} (an integer in [{lo}, {hi}])")
        return default
    if not _is_int(v) or not lo <= v <= hi:
        raise ConversionError(f"{where}: {key!r} = {brief(v)} is not an integer in [{lo}, {hi}]")
    return v


def cfg_float(d: dict, key: str, where: str, default: float | None = None, lo: float = -math.inf,
              hi: float = math.inf, lo_open: bool = False) -> float:
    """d[key] as a finite number in [lo, hi] (or (lo, hi] with lo_open); missing or null -> default."""
    v = d.get(key)
    if v is None:
        if default is None:
            raise ConversionError(f"{where}: missing {key!r} (a number)")
        return float(default)
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConversionError(f"{where}: {key!r} = {brief(v)} is not a number in {rng}")
    f = float(v)
    if not math.isfinite(f) or f < lo or f > hi or (lo_open and f == lo):
        raise ConversionError(f"{where}: {key!r} = {brief(v)} is not a number in {rng}")
    return f


def cfg_bool(d: dict, key: str, where: str, default: bool) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConversionError(f"{where}: {key!r} = {brief(v)} is not true or false")
    return v


def cfg_str(d: dict, key: str, where: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str:
    v = d.get(key)
    if v is None:
        if default is None:
            raise ConversionError(f"{where}: missing {key!r}")
        v = default
    if not isinstance(v, str):
        raise ConversionError(f"{where}: {key!r} = {brief(v)} is not a string")
    if choices is not None and v not in choices:
        raise ConversionError(f"{where}: {key!r} = {v!r} is not supported (supported: {', '.join(choices)})")
    return v


def cfg_dict(d: dict, key: str, where: str) -> dict | None:
    v = d.get(key)
    if v is not None and not isinstance(v, dict):
        raise ConversionError(f"{where}: {key!r} = {brief(v)} is not a JSON object")
    return v


def brief(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class HFCheckpoint:
    """A local HF checkpoint folder: its JSON files read (each a JSON object) and every safetensors header
    validated; tensors are read one at a time on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{path} is not a directory (expected a Hugging Face checkpoint folder)")
        self.config = self._json("config.json", required=True)
        self.tokenizer_config = self._json("tokenizer_config.json") or {}
        self.generation_config = self._json("generation_config.json") or {}
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        index = self._json("model.safetensors.index.json")
        if index is not None:
            ipath = self.path / "model.safetensors.index.json"
            wm = index.get("weight_map")
            if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
                raise ConversionError(f"{ipath}: 'weight_map' is not an object mapping tensor names to shard files")
            shards = sorted(set(wm.values()))
            for s in shards:
                if "/" in s or "\\" in s or s in ("", ".", ".."):
                    raise ConversionError(f"{ipath}: shard name {s!r} is not a file name in the checkpoint folder")
                if not (self.path / s).is_file():
                    raise ConversionError(f"{self.path}: missing shard {s} (named in model.safetensors.index.json)")
            names = shards
        elif (self.path / "model.safetensors").exists():
            wm, names = None, ["model.safetensors"]
        else:
            raise ConversionError(f"{path}: no model.safetensors or model.safetensors.index.json")
        for s in names:
            f = SafetensorsFile(self.path / s)
            self.files[s] = f
            for t in f.entries:
                if t in self.where:
                    raise ConversionError(f"{self.path}: tensor {t!r} is in two shards ({self.where[t]} and {s})")
                self.where[t] = s
        if wm is not None:
            for t, s in wm.items():
                if self.where.get(t) != s:
                    raise ConversionError(f"{self.path / 'model.safetensors.index.json'}: tensor {t!r} is mapped to "
                                          f"{s}, which does not hold it")

    def _json(self, name: str, required: bool = False):
        return read_json(self.path / name, required=required)

    @property
    def config_path(self) -> str:
        return str(self.path / "config.json")

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ConversionError(f"{self.config_path}: 'architectures' = {brief(archs)} is not a list naming "
                                  "the model class")
        return archs[0]

    def tensor_names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)

    def dtype(self, name: str) -> str:
        return self.files[self.where[name]].dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape as its header gives it (no data read)."""
        return self.files[self.where[name]].shape(name)

    def file_of(self, name: str) -> Path:
        return self.files[self.where[name]].path

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.where:
            yield name, self.get(name)


def conversion_bytes(ckpt: HFCheckpoint, out_bytes_per_element: float) -> int:
    """Memory a conversion to GGUF holds at its peak, from the headers alone: gguf-py's writer keeps every output
    tensor until the file is written (matrices at `out_bytes_per_element`, vectors as f32), and the largest tensor
    takes about 10 bytes per value while it is read (bf16 widened to f32), transformed and quantized. A packed
    uint8 tensor (BitNet's ternary codes) unpacks to four values per byte. (Llama-3.2-1B's shape to q4_0: 3.4 GB
    estimated, 3.47 GB peak RSS measured.)"""
    held = work = 0
    for name in ckpt.tensor_names():
        shape = ckpt.shape(name)
        n = math.prod(shape) * (4 if ckpt.dtype(name) == "U8" else 1)
        held += n * (out_bytes_per_element if len(shape) >= 2 else 4)
        work = max(work, 10 * n)
    return int(held + work) + (64 << 20)


def check_conversion(ckpt: HFCheckpoint, qtype) -> None:
    """Refuse a conversion that cannot fit in memory, before any tensor is read."""
    import gguf
    from ..runtime.memory import check
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    check(conversion_bytes(ckpt, size / block), f"converting {ckpt.path}",
          "the output is held in memory until it is written: a smaller outtype (q8_0, q4_0) needs less")


def parameter_count(ckpt: HFCheckpoint) -> int:
    """Parameters the checkpoint holds, from its headers (a packed uint8 tensor holds four ternary values a byte)."""
    return sum(math.prod(ckpt.shape(n)) * (4 if ckpt.dtype(n) == "U8" else 1) for n in ckpt.tensor_names())


def check_torch_memory(ckpt: HFCheckpoint, copies: float, what: str, activations: int = 0, hint: str = "") -> None:
    """Refuse work on the checkpoint as a float32 torch model (transformers loads it so) that cannot fit:
    `copies` float32 copies of its parameters (model, teacher, gradients, optimizer moments) plus `activations`
    bytes, before transformers reads anything."""
    from ..runtime.memory import check
    check(int(4 * parameter_count(ckpt) * copies) + activations + (256 << 20), what, hint)
