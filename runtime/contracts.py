"""The contracts the runtime is built on, in one place: what a model, a cache and a backend offer.

    Model    what a model *is*, one per architecture (models/): `cfg`, `forward(tokens, seqs, logits)`,
             `cache_spec()` (the cache it needs, which the runtime builds)
    Cache    how one sequence remembers its past (runtime/kv_cache.py, latent_cache.py, linear_state.py,
             onnx_backend.py): `n`, `n_ctx`, `truncate`, `can_truncate`, `fork`, `snapshot`/`restore`,
             `nbytes_per_token`
    Backend  a loaded model that runs (runtime/engine.py: GGUF on Numba kernels; onnx_backend.py: onnxruntime):
             `prefill`, `decode`, `decode_batch`, `new_cache`, `tokenizer`, `cfg`, `n_ctx`

Everything above the backend (generation, search, chat, the server, bench) uses only what is declared here:
a caller never asks `hasattr`. `tests/test_contracts.py` checks every architecture and backend against it.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class Snapshot:
    """Copies of what a cache holds for positions start .. stop - 1 (`rows`, one array per per-position array of
    the cache), plus copies of its whole-sequence state as of position `stop` (`state`: e.g. delta attention's
    reference queries and score rows, a recurrent state). Opaque to callers: only the cache type that made it reads
    it (`Cache.restore`)."""
    start: int
    stop: int
    rows: tuple[np.ndarray, ...] = ()
    state: tuple[np.ndarray, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.rows) + sum(a.nbytes for a in self.state)


class Cache(abc.ABC):
    """One sequence's memory of its past. The model writes the new tokens at positions n, n + 1, ... during its
    forward and advances `n` at the end of it. How an architecture reaches the contents (e.g. `KVCache.store` /
    `attend`) is between the architecture and its cache type; everything else uses only this interface."""
    n: int       # tokens held
    n_ctx: int   # the most tokens it can hold
    spec: Any    # what it was built for (a model's CacheSpec; an ONNX graph's cache shapes): a backend refuses a
                 # cache whose spec is not its own

    @property
    @abc.abstractmethod
    def nbytes_per_token(self) -> int:
        """Bytes each held token takes (0 for a constant-size recurrent state)."""

    @abc.abstractmethod
    def can_truncate(self, n: int) -> bool:
        """Whether `truncate(n)` is possible (a recurrent state can go back only to 0 or stay at n)."""

    @abc.abstractmethod
    def truncate(self, n: int) -> None:
        """Keep the first n tokens (0 <= n <= self.n), forget the rest; raises when `can_truncate(n)` is False."""

    @abc.abstractmethod
    def fork(self, n: int | None = None, into: "Cache | None" = None) -> "Cache":
        """An independent copy holding the same tokens, or only the first n (as a copy then `truncate(n)`; raises
        when `can_truncate(n)` is False): writing to either never changes the other. Only what is kept is copied.
        `into`: an empty cache made like this one (the same backend's `new_cache()`), whose memory the copy reuses;
        by default a new cache."""

    @abc.abstractmethod
    def snapshot(self, start: int, stop: int) -> Snapshot:
        """Copies of positions start .. stop - 1 and of the state as of `stop` (stop == self.n: the state is the
        current one)."""

    @abc.abstractmethod
    def restore(self, snapshots: Sequence[Snapshot]) -> int:
        """Fill this empty cache (n == 0, same configuration as the one that made the snapshots) from consecutive
        snapshots (the first starting at 0, each starting where the previous stopped), by copying, not recomputing:
        afterwards it equals the cache the snapshots were taken from, as of the last one's `stop`. Returns n."""


class Model(Protocol):
    """What every architecture in models/ offers (registered in models.ARCHITECTURES by `general.architecture`)."""
    cfg: Any  # models.config.ModelConfig

    def forward(self, tokens: np.ndarray, seqs: Sequence[tuple[Cache, int]], logits: str = "last") -> np.ndarray:
        """Run tokens (N,) — the new tokens of each sequence in `seqs` = [(cache, n_new)] in turn — appending them to
        their caches; logits (N, n_vocab) for logits="all", else one row per sequence (its last token)."""

    def cache_spec(self) -> Any:
        """The cache this model needs (models.cache_spec.CacheSpec); the runtime builds it."""


class Backend(Protocol):
    """A loaded model behind one interface: GGUF files on the Numba kernels (`Engine`) and ONNX folders on
    onnxruntime (`OnnxEngine`). Token ids are checked: bad ids or an overflowing context raise clear errors."""
    cfg: Any          # the model's configuration (n_vocab, n_layer, ...)
    n_ctx: int        # context size of new caches
    tokenizer: Any    # runtime.tokenizer.Tokenizer
    threads: int      # threads each call of this backend runs on
    cache: Cache      # the backend's own cache (the default of prefill / decode)

    def new_cache(self, n_ctx: int | None = None) -> Cache:
        """An empty cache for this model (default size: n_ctx)."""

    def prefill(self, tokens, cache: Cache | None = None, logits: str = "last", chunk: int = 512) -> np.ndarray:
        """Append tokens to the cache: logits of the last one (n_vocab,), or of every one (N, n_vocab)."""

    def decode(self, token: int, cache: Cache | None = None) -> np.ndarray:
        """Append one token: its logits (n_vocab,)."""

    def decode_batch(self, tokens, caches: Sequence[Cache]) -> np.ndarray:
        """One decode step for B sequences at once (one read of the weights): logits (B, n_vocab)."""

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes each token takes in a new cache."""

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads."""

    def attention_stats(self, per_head: bool = False) -> dict:
        """Attention settings and statistics since the last `reset_attention_stats()` (empty when the backend has
        none)."""

    def reset_attention_stats(self) -> None:
        """Start counting attention statistics afresh."""
