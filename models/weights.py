"""What a model asks of the weights the runtime hands it (runtime/weights.py's `WeightSource` implements it):
tensors looked up by GGUF name, checked against the shape the model names, in their quantized form."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Matrix(Protocol):
    """A (rows, cols) weight matrix in its file's encoding (quantized, ternary, f16, f32)."""
    rows: int
    cols: int
    nbytes: int  # bytes one product reads

    def matmul(self, X: np.ndarray) -> np.ndarray:
        """X (N, cols) f32 -> (N, rows) = X @ W.T."""


class Embedding(Matrix, Protocol):
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids (N,) -> (N, cols): rows of the matrix."""


class Weights(Protocol):
    def has(self, name: str) -> bool:
        """Whether the file holds tensor `name`."""

    def vector(self, name: str, n: int) -> np.ndarray:
        """A float tensor of n values as f32 (norm weights, biases)."""

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float tensor of any rank as f32 (NumPy-order shape)."""

    def matrix(self, name: str, shape: tuple[int, int]) -> Embedding:
        """A matrix of a supported type."""

    def fused(self, specs: Sequence[tuple[str, tuple[int, int]]]) -> Matrix:
        """Matrices that share one input, stacked by rows (one product when their types agree)."""

    def bitlinear_fused(self, specs: Sequence[tuple[str, tuple[int, int], np.ndarray | None]]) -> Matrix:
        """BitNet projections (ternary with per-token int8 activations, times their `.scale`) that share one input,
        (name, shape, row permutation or None) each, stacked by rows."""
