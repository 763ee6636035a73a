"""What the two backends share (runtime/engine.py: GGUF on the Numba kernels; runtime/onnx_backend.py: ONNX folders on
onnxruntime): their options in one dataclass, threads, the input checks and the prefill / decode / decode_batch
loop around a backend's own forward step."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from .contracts import Cache
from .errors import ArgumentError, CacheError, ContextOverflowError
from .kv_cache import ATTN_KINDS, parse_kv

DEFAULT_WINDOW = 64  # delta attention: keys nearest the query that are always scored exactly
DEFAULT_SPARSITY = 0.5  # delta attention without a threshold: calibrated to skip this fraction
MIN_CTX = 8


def physical_cores() -> int:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency, but be robust
        n = None
    return max(1, n or os.cpu_count() or 1)


def resolve_threads(n: int | None) -> int:
    """Threads to run on: n (>= 1), default the physical cores, at most what Numba was started with."""
    import numba
    n = physical_cores() if n is None else n
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ArgumentError(f"threads must be an integer >= 1 (got {n!r})", "threads")
    return min(int(n), numba.config.NUMBA_NUM_THREADS)


def set_threads(n: int | None) -> int:
    """resolve_threads(n), made the default of the calling thread (use_threads); -> the count."""
    n = resolve_threads(n)
    use_threads(n)
    return n


_BLAS = None  # threadpoolctl's view of the BLAS libraries loaded (NumPy's OpenBLAS), made at the first engine call


def blas_threads(n: int):
    """A context in which the BLAS libraries loaded (NumPy's OpenBLAS) run on n threads, restored after.

    Engines run their forward with BLAS on 1 thread: the Numba kernels already use every core, and BLAS's own
    workers, which spin between calls, then fight them for the cores (measured on 2 cores, a loaded machine:
    SmolLM2 512-token prefill 190 -> 480 tok/s, a 15-token prefill at 1,000 tokens of context 150 -> 37 ms). Where
    BLAS does the bulk of the work (prefill on dequantized f32 tiles), the call widens it back to the engine's
    threads."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS = ThreadpoolController().select(user_api="blas")
    return _BLAS.limit(limits=n)


def use_threads(n: int) -> None:
    """Make n the thread count of the Numba kernels called from this thread (the default the entry points set:
    the CLI and `load()`; each engine call applies its own engine's count for its duration)."""
    import numba
    numba.set_num_threads(n)


@dataclass(frozen=True)
class EngineOptions:
    """How a model is run. GGUF engines take all of them; an ONNX engine runs onnxruntime with the graph's own f32
    cache and takes only n_ctx and threads.

    n_ctx: context size of new caches (default min(the model's, 4096)); threads: default the physical cores.
    kv: the storage of new KV caches (f32, f16, q8_0, q4_0, or "K,V" types as llama.cpp's -ctk / -ctv); None: the
    model's default (runtime/caches.py default_kv: f16 for a KV cache, as llama.cpp's; f32 for an MLA latent cache or
    a linear-attention state, their only type).
    attn: "dense" or "delta"; delta takes a threshold θ (one float, or one per layer) or a target sparsity, for which
    θ is calibrated per layer on `calib` (text or token ids; default runtime/calibration.py's text), and a window
    of exact keys; attn="delta" alone calibrates to DEFAULT_SPARSITY.
    kv_transform: store quantized K/V Hadamard-rotated (as llama.cpp does) and centred (see KVCache).
    fast: decode steps run as one compiled call where the model allows it (runtime/fast_decode.py); False: always
    the model's per-operation forward (the reference)."""
    n_ctx: int | None = None
    threads: int | None = None
    kv: str | None = None
    attn: str = "dense"
    delta_threshold: float | Sequence[float] | None = None
    delta_sparsity: float | None = None
    delta_window: int = DEFAULT_WINDOW
    calib: str | Sequence[int] | None = None
    kv_transform: bool = True
    fast: bool = True

    def __post_init__(self):
        if self.n_ctx is not None and (isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, (int, np.integer))
                                       or self.n_ctx < MIN_CTX):
            raise ArgumentError(f"n_ctx must be an integer >= {MIN_CTX} (got {self.n_ctx!r})", "n_ctx")
        if self.kv is not None:
            parse_kv(self.kv)
        if self.attn not in ATTN_KINDS:
            raise ArgumentError(f"attn {self.attn!r} is not one of {', '.join(ATTN_KINDS)}", "attn")
        if self.attn == "dense" and (self.delta_threshold is not None or self.delta_sparsity is not None):
            raise ArgumentError("delta_threshold / delta_sparsity need attn delta", ("delta_threshold", "delta_sparsity",
                                                                                   "attn"))
        if self.delta_threshold is not None and self.delta_sparsity is not None:
            raise ArgumentError("give either delta_threshold or delta_sparsity, not both",
                                ("delta_threshold", "delta_sparsity"))
        if self.delta_sparsity is not None and not 0 <= self.delta_sparsity < 1:
            raise ArgumentError(f"delta_sparsity must be in [0, 1) (got {self.delta_sparsity})", "delta_sparsity")
        if self.delta_window < 1:
            raise ArgumentError(f"delta_window must be >= 1 (got {self.delta_window})", "delta_window")

    def gguf_only(self) -> list[str]:
        """The options set away from their defaults that only a GGUF engine has (all but n_ctx and threads)."""
        return [f.name for f in fields(self) if f.name not in ("n_ctx", "threads")
                and getattr(self, f.name) is not None and getattr(self, f.name) != f.default]


class EngineBase:
    """A loaded model (the `Backend` contract of runtime/contracts.py): `prefill(tokens)`, `decode(token)` and
    `decode_batch(tokens, caches)` -> logits, over caches from `new_cache()`. A subclass loads its model, sets `cfg`,
    `tokenizer`, `spec` (what its caches are built for) and `n_ctx`, and implements `new_cache` and `_forward`."""

    def __init__(self, path: str | os.PathLike, options: EngineOptions | None = None, **kwargs):
        """options: an EngineOptions, or its fields as keyword arguments (n_ctx=..., threads=..., kv=...)."""
        if options is None:
            options = EngineOptions(**kwargs)
        elif kwargs:
            from dataclasses import replace
            options = replace(options, **kwargs)
        self.options = options
        self.path = Path(path)
        self.threads = resolve_threads(options.threads)

    def _context(self, n_ctx_train: int) -> int:
        """The context of new caches: the option, else min(the model's, 4096)."""
        n_ctx = self.options.n_ctx or min(n_ctx_train, 4096)
        if n_ctx < MIN_CTX:
            raise ArgumentError(f"n_ctx {n_ctx} is too small (at least {MIN_CTX} tokens)", "n_ctx")
        return n_ctx

    # ------------------------------------------------------------------ what a backend implements
    def new_cache(self, n_ctx: int | None = None) -> Cache:
        raise NotImplementedError

    def _forward(self, tokens: np.ndarray, seqs: list, logits: str) -> np.ndarray:
        """tokens (N,) int64, checked: the new tokens of each (cache, n_new) of seqs in turn -> logits (N, V) for
        logits="all", else (len(seqs), V), one row per sequence (its last token); advances the caches."""
        raise NotImplementedError

    @property
    def kv_bytes_per_token(self) -> int:
        raise NotImplementedError

    @property
    def weight_bytes_per_token(self) -> int:
        raise NotImplementedError

    def attention_stats(self, per_head: bool = False) -> dict:
        """Attention settings and statistics (empty: a backend without them)."""
        return {}

    def reset_attention_stats(self) -> None:
        """Count attention statistics afresh."""

    # ------------------------------------------------------------------ running
    def _check_tokens(self, tokens: np.ndarray) -> None:
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ArgumentError("tokens must be a non-empty 1-D sequence", "tokens")
        if tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab:
            raise ArgumentError(f"token ids must be in [0, {self.cfg.n_vocab})", "tokens")

    def _check_cache(self, cache: Cache, n: int) -> None:
        """A cache of this model with room for n more tokens."""
        if cache.spec is not self.spec and cache.spec != self.spec:
            raise CacheError("the cache was made for another model (use this engine's new_cache())")
        if cache.n + n > cache.n_ctx:
            raise ContextOverflowError(f"{cache.n + n} tokens do not fit in the context of {cache.n_ctx} tokens "
                                       "(a larger n_ctx holds them)", "n_ctx")

    def prefill(self, tokens, cache: Cache | None = None, logits: str = "last", chunk: int = 512) -> np.ndarray:
        """Append `tokens` to `cache` (default: the engine's own); logits of the last token (n_vocab,),
        or of every token (N, n_vocab) with logits='all'. Long prompts run in chunks of `chunk` tokens."""
        if logits not in ("last", "all"):
            raise ArgumentError(f"logits must be 'last' or 'all' (got {logits!r})", "logits")
        cache = self.cache if cache is None else cache
        tokens = np.asarray(tokens, dtype=np.int64)
        self._check_tokens(tokens)
        self._check_cache(cache, len(tokens))
        outs = []
        for s in range(0, len(tokens), chunk):
            part = tokens[s:s + chunk]
            out = self._forward(part, [(cache, len(part))], logits)
            if logits == "all" or s + chunk >= len(tokens):
                outs.append(out)
        return np.concatenate(outs) if logits == "all" else outs[-1][0]

    def decode(self, token: int, cache: Cache | None = None) -> np.ndarray:
        """Append one token; its logits (n_vocab,)."""
        return self.prefill([token], cache)

    def decode_batch(self, tokens, caches: Sequence[Cache]) -> np.ndarray:
        """One decode step for B sequences at once (one read of the weights): logits (B, n_vocab)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) != len(caches):
            raise ArgumentError("decode_batch needs one token per cache", "tokens")
        self._check_tokens(tokens)
        for c in caches:
            self._check_cache(c, 1)
        return self._forward(tokens, [(c, 1) for c in caches], "last")
