"""Weight tensors in their quantized form, looked up by GGUF name and checked before use."""
from __future__ import annotations

import os

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

from ..kernels import igemm
from ..kernels import matvec as mv
from ..kernels import q8act
from ..kernels import simd
from ..kernels import ternary as tern
from ..kernels import ternary_i2
from .backend import blas_threads
from .errors import EdgeLLMError, GGUFError, UnsupportedError
from .gguf_file import GGUFFile

MATRIX_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q4_K, QT.Q6_K)
VECTOR_TYPES = (QT.F32, QT.F16)
TERNARY_TYPES = {QT.TQ1_0: tern.TQ1_BYTES, QT.TQ2_0: tern.TQ2_BYTES}
ISA_ENV = "EDGELLM_ISA"  # forces the integer kernels' instruction set ("none": f32 activations everywhere)


def kernel_isa() -> str | None:
    """The instruction set of the integer kernels, chosen from the CPU Numba compiles for (kernels/simd.py), or
    the one EDGELLM_ISA names (it must be one this machine runs; "none" keeps f32 activations)."""
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if not forced:
        return simd.target_isa()
    if forced in ("none", "f32"):
        return None
    runnable = simd.runnable_isas()
    if forced not in runnable:
        raise EdgeLLMError(f"{ISA_ENV}={forced!r}: this machine runs {', '.join(runnable)} (or none)")
    return forced


class QMatrix:
    """A (rows, cols) weight matrix, repacked once at load for the kernels chosen for this CPU: y = W @ x.

    Q4_0 / Q4_1 / Q8_0 on a CPU with integer dot products (`isa`): kernels/igemm.py with activations quantized
    to int8 per block of 32, as llama.cpp does, for decode and prefill alike. Otherwise (other types, or no
    such instructions): kernels/matvec.py with f32 activations, dequantized tiles + BLAS for prefill."""

    def __init__(self, qtype: QT, raw: np.ndarray, rows: int, cols: int, name: str = "", isa: str | None = None):
        self.qtype, self.rows, self.cols, self.name = int(qtype), rows, cols, name
        self.fmt = q8act.QFORMATS.get(QT(qtype)) if isa else None
        self.isa = isa if self.fmt else None
        try:
            if self.fmt:
                self.W = q8act.pack(self.qtype, raw)
            else:
                self.packed = mv.pack(self.qtype, raw)
        except ValueError as e:  # block scales that are not finite: a corrupted file
            raise GGUFError(f"tensor {name!r}: {e}") from None
        self.nbytes = int(raw.nbytes)  # bytes of the file's encoding: what one mat-vec reads

    def matmul(self, X: np.ndarray) -> np.ndarray:
        # X (N, cols) -> (N, rows)
        X = np.ascontiguousarray(X, dtype=np.float32)
        out = np.empty((X.shape[0], self.rows), dtype=np.float32)
        if self.fmt:
            if X.shape[1] != self.cols:
                raise ValueError(f"{self.name}: input {X.shape} does not fit ({self.rows}, {self.cols})")
            igemm.matmul_x(self.isa, self.fmt, self.W, X, out)
        elif X.shape[0] > mv.BATCH_MAX:  # dequantized tiles + BLAS: BLAS on the engine's threads for the call
            with blas_threads(numba.get_num_threads()):
                mv.matmul(self.qtype, self.packed, X, out)
        else:
            mv.matmul(self.qtype, self.packed, X, out)
        return out

    def embed(self, ids: np.ndarray) -> np.ndarray:
        # ids (N,) -> (N, cols): rows of the matrix (token embedding lookup)
        out = np.empty((len(ids), self.cols), dtype=np.float32)
        if not self.fmt:
            return mv.gather_rows(self.packed, ids, out)  # checks the ids
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or (len(ids) and not (0 <= ids.min() and ids.max() < self.rows)):
            raise ValueError(f"token ids must be in [0, {self.rows})")
        return q8act.gather(self.fmt, self.W, ids, out)

    def dequantize(self) -> np.ndarray:
        out = np.empty((self.rows, self.cols), dtype=np.float32)
        if self.fmt:
            return q8act.gather(self.fmt, self.W, np.arange(self.rows, dtype=np.int64), out)
        mv.dequantize_rows(self.qtype, self.packed, 0, self.rows, out)
        return out


class ConcatMatrix:
    """Matrices sharing an input whose types differ, so that they cannot be fused: outputs concatenated."""

    def __init__(self, parts: list[QMatrix]):
        self.parts = parts
        self.rows, self.cols = sum(p.rows for p in parts), parts[0].cols
        self.nbytes = sum(p.nbytes for p in parts)

    def matmul(self, X: np.ndarray) -> np.ndarray:
        return np.concatenate([p.matmul(X) for p in self.parts], axis=1)


class WeightSource:
    """Hands a model its weights by GGUF name, checking shape and type; records which tensors were used."""

    def __init__(self, f: GGUFFile, isa: str | None = "auto"):
        """isa: the integer kernels' instruction set; "auto": kernel_isa(); None: f32 activations everywhere."""
        self.f = f
        self.isa = kernel_isa() if isa == "auto" else isa
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.f.tensors

    def _info(self, name: str, shape: tuple[int, ...], types) -> "object":
        t = self.f.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.f.path}: missing tensor {name!r}")
        if t.shape != tuple(shape):
            raise GGUFError(f"{self.f.path}: tensor {name!r} has shape {t.shape}, expected {tuple(shape)}")
        if t.qtype not in types:
            raise UnsupportedError(f"tensor {name!r} has type {t.qtype.name}, which edgellm does not support "
                                   f"(supported: {', '.join(q.name for q in types)})")
        if t.qtype in VECTOR_TYPES and not np.isfinite(t.data).all():  # quantized scales: checked by the packer
            raise GGUFError(f"{self.f.path}: tensor {name!r} holds NaN or infinite values")
        self.used.add(name)
        return t

    def vector(self, name: str, n: int) -> np.ndarray:
        t = self._info(name, (n,), VECTOR_TYPES)
        return np.ascontiguousarray(t.data, dtype=np.float32)

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float (F32 / F16) tensor of any rank, as f32 (NumPy-order shape)."""
        t = self._info(name, shape, VECTOR_TYPES)
        return np.ascontiguousarray(t.data, dtype=np.float32)

    def matrix(self, name: str, shape: tuple[int, int]) -> QMatrix:
        t = self._info(name, shape, MATRIX_TYPES)
        return QMatrix(t.qtype, t.data, shape[0], shape[1], name, self.isa)

    def fused(self, specs: list[tuple[str, tuple[int, int]]]):
        """Matrices that share one input, stacked by rows into one matrix when their types agree."""
        infos = [self._info(name, shape, MATRIX_TYPES) for name, shape in specs]
        if len({t.qtype for t in infos}) == 1:
            raw = np.concatenate([t.data for t in infos], axis=0)
            return QMatrix(infos[0].qtype, raw, sum(s[0] for _, s in specs), specs[0][1][1],
                           "+".join(n for n, _ in specs), self.isa)
        return ConcatMatrix([QMatrix(t.qtype, t.data, s[0], s[1], n, self.isa) for t, (n, s) in zip(infos, specs)])

    def bitlinear(self, name: str, shape: tuple[int, int], row_perm: np.ndarray | None = None):
        """A BitNet projection: ternary (TQ1_0 / TQ2_0) or any matrix type, times its optional `<name>.scale`."""
        return self.bitlinear_fused([(name, shape, row_perm)])

    def _scale(self, name: str) -> float:
        sname = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"
        if not self.has(sname):
            return 1.0
        scale = float(np.asarray(self._info(sname, (1,), VECTOR_TYPES).data, dtype=np.float32).reshape(-1)[0])
        if not np.isfinite(scale):
            raise GGUFError(f"{self.f.path}: {sname} is not finite")
        return scale

    def bitlinear_fused(self, specs: list[tuple[str, tuple[int, int], np.ndarray | None]]):
        """BitNet projections sharing one input, (name, shape, row permutation or None) each: stacked by rows
        into one ternary matrix (per-row scales) when all are ternary of one type, else outputs concatenated."""
        infos = [self._info(name, shape, tuple(TERNARY_TYPES) + MATRIX_TYPES) for name, shape, _ in specs]
        raws = [t.data if perm is None else np.ascontiguousarray(t.data[perm]) for t, (_, _, perm) in zip(infos, specs)]
        scales = [self._scale(name) for name, _, _ in specs]
        names = "+".join(name for name, _, _ in specs)
        if len({t.qtype for t in infos}) == 1 and infos[0].qtype in TERNARY_TYPES:
            rows = [shape[0] for _, shape, _ in specs]
            row_scale = np.repeat(np.array(scales, dtype=np.float32), rows)
            raw = raws[0] if len(raws) == 1 else np.concatenate(raws, axis=0)
            return self._ternary(raw, sum(rows), specs[0][1][1], TERNARY_TYPES[infos[0].qtype], names, row_scale)
        parts = []
        for t, raw, scale, (name, shape, _) in zip(infos, raws, scales, specs):
            if t.qtype in TERNARY_TYPES:
                parts.append(self._ternary(raw, shape[0], shape[1], TERNARY_TYPES[t.qtype], name, scale))
            else:
                parts.append(ScaledMatrix(QMatrix(t.qtype, raw, shape[0], shape[1], name, self.isa), scale))
        return parts[0] if len(parts) == 1 else ConcatBitLinear(parts)

    def _ternary(self, raw, rows, cols, nbytes, name, scale):
        # the integer kernels (2-bit codes, dot-product instructions) where the CPU has them, else int16 lanes
        try:
            if self.isa:
                return ternary_i2.TernaryI2Matrix(raw, rows, cols, nbytes, self.isa, name, scale)
            return tern.TernaryMatrix(raw, rows, cols, nbytes, name, scale)
        except ValueError as e:  # scales that are not finite, bytes that do not fit the shape: a corrupted file
            raise GGUFError(f"tensor {name!r}: {e}") from None


class ConcatBitLinear:
    """BitNet projections sharing an input whose types differ: one quantized input, outputs concatenated."""

    def __init__(self, parts: list):
        self.parts = parts
        self.rows, self.cols = sum(p.rows for p in parts), parts[0].cols
        self.nbytes = sum(p.nbytes for p in parts)

    quantize = staticmethod(tern.TernaryMatrix.quantize)

    def matmul_q(self, xq: np.ndarray, xscale: np.ndarray) -> np.ndarray:
        return np.concatenate([p.matmul_q(xq, xscale) for p in self.parts], axis=1)

    def matmul(self, X: np.ndarray) -> np.ndarray:
        return self.matmul_q(*self.quantize(X))


class ScaledMatrix:
    """A non-ternary matrix in a BitNet model: same interface as TernaryMatrix (int8 activations, scale)."""

    def __init__(self, m: QMatrix, scale: float):
        self.m, self.scale, self.rows, self.cols, self.nbytes = m, np.float32(scale), m.rows, m.cols, m.nbytes

    quantize = staticmethod(tern.TernaryMatrix.quantize)

    def matmul_q(self, xq: np.ndarray, xscale: np.ndarray) -> np.ndarray:
        out = self.m.matmul(xq)
        out *= (self.scale / xscale)[:, None]
        return out

    def matmul(self, X: np.ndarray) -> np.ndarray:
        return self.matmul_q(*self.quantize(X))
