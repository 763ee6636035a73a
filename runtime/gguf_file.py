"""A validated, memory-mapped view of a GGUF file.

The header is parsed here with gguf-py's constants (value types, quant sizes, keys) rather than
with `gguf.GGUFReader`, which takes seconds on a 50k-token vocabulary and trusts every count it
reads. Every read is bounds-checked (a truncated or corrupted file raises `GGUFError`; it never
hangs on a huge count or hands a kernel an out-of-file view), and every tensor is checked (type
known, shape sane, data inside the file, no overlaps) before anything touches its bytes.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType

from .errors import GGUFError

_MAX_DIMS = 4
_MAX_DIM = 1 << 31
# struct formats of the fixed-size metadata value types (little-endian GGUF)
_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_SCALAR_DTYPE = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
# NumPy element types of the unquantized tensor types (quantized ones are viewed as (rows, row_bytes) uint8)
_PLAIN_DTYPE = {QT.F32: np.float32, QT.F16: np.float16, QT.F64: np.float64, QT.I8: np.int8,
                QT.I16: np.int16, QT.I32: np.int32, QT.I64: np.int64}


class _Cursor:
    """Bounds-checked little-endian reads from the file's bytes (gguf-py's GGUFReader is too slow for
    a 50k-token vocabulary — seconds per load — and trusts counts read from the file)."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"truncated or corrupted GGUF: {what} at byte {self.pos} runs past the end of the file")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0):
        try:
            vt = GGUFValueType(vtype)
        except ValueError:
            raise GGUFError(f"corrupted GGUF: unknown value type {vtype} for {what}") from None
        if vt == GGUFValueType.STRING:
            return self.string(what)
        if vt != GGUFValueType.ARRAY:
            return self.scalar(_SCALAR_FMT[vt], what)
        if depth > 2:
            raise GGUFError(f"corrupted GGUF: arrays nested too deep in {what}")
        itype = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        if itype in _SCALAR_DTYPE:
            dt = np.dtype(_SCALAR_DTYPE[GGUFValueType(itype)])
            self.need(count * dt.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return arr.tolist()
        self.need(count * 8, what)  # every string or array element takes >= 8 bytes
        if itype == GGUFValueType.STRING:
            return self._strings(count, what)
        return [self.value(itype, what, depth + 1) for _ in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        # the hot loop of loading a vocabulary: 100k strings, read in place from the memory map
        mv, size, out = memoryview(self.buf), self.size, []
        unpack = struct.Struct("<Q").unpack_from
        p = self.pos
        for _ in range(count):
            if p + 8 > size:
                self.pos = p
                raise GGUFError(f"truncated or corrupted GGUF: {what} at byte {p} runs past the end of the file")
            n = unpack(mv, p)[0]
            p += 8
            if p + n > size:
                self.pos = p
                raise GGUFError(f"truncated or corrupted GGUF: {what} at byte {p} runs past the end of the file")
            out.append(str(mv[p:p + n], "utf-8", "replace"))
            p += n
        self.pos = p
        return out

@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # NumPy order (slowest dim first): a GGUF [576, 1536] is (1536, 576)
    n_elements: int
    n_bytes: int
    offset: int
    data: np.ndarray  # the memmapped bytes: (rows, row_bytes) uint8 for quantized types, else float/int


class GGUFFile:
    """A GGUF file opened read-only, validated, memory-mapped (no copies of tensor data)."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise GGUFError(f"no such file: {path}")
        if os.path.isdir(path):
            raise GGUFError(f"{path} is a directory, not a GGUF file")
        size = os.path.getsize(path)
        if size < 24:
            raise GGUFError(f"{path} is not a GGUF file ({size} bytes: too small for a GGUF header)")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        self.path = path
        self.file_size = size
        try:
            self._mm = np.memmap(path, dtype=np.uint8, mode="r")
            self._parse(self._mm)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None
        except (ValueError, OverflowError, struct.error, MemoryError) as e:
            raise GGUFError(f"{path}: corrupted GGUF ({e})") from None
        self._check_overlaps()

    def _parse(self, mm: np.ndarray) -> None:
        cur = _Cursor(mm, self.file_size)
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {self.version} (edgellm reads versions 2 and 3)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_kv * 12 > self.file_size or n_tensors * 24 > self.file_size:
            raise GGUFError(f"corrupted GGUF header: {n_tensors} tensors / {n_kv} metadata entries "
                            f"cannot fit in {self.file_size} bytes")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in self.metadata:
                raise GGUFError(f"corrupted GGUF: duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(cur.scalar("<I", f"type of {key!r}"), f"metadata {key!r}")
        records = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            nd = cur.scalar("<I", f"dimension count of tensor {name!r}")
            if not 1 <= nd <= _MAX_DIMS:
                raise GGUFError(f"corrupted GGUF: tensor {name!r} has {nd} dimensions")
            ne = [cur.scalar("<Q", f"shape of tensor {name!r}") for _ in range(nd)]
            raw_type = cur.scalar("<I", f"type of tensor {name!r}")
            offset = cur.scalar("<Q", f"offset of tensor {name!r}")
            records.append((name, ne, raw_type, offset))
        align = self.metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            raise GGUFError(f"corrupted GGUF: bad {gguf.Keys.General.ALIGNMENT} {align!r}")
        self.alignment = align
        self.data_offset = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, raw_type, offset in records:
            if name in self.tensors:
                raise GGUFError(f"corrupted GGUF: duplicate tensor {name!r}")
            self.tensors[name] = self._tensor(mm, name, ne, raw_type, offset)

    def _tensor(self, mm: np.ndarray, name: str, ne: list[int], raw_type: int, offset: int) -> "TensorInfo":
        if any(d < 1 or d >= _MAX_DIM for d in ne):
            raise GGUFError(f"corrupted GGUF: tensor {name!r} has shape {ne}")
        try:
            qtype = QT(raw_type)
            block, tsize = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"unsupported or corrupted tensor type {raw_type} for tensor {name!r}") from None
        if ne[0] % block:
            raise GGUFError(f"corrupted GGUF: tensor {name!r} row length {ne[0]} is not a multiple of "
                            f"{qtype.name}'s block size {block}")
        n_elems = math.prod(ne)
        n_bytes = n_elems // block * tsize
        start = self.data_offset + offset
        if offset % self.alignment:
            raise GGUFError(f"corrupted GGUF: tensor {name!r} data offset is not {self.alignment}-byte aligned")
        if start + n_bytes > self.file_size:
            raise GGUFError(f"truncated or corrupted GGUF: tensor {name!r} ({n_bytes} bytes at byte {start}) "
                            f"extends past the end of the file ({self.file_size} bytes)")
        shape = tuple(reversed(ne))
        if qtype in _PLAIN_DTYPE:
            data = np.frombuffer(mm, dtype=_PLAIN_DTYPE[qtype], count=n_elems, offset=start).reshape(shape)
        else:
            row_bytes = ne[0] // block * tsize
            data = np.frombuffer(mm, dtype=np.uint8, count=n_bytes, offset=start).reshape(shape[:-1] + (row_bytes,))
        return TensorInfo(name, qtype, shape, n_elems, n_bytes, start, data)

    def _check_overlaps(self) -> None:
        spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in self.tensors.values())
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise GGUFError(f"{self.path}: corrupted GGUF: tensors {an!r} and {bn!r} overlap")

    # -- typed metadata access -------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        return self.metadata[key]

    def get_int(self, key: str, default: int | None = None, *, lo: int = 0, hi: int = 1 << 31) -> int:
        v = self.metadata.get(key, default)
        if v is None:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
            raise GGUFError(f"{self.path}: metadata {key!r} = {v!r} is not an integer in [{lo}, {hi}]")
        return int(v)

    def get_float(self, key: str, default: float | None = None, *, lo: float = -np.inf, hi: float = np.inf) -> float:
        v = self.metadata.get(key, default)
        if v is None:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not (lo <= float(v) <= hi):
            raise GGUFError(f"{self.path}: metadata {key!r} = {v!r} is not a number in [{lo}, {hi}]")
        return float(v)

    def get_str(self, key: str, default: str | None = None) -> str:
        v = self.metadata.get(key, default)
        if v is None:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        if not isinstance(v, str):
            raise GGUFError(f"{self.path}: metadata {key!r} is not a string")
        return v

    def tensor(self, name: str, shape: tuple[int, ...] | None = None, types: tuple[QT, ...] | None = None) -> TensorInfo:
        """The tensor `name`, checked against the expected NumPy-order shape and allowed types."""
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        if shape is not None and t.shape != tuple(shape):
            raise GGUFError(f"{self.path}: tensor {name!r} has shape {t.shape}, expected {tuple(shape)}")
        if types is not None and t.qtype not in types:
            raise GGUFError(f"{self.path}: tensor {name!r} has unsupported type {t.qtype.name} "
                            f"(supported: {', '.join(q.name for q in types)})")
        return t
