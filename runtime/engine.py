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
from .caches import build_cache, bytes_per_token, check_options
from .contracts import Cache
from .kv_cache import ATTN_KINDS, AttentionConfig, AttentionStats, KVCache, parse_kv

DEFAULT_WINDOW = 64  # delta attention: keys nearest the query that are always scored exactly
DEFAULT_SPARSITY = 0.5  # delta attention without a threshold: calibrated to skip this fraction
from .fast_decode import FastDecode
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

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None,
                 kv: str = "f32", attn: str = "dense", delta_threshold=None, delta_sparsity: float | None = None,
                 delta_window: int = DEFAULT_WINDOW, calib=None, kv_transform: bool = True, fast: bool = True):
        """kv: the KV cache type of new caches (f32, f16, q8_0, q4_0; or "K,V" types). attn: "dense" or "delta"; delta takes a
        threshold θ (one float, or one per layer) or a target sparsity, for which θ is calibrated per layer on
        `calib` (text or token ids; default: runtime/calibration.py's text), and a window of exact keys; --attn delta
        alone calibrates to DEFAULT_SPARSITY.
        kv_transform: store quantized K/V Hadamard-rotated (as llama.cpp does) and centred (see KVCache).
        fast: decode steps run as one compiled call where the model allows it (runtime/fast_decode.py; the model's
        forward otherwise, and always with fast=False)."""
        t0 = time.perf_counter()
        try:
            parse_kv(kv)
        except ValueError as e:
            raise EdgeLLMError(str(e)) from None
        if attn not in ATTN_KINDS:
            raise EdgeLLMError(f"unknown --attn {attn!r} (choose from {', '.join(ATTN_KINDS)})")
        if attn == "dense" and (delta_threshold is not None or delta_sparsity is not None):
            raise EdgeLLMError("--delta-threshold / --delta-sparsity need --attn delta")
        if delta_threshold is not None and delta_sparsity is not None:
            raise EdgeLLMError("give either --delta-threshold or --delta-sparsity, not both")
        if delta_sparsity is not None and not 0 <= delta_sparsity < 1:
            raise EdgeLLMError(f"--delta-sparsity must be in [0, 1) (got {delta_sparsity})")
        if delta_window < 1:
            raise EdgeLLMError(f"--delta-window must be >= 1 (got {delta_window})")
        self.kv, self.kv_transform = kv, kv_transform
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
        try:
            self.model = arch(self.cfg, self.weights)
        except ConfigError as e:  # metadata an architecture checks itself (e.g. deci's per-layer arrays)
            raise GGUFError(f"{path}: {e}") from None
        from .tokenizer import Tokenizer
        self.tokenizer = Tokenizer.from_gguf(self.file)
        self.spec = self.model.cache_spec()
        check_options(self.spec, kv, attn)
        self.n_ctx = n_ctx or min(self.cfg.n_ctx_train, 4096)
        if self.n_ctx < 8:
            raise EdgeLLMError(f"context size {self.n_ctx} is too small (at least 8 tokens)")
        self.attn = AttentionConfig()
        self.attn_stats = AttentionStats(self.cfg.n_layer, self.cfg.n_head)
        if attn == "delta":
            if delta_threshold is None:  # --attn delta alone: calibrated to DEFAULT_SPARSITY
                self.calibrate_delta(DEFAULT_SPARSITY if delta_sparsity is None else delta_sparsity, calib,
                                     delta_window)
            else:
                th = delta_threshold
                th = [float(th)] * self.cfg.n_layer if np.ndim(th) == 0 else [float(t) for t in th]
                try:
                    self.attn = AttentionConfig("delta", tuple(th), delta_window)
                except ValueError as e:
                    raise EdgeLLMError(str(e)) from None
        self.cache = self.new_cache()
        self.fast = FastDecode.build(self) if fast else None  # compiled on its first use
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
        from ..kernels.attention import calibrate_threshold
        toks = self._calibration_tokens(calib, max_tokens)
        c = self.cfg
        if len(toks) <= window + 1:
            raise EdgeLLMError(f"delta calibration needs more than {window + 1} tokens of text (got {len(toks)})")
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

    def _check(self, tokens: np.ndarray, cache: Cache) -> None:
        if cache.spec is not self.spec and cache.spec != self.spec:
            raise ValueError("the cache was made for another model (use this engine's new_cache())")
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence")
        if tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.cfg.n_vocab})")
        if cache.n + len(tokens) > cache.n_ctx:
            raise ContextOverflowError(f"{cache.n + len(tokens)} tokens do not fit in the context of "
                                       f"{cache.n_ctx} tokens (use --ctx to enlarge it)")

    # ------------------------------------------------------------------ running
    def prefill(self, tokens, cache: Cache | None = None, logits: str = "last", chunk: int = 512) -> np.ndarray:
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

    def decode(self, token: int, cache: Cache | None = None) -> np.ndarray:
        """Append one token; its logits (n_vocab,)."""
        cache = self.cache if cache is None else cache
        if self.fast is not None and self.fast.accepts([cache]):
            tokens = np.array([token], dtype=np.int64)
            self._check(tokens, cache)
            return self.fast.run(tokens, [cache])[0]
        return self.prefill([token], cache)

    def decode_batch(self, tokens, caches: list[Cache]) -> np.ndarray:
        """One decode step for B sequences at once (one read of the weights): logits (B, n_vocab)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) != len(caches):
            raise ValueError("decode_batch needs one token per cache")
        for t, c in zip(tokens, caches):
            self._check(np.array([t]), c)
        if self.fast is not None and len(caches) and self.fast.accepts(caches) \
                and len({id(c) for c in caches}) == len(caches):
            return self.fast.run(tokens, caches)
        return self.model.forward(tokens, [(c, 1) for c in caches], logits="last")


def load(model: str | os.PathLike | None = None, **kwargs) -> Engine:
    """An `Engine` for a catalog name, a .gguf path, or (None) the default model; an ONNX folder
    (`edgellm convert --format onnx`) gives an `OnnxEngine` (onnxruntime) with the same interface."""
    path = resolve_model(model)
    if path.is_dir():
        from .onnx_backend import OnnxEngine
        return OnnxEngine(path, **kwargs)
    return Engine(path, **kwargs)
