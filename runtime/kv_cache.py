"""The KV cache of the Llama family: per-head keys and values, with dense or delta attention over them.

`KVCache` implements the `Cache` contract (runtime/contracts.py) through `RowCache` (runtime/cache_base.py), and the
pair the model calls: `store(layer, k, v)` and `attend(layer, q, scale, out)`. The model writes the new tokens at
positions n, n + 1, ... and advances `n` at the end of its forward.

`KVCache` stores keys and values dim-major per kv head, in f32, f16, q8_0 or q4_0 (blocks of 32 dimensions per
token and head, as llama.cpp's -ctk/-ctv: kernels/kv_store.py), and attends directly on that storage
(kernels/attention.py; delta attention: kernels/delta.py).
With delta attention (`AttentionConfig(kind="delta")`) it also keeps the delta state of every layer (reference
queries q̂ and one score row per query head) and counts the multiply-adds the delta rule skipped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..kernels import attention as A
from ..kernels import kv_store as S
from ..models.cache_spec import KV, CacheSpec
from .cache_base import RowCache, lazy_zeros
from .errors import ArgumentError

KV_TYPES = S.KV_TYPES
ATTN_KINDS = ("dense", "delta")
PREFILL, DECODE = 0, 1
PHASES = ("prefill", "decode")
# positions a new cache allocates (it grows, doubling, as the sequence does, up to n_ctx): the rows of a dim-major
# cache lie `cap` positions apart, and a short sequence in an allocation for 4,096 touches a page per row (SmolLM2:
# 11,520) that the kernel zero-fills on first write, and reads rows scattered 16 KB apart. At 256: a new cache and a
# 40-token prefill 84 -> 48 ms, a fork 38 -> 10 ms; the server at 8 clients 347 -> 444 tok/s, peak RSS 997 -> 558 MiB.
# At 64 rather than 256, rows are at least half full: SmolLM2's batched step over 8 sequences of 100 tokens spends
# 2.4-2.8 ms in attention instead of 3.4-3.9 (f16; an attention work item on rows 128 apart 6.0 us, 256 apart 8.3)
INITIAL_CAP = 64


def parse_kv(kv: str) -> tuple[str, str]:
    """"q8_0" -> (q8_0, q8_0); "q8_0,q4_0" -> K in q8_0, V in q4_0 (as llama.cpp's -ctk / -ctv)."""
    parts = [p.strip() for p in str(kv).split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or any(p not in KV_TYPES for p in parts):
        raise ArgumentError(f"unknown KV cache type {kv!r} (choose from {', '.join(KV_TYPES)}, or K,V as q8_0,q4_0)",
                            "kv")
    return parts[0], parts[1]


@dataclass(frozen=True)
class AttentionConfig:
    """How attention runs: "dense", or "delta" with a threshold θ per layer and a window of W exact keys."""
    kind: str = "dense"
    theta: tuple = ()  # per layer (delta)
    window: int = 64
    # per layer, query head and dimension (n_layer, n_head, head_dim): the threshold of dimension i is θ * dim_scale[i]
    # (calibration sets it to the inverse RMS of the keys' dimension: a change of q_i matters in proportion to k_i)
    dim_scale: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in ATTN_KINDS:
            raise ArgumentError(f"unknown attention {self.kind!r} (choose from {', '.join(ATTN_KINDS)})", "attn")
        if self.kind == "delta":
            if self.window < 1:
                raise ArgumentError(f"delta_window must be >= 1 (got {self.window})", "delta_window")
            if any(not np.isfinite(t) or t < 0 for t in self.theta):
                raise ArgumentError("delta_threshold must be finite and >= 0", "delta_threshold")


class AttentionStats:
    """Outside-window score multiply-adds of delta attention, skipped and possible, per phase (prefill, decode),
    layer and query head; and the seconds spent in attention (store + attend) per phase."""

    def __init__(self, n_layer: int, n_head: int):
        self.skipped = np.zeros((2, n_layer, n_head))
        self.total = np.zeros((2, n_layer, n_head))
        self.seconds = np.zeros(2)
        self.calls = np.zeros(2, dtype=np.int64)

    def reset(self) -> None:
        self.skipped[:] = 0
        self.total[:] = 0
        self.seconds[:] = 0
        self.calls[:] = 0

    @staticmethod
    def _ratio(s, t):
        return np.divide(s, t, out=np.zeros(np.shape(s)), where=np.asarray(t) > 0)

    def sparsity(self, phase: int | None = None) -> float:
        """Fraction of the outside-window multiply-adds skipped (both phases when phase is None)."""
        sl = slice(None) if phase is None else phase
        return float(self._ratio(self.skipped[sl].sum(), self.total[sl].sum()))

    def as_dict(self, per_head: bool = False) -> dict:
        out = {"sparsity": self.sparsity()}
        for p, name in enumerate(PHASES):
            d = {"sparsity": self.sparsity(p), "macs_skipped": float(self.skipped[p].sum()),
                 "macs_outside_window": float(self.total[p].sum()),
                 "per_layer": [round(float(x), 4) for x in self._ratio(self.skipped[p].sum(1), self.total[p].sum(1))],
                 "attention_seconds": float(self.seconds[p])}
            if per_head:
                d["per_head"] = np.round(self._ratio(self.skipped[p], self.total[p]), 4).tolist()
            out[name] = d
        return out


class KVCache(RowCache):
    """Per-head keys and values of every layer. k[l] / v[l] hold one layer in the layout of `kernels/kv_store.py`
    (dim-major: f32 k[l] is (n_head_kv, head_dim, cap)); k_scales / v_scales the f16 block scales of q8_0 / q4_0.
    `cap` positions are allocated (INITIAL_CAP at first, at most n_ctx): a store beyond them, or `reserve(n)`,
    reallocates the arrays at twice the size or more and copies the positions held (`version` counts the
    reallocations: views and addresses of the arrays hold until the next one).
    Layers may differ in head counts (a pruned model: the spec's `layer_heads` = [(n_head, n_head_kv)] per layer);
    then k, v, k_scales, v_scales are lists holding each layer's own size, and n_head / n_head_kv are the largest."""

    def __init__(self, spec: CacheSpec, n_ctx: int, kv: str = "f32", attn: AttentionConfig | None = None,
                 stats: AttentionStats | None = None, transform: bool = True):
        """spec: the model's cache (models/cache_spec.py, kind KV); kv: the storage of K and V ("q8_0" or "K,V"
        types); attn: dense or delta; stats: where attention statistics accumulate (shared by an engine's caches);
        transform: store quantized K/V Hadamard-rotated and centred (see below)."""
        if spec.kind != KV:
            raise ValueError(f"KVCache needs a cache spec of kind {KV!r} (got {spec.kind!r})")
        self.spec = spec
        self.type_k, self.type_v = parse_kv(kv)
        self.kv, self.n_ctx, self.n, self.transform = kv, n_ctx, 0, transform
        n_layer, n_head_kv, head_dim = spec.n_layer, spec.n_head_kv, spec.head_dim
        self.n_layer, self.n_head_kv, self.n_head, self.head_dim = n_layer, n_head_kv, spec.n_head, head_dim
        self.layer_heads = spec.layer_heads
        self.per_layer = not spec.uniform
        self.attn = attn or AttentionConfig()
        if self.attn.kind == "delta" and len(self.attn.theta) != n_layer:
            raise ValueError(f"delta attention needs one threshold per layer ({n_layer}), got {len(self.attn.theta)}")
        self.stats = stats if stats is not None else AttentionStats(n_layer, self.n_head)
        self.version = 0
        self._allocate(min(n_ctx, INITIAL_CAP))
        if self.attn.kind == "delta":
            self.qhat = np.zeros((n_layer, self.n_head, head_dim), dtype=np.float32)
            self.srow = lazy_zeros((n_layer, self.n_head, n_ctx), np.float32)
            sc = (np.ones((n_layer, self.n_head, head_dim), np.float32) if self.attn.dim_scale is None
                  else np.asarray(self.attn.dim_scale, np.float32).reshape(n_layer, self.n_head, head_dim))
            self._theta = np.ascontiguousarray(np.asarray(self.attn.theta, np.float32)[:, None, None] * sc)
        else:
            self.qhat = self.srow = np.zeros((n_layer, 1, 1), dtype=np.float32)
        # quantized K / V are stored Hadamard-rotated (as llama.cpp does, `attn_rot_k/v`): the rotation spreads the
        # outlier dimensions of keys over the whole head before the 32-value blocks get their scales (q4_0 K: +16%
        # perplexity without, +5% with, on SmolLM2). Not the keys under delta attention: the delta rule needs the
        # rotary basis, where most query dimensions change slowly.
        quant = ("q8_0", "q4_0")
        self.rot_k = bool(transform and self.type_k in quant and S.can_rotate(head_dim) and self.attn.kind != "delta")
        self.rot_v = bool(transform and self.type_v in quant and S.can_rotate(head_dim))
        # ... and centred: every key is stored minus one offset mu per layer and kv head, which changes all of a
        # query's scores by the same q . mu, so softmax ignores it exactly; the value offset is added back to the
        # output. Quantized caches take the mean of the sequence's first stored tokens: keys lose their constant (slow
        # rotary) part, which would otherwise set the block scales (q4_0 K: +5% -> +2% perplexity). Delta attention
        # takes the first token's key (the attention sink): an old key's score is off by (q̂ - q) . (k_j - mu), so
        # the sink, which holds most of the attention, is scored exactly.
        self.center_k = bool(transform and (self.type_k in quant or self.attn.kind == "delta"))
        self.sink_center = self.attn.kind == "delta"
        self.center_v = bool(transform and self.type_v in quant)
        self.k_mean = np.zeros((n_layer, n_head_kv, head_dim), dtype=np.float32)
        self.v_mean = np.zeros((n_layer, n_head_kv, head_dim), dtype=np.float32)
        self.recorder: list | None = None  # set to a list per layer to collect the queries (θ calibration)
        # what attention_decode takes for each layer's delta state, built once (dense: delta False, the rest unused);
        # for its storage: _storage
        delta = self.attn.kind == "delta"
        self._decode_state = []
        for li, (H, _) in enumerate(self.layer_heads):
            qhat = self.qhat[li, :H] if delta else self.qhat[li]
            self._decode_state.append((delta, self.attn.window, qhat, self.srow[li, :H] if delta else self.srow[li],
                                       self._theta[li, :H] if delta else qhat, self.stats.skipped[DECODE, li, :H],
                                       self.stats.total[DECODE, li, :H]))

    # ------------------------------------------------------------------ allocation
    def _allocate(self, cap: int) -> None:
        """(Re)allocate K, V and their scales for `cap` positions, keeping the positions held."""
        old = (self.k, self.k_scales, self.v, self.v_scales) if self.version else None
        n_layer, head_dim = self.n_layer, self.head_dim
        # (np.zeros, huge pages where NumPy advises them, not cache_base.lazy_zeros: the arrays hold `cap` positions,
        # at most twice the positions held, so the positions held already touch every small page of them; in huge
        # pages a copy into a fresh 1,024-position cache of SmolLM2 (fork, growth) takes 5 ms instead of 18)
        for name, t in (("k", self.type_k), ("v", self.type_v)):
            if not self.per_layer:
                shape, dtype, sshape = S.layout(t, self.n_head_kv, head_dim, cap)
                setattr(self, name, np.zeros((n_layer,) + shape, dtype))
                setattr(self, name + "_scales", np.zeros((n_layer,) + sshape, np.uint16))
            else:  # one array per layer, of that layer's size
                lay = [S.layout(t, hkv, head_dim, cap) for _, hkv in self.layer_heads]
                setattr(self, name, [np.zeros(shape, dtype) for shape, dtype, _ in lay])
                setattr(self, name + "_scales", [np.zeros(sshape, np.uint16) for _, _, sshape in lay])
        if old is not None and self.n:
            for src, dst in zip(old, (self.k, self.k_scales, self.v, self.v_scales)):
                for li in range(n_layer):
                    dst[li][..., :self.n] = src[li][..., :self.n]
        self.cap = cap
        self.version += 1
        self._kv_args = None  # (built on first use: _storage)

    def _storage(self, layer: int) -> tuple:
        # what attention_decode takes for a layer's storage (views of the arrays, until they are reallocated)
        if self._kv_args is None:
            self._kv_args = [(self.k[li], self.k_scales[li], self.v[li], self.v_scales[li], self.rot_k,
                              self.rot_v) for li in range(self.n_layer)]
        return self._kv_args[layer]

    def reserve(self, n: int) -> None:
        """Room for positions 0 .. n - 1 (n <= n_ctx): the arrays grow, at least doubling, when they hold fewer
        (RowCache's hook too: fork and restore reserve the positions they copy in)."""
        if n > self.cap:
            if n > self.n_ctx:
                raise ValueError(f"{n} positions do not fit in a cache of {self.n_ctx}")
            cap = self.cap
            while cap < n:
                cap *= 2
            self._allocate(min(cap, self.n_ctx))

    # ------------------------------------------------------------------ the Cache interface
    @property
    def nbytes_per_token(self) -> int:
        """Bytes of keys and values per token (all layers), at ggml's type sizes."""
        return sum(S.bytes_per_token(self.type_k, hkv, self.head_dim) + S.bytes_per_token(self.type_v, hkv, self.head_dim)
                   for _, hkv in self.layer_heads)

    @property
    def state_bytes_per_token(self) -> int:
        """Bytes per token of the delta state (one f32 score per layer and query head); 0 for dense attention."""
        return 4 * sum(h for h, _ in self.layer_heads) if self.attn.kind == "delta" else 0

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (for reusing a common prefix). Delta attention keeps its
        state: the score rows and q̂ stay a valid approximation of q̂ · k_j for the kept keys (its invariant), and
        new keys enter through the exact window; truncate(0) starts it afresh (q̂ = 0)."""
        super().truncate(n)
        if n == 0 and self.attn.kind == "delta":
            self.qhat[:] = 0

    # the arrays fork / snapshot / restore copy (see RowCache): K/V rows (and their block scales) per position;
    # the centring offsets; delta attention's q̂ and score rows (rewritten at every step: state)
    def _rows(self) -> list:
        ax = 2 if self.per_layer else 3
        arrays = [self.k, self.v] + [s for s in (self.k_scales, self.v_scales) if (s[0] if self.per_layer else s).size]
        return [(a, ax) for x in arrays for a in (x if self.per_layer else [x])]

    def _state(self) -> list:
        return [self.k_mean, self.v_mean] + ([self.qhat] if self.attn.kind == "delta" else [])

    def _state_rows(self) -> list:
        return [(self.srow, 2)] if self.attn.kind == "delta" else []

    def _empty(self) -> "KVCache":
        """An empty cache of the same configuration (statistics shared)."""
        return KVCache(self.spec, self.n_ctx, self.kv, self.attn, self.stats, self.transform)

    # ------------------------------------------------------------------ what the model calls
    def store(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v (T, n_head_kv, head_dim) f32 of the tokens at positions n .. n + T - 1."""
        t = time.perf_counter()
        self.reserve(self.n + len(k))  # (grows at the first layer's store of a forward)
        k = np.ascontiguousarray(k, dtype=np.float32)
        v = np.ascontiguousarray(v, dtype=np.float32)
        if self.center_k or self.center_v:
            hkv = self.layer_heads[layer][1]
            km, vm = self.k_mean[layer, :hkv], self.v_mean[layer, :hkv]
            if self.n == 0:  # the first tokens of the sequence fix the offsets
                km[:] = (k[0] if self.sink_center else k.mean(0)) if self.center_k else 0
                vm[:] = v.mean(0) if self.center_v else 0
            k = k - km if self.center_k else k
            v = v - vm if self.center_v else v
        S.store_kv(self.k[layer], self.k_scales[layer], self.v[layer], self.v_scales[layer], k, v, self.n,
                   self.rot_k, self.rot_v)
        self.stats.seconds[DECODE if len(k) == 1 else PREFILL] += time.perf_counter() - t

    def attend(self, layer: int, q: np.ndarray, scale: float, out: np.ndarray) -> np.ndarray:
        """q (T, n_head, head_dim) of the tokens at positions n .. n + T - 1 (already stored) -> out (T, n_head,
        head_dim): causal attention over the cache, dense or delta."""
        t0 = time.perf_counter()
        T = q.shape[0]
        p0, N = self.n, self.n + T
        if self.recorder is not None:
            self.recorder[layer].append(np.array(q, dtype=np.float32))
        phase = DECODE if T == 1 else PREFILL
        H, hkv = self.layer_heads[layer]
        if T == 1:
            A.attention_decode(np.ascontiguousarray(q[0]), self._storage(layer), N, np.float32(scale),
                               self._decode_state[layer], out[0])
        elif self.attn.kind != "delta":  # dense prefill, on the cache itself (rotations inside)
            out[:] = A.attention_prefill_cache(np.ascontiguousarray(q, dtype=np.float32), self._storage(layer), p0,
                                               np.float32(scale), np.empty(q.shape, dtype=np.float32))
        else:  # delta prefill: BLAS over the context dequantized
            K, V = self.keys_dm(layer, N), self.values_dm(layer, N)
            if self.rot_k:
                q = S.fwht_rows(np.array(q, dtype=np.float32).reshape(-1, self.head_dim)).reshape(q.shape)
            out[:] = A.delta_attention_prefill(np.ascontiguousarray(q), K, V, p0, scale, self.qhat[layer, :H],
                                               self.srow[layer, :H], self._theta[layer, :H], self.attn.window,
                                               self.stats.skipped[PREFILL, layer, :H],
                                               self.stats.total[PREFILL, layer, :H])
            if self.rot_v:
                S.fwht_rows(out.reshape(-1, self.head_dim))
        if self.center_v:  # softmax weights sum to 1: the value offset comes back whole
            out += np.repeat(self.v_mean[layer, :hkv], H // hkv, axis=0)
        self.stats.seconds[phase] += time.perf_counter() - t0
        self.stats.calls[phase] += 1
        return out

    # ------------------------------------------------------------------ reading back (f32)
    def keys_dm(self, layer: int, n: int | None = None) -> np.ndarray:
        """(n_head_kv, head_dim, >= n) f32 keys of one layer, dim-major (the cache itself when it is f32: until it
        grows)."""
        return self._dm(self.k, self.k_scales, layer, self.n if n is None else n)

    def values_dm(self, layer: int, n: int | None = None) -> np.ndarray:
        return self._dm(self.v, self.v_scales, layer, self.n if n is None else n)

    def _dm(self, data, scales, layer, n):
        if data[layer].dtype == np.float32:
            return data[layer]
        out = np.empty((self.layer_heads[layer][1], self.head_dim, n), dtype=np.float32)
        return S.dequantize_cache(data[layer], scales[layer], n, out)

    def keys(self, layer: int) -> np.ndarray:
        """(n_head_kv, n, head_dim) f32 keys of the tokens held (a copy, token-major, rotated back)."""
        k = np.ascontiguousarray(self.keys_dm(layer)[:, :, :self.n].transpose(0, 2, 1))
        if self.rot_k:
            S.fwht_rows(k.reshape(-1, self.head_dim))
        return k + self.k_mean[layer, :len(k)][:, None, :] if self.center_k else k

    def values(self, layer: int) -> np.ndarray:
        v = np.ascontiguousarray(self.values_dm(layer)[:, :, :self.n].transpose(0, 2, 1))
        if self.rot_v:
            S.fwht_rows(v.reshape(-1, self.head_dim))
        return v + self.v_mean[layer, :len(v)][:, None, :] if self.center_v else v
