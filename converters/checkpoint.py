"""Reading a local Hugging Face checkpoint: config.json, tokenizer files, and safetensors weights
(single file or sharded with an index) tensor by tensor, memory-mapped, never all in memory at once.

safetensors' own NumPy loader cannot return bfloat16; the format is a JSON header plus raw
little-endian arrays, so tensors are memory-mapped here and bf16 is widened to f32 per tensor.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from ..runtime.errors import EdgeLLMError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class ConversionError(EdgeLLMError):
    """A checkpoint that cannot be converted: missing file or shard, shape or dtype mismatch, leftovers."""


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: not a safetensors file (too small)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise ConversionError(f"{path}: corrupted safetensors header")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConversionError(f"{path}: corrupted safetensors header") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")
        self.entries = {}
        for name, e in header.items():
            dt = _DTYPES.get(e.get("dtype"))
            if dt is None:
                raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            a, b = e["data_offsets"]
            shape = tuple(int(s) for s in e["shape"])
            if not (0 <= a <= b and self.base + b <= size and (b - a) == int(np.prod(shape)) * np.dtype(dt).itemsize):
                raise ConversionError(f"{path}: tensor {name!r} offsets do not match its shape or the file size")
            self.entries[name] = (e["dtype"], shape, a, b)

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (or its integer type), copied out of the memory map."""
        dtype, shape, a, b = self.entries[name]
        raw = np.frombuffer(self.mm, dtype=_DTYPES[dtype], count=int(np.prod(shape)), offset=self.base + a).reshape(shape)
        if dtype == "BF16":
            return bf16_to_f32(raw)
        if dtype in ("F16", "F64"):
            return raw.astype(np.float32)
        return np.array(raw)

    def dtype(self, name: str) -> str:
        return self.entries[name][0]


class HFCheckpoint:
    """A local HF checkpoint folder."""

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
            shards = sorted(set(index.get("weight_map", {}).values()))
            for s in shards:
                if not (self.path / s).exists():
                    raise ConversionError(f"missing shard {s} (named in model.safetensors.index.json)")
            names = shards
        elif (self.path / "model.safetensors").exists():
            names = ["model.safetensors"]
        else:
            raise ConversionError(f"{path}: no model.safetensors or model.safetensors.index.json")
        for s in names:
            f = SafetensorsFile(self.path / s)
            self.files[s] = f
            for t in f.entries:
                self.where[t] = s

    def _json(self, name: str, required: bool = False):
        p = self.path / name
        if not p.exists():
            if required:
                raise ConversionError(f"{self.path}: missing {name}")
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{p}: invalid JSON ({e})") from None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise ConversionError(f"{self.path}/config.json names no 'architectures'")
        return archs[0]

    def tensor_names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)

    def dtype(self, name: str) -> str:
        return self.files[self.where[name]].dtype(name)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.where:
            yield name, self.get(name)
