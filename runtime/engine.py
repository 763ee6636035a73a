"""How a GGUF model runs: load it into its architecture (models/), build its caches, prefill and decode on the
Numba kernels. `load()` is the entry point for any model (a GGUF file, a catalog name, an ONNX folder)."""
from __future__ import annotations

import os
import time

import numpy as np

from ..models import ARCHITECTURES
from ..models.config import ConfigError, ModelConfig
from .backend import (DEFAULT_SPARSITY, DEFAULT_WINDOW, EngineBase, EngineOptions, blas_threads,  # noqa: F401
                      physical_cores, set_threads, use_threads)
from .caches import build_cache, bytes_per_token, check_options, default_kv
from .contracts import Backend, Cache
from .errors import ArgumentError, GGUFError, UnsupportedError
from .fetch import resolve_model
from .gguf_file import GGUFFile
from .hub import CheckpointConverter
from .kv_cache import AttentionConfig, AttentionStats, KVCache
from .fast_decode import FastDecode
from .memory import check_engine, check_weights
from .weights import WeightSource


class Engine(EngineBase):
    """A loaded GGUF model: `prefill(tokens)`, `decode(token)`, `decode_batch(tokens, caches)` -> logits, over caches
    built from the model's `cache_spec()` with the engine's KV type and attention (see EngineOptions)."""

    def __init__(self, path: str | os.PathLike, options: EngineOptions | None = None, **kwargs):
        """options: an EngineOptions, or its fields as keyword arguments (n_ctx, threads, kv, attn, delta_threshold,
        delta_sparsity, delta_window, calib, kv_transform)."""
        t0 = time.perf_counter()
        super().__init__(path, options, **kwargs)
        o = self.options
        self.kv_transform = o.kv_transform
        self.file = GGUFFile(path)
        try:
            self.cfg = ModelConfig.from_gguf(self.file.metadata)
        except ConfigError as e:
            raise GGUFError(f"{path}: {e}") from None
        arch = ARCHITECTURES.get(self.cfg.arch)
        if arch is None:
            raise UnsupportedError(f"architecture {self.cfg.arch!r} is not supported "
                                   f"(supported: {', '.join(ARCHITECTURES)})")
        check_weights(self.file)  # runtime/memory.py: refused before it is spent
        self.weights = WeightSource(self.file)
        try:
            self.model = arch(self.cfg, self.weights)
        except ConfigError as e:  # metadata an architecture checks itself (e.g. deci's per-layer arrays)
            raise GGUFError(f"{path}: {e}") from None
        from .tokenizer import Tokenizer
        self.tokenizer = Tokenizer.from_gguf(self.file)
        self.spec = self.model.cache_spec()
        self.kv = o.kv if o.kv is not None else default_kv(self.spec)
        check_options(self.spec, self.kv, o.attn)
        self.n_ctx = self._context(self.cfg.n_ctx_train)
        check_engine(self)  # runtime/memory.py: the context's cache must fit before it is made
        self.attn = AttentionConfig()
        self.fast = None  # the compiled decode step, built below (delta calibration runs the forward before)
        self.attn_stats = AttentionStats(self.cfg.n_layer, self.cfg.n_head)
        if o.attn == "delta":
            if o.delta_threshold is None:  # attn delta alone: calibrated to DEFAULT_SPARSITY
                self.calibrate_delta(DEFAULT_SPARSITY if o.delta_sparsity is None else o.delta_sparsity, o.calib,
                                     o.delta_window)
            else:
                th = o.delta_threshold
                th = [float(th)] * self.cfg.n_layer if np.ndim(th) == 0 else [float(t) for t in th]
                self.attn = AttentionConfig("delta", tuple(th), o.delta_window)
        self.cache = self.new_cache()
        self.fast = FastDecode.build(self) if o.fast else None  # the compiled decode step, compiled on its first use
        self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ attention settings
    def set_attention(self, attn: AttentionConfig) -> None:
        """Attention of the caches made from now on (and of the engine's own cache, which is emptied)."""
        self.attn = attn
        self.cache = self.new_cache()

    def calibrate_delta(self, target: float, calib=None, window: int = DEFAULT_WINDOW,
                        max_tokens: int = 1024) -> tuple:
        """Delta attention with a threshold θ per layer such that, on the calibration text (str or token ids;
        default: runtime/calibration.py's text), the delta rule skips `target` of each layer's
        outside-window multiply-adds. Each dimension's threshold is θ scaled by the inverse RMS of that key
        dimension (a change of q_i moves the scores by d_i k_i), so the skipped changes are the ones that matter
        least. Queries and keys come from a dense pass; returns the per-layer θ."""
        from ..kernels.delta import calibrate_threshold
        toks = self._calibration_tokens(calib, max_tokens)
        c = self.cfg
        if len(toks) <= window + 1:
            raise ArgumentError(f"delta calibration needs more than {window + 1} tokens of text (got {len(toks)})",
                                "calib")
        cache = KVCache(self.spec, len(toks), stats=AttentionStats(c.n_layer, c.n_head))
        cache.recorder = [[] for _ in range(c.n_layer)]
        self.prefill(toks, cache)
        G = c.n_head // c.n_head_kv
        th, scales = [], []
        for layer, rec in enumerate(cache.recorder):
            k = cache.keys(layer)  # (Hkv, T, hd)
            w = np.sqrt(((k - k[:, :1]) ** 2).mean(1))  # RMS of each key dimension around the sink's key
            w = np.repeat(np.maximum(w, 1e-6 * w.mean() + 1e-12), G, axis=0)  # (H, hd)
            sc = (w.mean() / w).astype(np.float32)
            th.append(calibrate_threshold(np.concatenate(rec), target, window, sc, n_head_kv=c.n_head_kv))
            scales.append(sc)
        self.set_attention(AttentionConfig("delta", tuple(th), window, np.stack(scales)))
        self.delta_target = target
        return th

    def _calibration_tokens(self, calib, max_tokens: int) -> np.ndarray:
        if calib is None:  # a few paragraphs of ordinary text (runtime/calibration.py)
            from .calibration import CALIBRATION_TEXT
            calib = CALIBRATION_TEXT
        if isinstance(calib, str):
            calib = self.tokenizer.encode(calib, add_bos=False, parse_special=False)
        return np.asarray(calib, dtype=np.int64)[:min(max_tokens, self.n_ctx)]

    def attention_stats(self, per_head: bool = False) -> dict:
        """Delta sparsity (overall; per phase and layer, optionally per head) and attention seconds per phase,
        accumulated by every cache of this engine since the last `attn_stats.reset()`."""
        d = self.attn_stats.as_dict(per_head)
        d.update(attn=self.attn.kind, kv=self.kv, kv_bytes_per_token=self.kv_bytes_per_token)
        if self.attn.kind == "delta":
            d.update(window=self.attn.window, theta=[round(t, 6) for t in self.attn.theta],
                     delta_state_bytes_per_token=4 * self.cfg.n_layer * self.cfg.n_head)
        return d

    def reset_attention_stats(self) -> None:
        """Count attention statistics afresh (e.g. after calibration)."""
        self.attn_stats.reset()

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes each token takes in a new cache (0 for a constant-size recurrent state)."""
        return bytes_per_token(self.spec, self.kv)

    # ------------------------------------------------------------------ caches
    def new_cache(self, n_ctx: int | None = None) -> Cache:
        """An empty cache for this model (its `cache_spec()`), with the engine's KV type and attention."""
        return build_cache(self.spec, n_ctx or self.n_ctx, self.kv, self.attn, self.attn_stats, self.kv_transform)

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (matrices; norms are negligible)."""
        m = self.model
        return m.output.nbytes + sum(x.nbytes for L in m.layers for x in L.matrices())

    # ------------------------------------------------------------------ running
    def _forward(self, tokens: np.ndarray, seqs: list, logits: str) -> np.ndarray:
        """The model's forward on this engine's thread count (applied for the call: engines with different counts,
        and calls from other threads, do not disturb each other); a decode step (one token for each of distinct
        caches) runs as the compiled step where it applies (runtime/fast_decode.py)."""
        import numba
        caches = [c for c, _ in seqs]
        fast = self.fast is not None and all(n == 1 for _, n in seqs) and len(set(map(id, caches))) == len(caches) \
            and self.fast.accepts(caches)
        prev = numba.get_num_threads()
        numba.set_num_threads(self.threads)
        try:
            if fast:  # one new token per sequence (the rows of "all" and "last" are the same); no BLAS in the step
                return self.fast.run(tokens, caches)
            with blas_threads(1):
                return self.model.forward(tokens, seqs, logits)
        finally:
            numba.set_num_threads(prev)


def load(model: str | os.PathLike | None = None, options: EngineOptions | None = None,
         converter: CheckpointConverter | None = None, **kwargs) -> Backend:
    """An `Engine` for a catalog name, a .gguf path, a Hugging Face repository or (None) the default model; an ONNX
    folder (`edgellm convert --format onnx`) gives an `OnnxEngine` (onnxruntime) with the same interface.
    options / kwargs: EngineOptions; converter: converts a checkpoint repository (see runtime/hub.py; edgellm.load
    hands in the converters). The engine's thread count becomes the default of the calling thread."""
    path = resolve_model(model, converter)
    if path.is_dir():
        from .onnx_backend import OnnxEngine
        engine = OnnxEngine(path, options, **kwargs)
    else:
        engine = Engine(path, options, **kwargs)
    use_threads(engine.threads)
    return engine
