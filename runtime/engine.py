"""How a model runs: load a GGUF into an architecture, keep caches, prefill and decode."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..models import ARCHITECTURES
from ..models.config import ConfigError, ModelConfig
from .errors import ContextOverflowError, EdgeLLMError, GGUFError, UnsupportedError
from .fetch import resolve_model
from .gguf_file import GGUFFile
from .kv_cache import KVCache
from .weights import WeightSource


def physical_cores() -> int:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency, but be robust
        n = None
    return max(1, n or os.cpu_count() or 1)


def set_threads(n: int | None) -> int:
    import numba
    n = physical_cores() if n is None else n
    if n < 1:
        raise EdgeLLMError(f"--threads must be >= 1 (got {n})")
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    return n


class Engine:
    """A loaded model: `prefill(tokens)` and `decode(token)` -> logits, over a KV cache."""

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None):
        t0 = time.perf_counter()
        self.threads = set_threads(threads)
        self.path = Path(path)
        self.file = GGUFFile(path)
        try:
            self.cfg = ModelConfig.from_gguf(self.file.metadata)
        except ConfigError as e:
            raise GGUFError(f"{path}: {e}") from None
        arch = ARCHITECTURES.get(self.cfg.arch)
        if arch is None:
            raise UnsupportedError(f"architecture {self.cfg.arch!r} is not supported "
                                   f"(supported: {', '.join(ARCHITECTURES)})")
        self.weights = WeightSource(self.file)
        self.model = arch(self.cfg, self.weights)
        from .tokenizer import Tokenizer
        self.tokenizer = Tokenizer.from_gguf(self.file)
        self.n_ctx = n_ctx or min(self.cfg.n_ctx_train, 4096)
        if self.n_ctx < 8:
            raise EdgeLLMError(f"context size {self.n_ctx} is too small (at least 8 tokens)")
        self.cache = self.new_cache()
        self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ caches
    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layer, c.n_head_kv, n_ctx or self.n_ctx, c.head_dim)

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (matrices; norms are negligible)."""
        m = self.model
        total = m.output.nbytes
        for L in m.layers:
            total += sum(v.nbytes for v in L.values() if hasattr(v, "rows"))
        return total

    def _check(self, tokens: np.ndarray, cache: KVCache) -> None:
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence")
        if tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.cfg.n_vocab})")
        if cache.n + len(tokens) > cache.n_ctx:
            raise ContextOverflowError(f"{cache.n + len(tokens)} tokens do not fit in the context of "
                                       f"{cache.n_ctx} tokens (use --ctx to enlarge it)")

    # ------------------------------------------------------------------ running
    def prefill(self, tokens, cache: KVCache | None = None, logits: str = "last", chunk: int = 512) -> np.ndarray:
        """Append `tokens` to `cache` (default: the engine's own); logits of the last token (n_vocab,),
        or of every token (N, n_vocab) with logits='all'. Long prompts run in chunks of `chunk` tokens."""
        cache = self.cache if cache is None else cache
        tokens = np.asarray(tokens, dtype=np.int64)
        self._check(tokens, cache)
        outs = []
        for s in range(0, len(tokens), chunk):
            part = tokens[s:s + chunk]
            want = logits if logits == "all" else ("last" if s + chunk >= len(tokens) else None)
            out = self.model.forward(part, [(cache, len(part))], logits=want or "last")
            if want:
                outs.append(out)
        return np.concatenate(outs) if logits == "all" else outs[-1][0]

    def decode(self, token: int, cache: KVCache | None = None) -> np.ndarray:
        """Append one token; its logits (n_vocab,)."""
        return self.prefill([token], cache)

    def decode_batch(self, tokens, caches: list[KVCache]) -> np.ndarray:
        """One decode step for B sequences at once (one read of the weights): logits (B, n_vocab)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) != len(caches):
            raise ValueError("decode_batch needs one token per cache")
        for t, c in zip(tokens, caches):
            self._check(np.array([t]), c)
        return self.model.forward(tokens, [(c, 1) for c in caches], logits="last")


def load(model: str | os.PathLike | None = None, **kwargs) -> Engine:
    """An `Engine` for a catalog name, a .gguf path, or (None) the default model; an ONNX folder
    (`edgellm convert --format onnx`) gives an `OnnxEngine` (onnxruntime) with the same interface."""
    path = resolve_model(model)
    if path.is_dir():
        from .onnx_backend import OnnxEngine
        return OnnxEngine(path, **kwargs)
    return Engine(path, **kwargs)
