"""A prefix cache across requests: caches of finished sequences kept in an LRU, keyed by the tokens they hold, so
that a request whose prompt starts with those tokens (a conversation re-sent with one more turn, the same system
prompt) pays only for the tokens after the common prefix.

`lookup` copies the common prefix of the entry it reuses (`Cache.fork(n)`, when `Cache.can_truncate(n)`: a recurrent
state can only be reused whole; only the n positions are copied), so that the entry stays valid for the next
request; but an entry that is wholly a prefix of the new tokens (the previous turn of a conversation) is handed out
itself, without a copy: the request's own cache will hold all of it and more, and replace it when it ends.
The entries are bounded in number and in bytes, each charged for its whole context
(`Cache.n_ctx` x `Cache.nbytes_per_token`): a cache may allocate up to its whole context, and how its rows lie in
memory is its own business, so the pages a short entry keeps resident can be many more than its tokens' bytes; the
whole context is the bound that holds. Only the scheduler thread uses it (no locking). The scheduler reuses the
memory of the caches it lets go (`on_drop`) for its next ones, and makes lookup's copies into them (`copy`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

MAX_ENTRIES = 64  # whatever their bytes (a recurrent state has no per-token bytes)


@dataclass
class _Entry:
    tokens: np.ndarray  # (n,) int64: the tokens the cache holds
    cache: object
    nbytes: int


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    # a (n,), b (m,) int64 -> length of their longest common prefix
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


class PrefixCache:
    """LRU of caches keyed by token prefix, bounded by `max_bytes` (None: no byte bound; 0: disabled)."""

    def __init__(self, max_bytes: int | None, max_entries: int = MAX_ENTRIES, on_drop=None):
        """on_drop(cache): called with the cache of every entry dropped (evicted, or covered by a new one), which
        nobody holds any more."""
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"the prefix cache size must be >= 0 bytes (got {max_bytes})")
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0 (got {max_entries})")
        self.max_bytes, self.max_entries, self.on_drop = max_bytes, max_entries, on_drop
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self.nbytes = 0
        self.hits = self.misses = self.tokens_reused = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes != 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens, copy=None) -> tuple[object | None, int]:
        """A cache holding the longest prefix of `tokens` found (at most len(tokens) - 1 tokens, so that at least
        one token is left to run for the next logits) and that prefix's length; (None, 0) when nothing is reusable.
        The cache returned is the caller's (a copy of the prefix of the entry, made by `copy(cache, n)`, by default
        `cache.fork(n)`; or the entry itself, then no longer kept)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        limit = len(tokens) - 1
        best, best_k = None, 0
        for key, e in self._entries.items():
            k = min(common_prefix_len(e.tokens, tokens), limit)
            if k > best_k and e.cache.can_truncate(k):
                best, best_k = key, k
        if best is None:
            self.misses += 1
            return None, 0
        e = self._entries[best]
        if best_k == len(e.tokens):
            # the whole entry is a prefix of these tokens (a conversation re-sent with one more turn): it is handed
            # out itself, no copy; the cache of this request, which will hold all of it and more, replaces it
            self.nbytes -= self._entries.pop(best).nbytes
            cache = e.cache
        else:
            self._entries.move_to_end(best)
            cache = copy(e.cache, best_k) if copy is not None else e.cache.fork(best_k)
        self.hits += 1
        self.tokens_reused += best_k
        return cache, best_k

    def insert(self, tokens, cache) -> bool:
        """Keep `cache` (which holds exactly `tokens`; it becomes the prefix cache's). Entries whose tokens are a
        prefix of these are dropped (this one covers them); if an entry already extends these tokens, it is only
        marked as recently used. Returns whether the cache was kept."""
        if not self.enabled or cache.n == 0:
            return False
        tokens = np.asarray(tokens, dtype=np.int64)[:cache.n]
        if len(tokens) != cache.n:
            raise ValueError(f"the cache holds {cache.n} tokens but {len(tokens)} were given")
        for key, e in list(self._entries.items()):
            k = common_prefix_len(e.tokens, tokens)
            if k == len(tokens):  # an entry already holds these tokens (and maybe more)
                self._entries.move_to_end(key)
                return False
            if k == len(e.tokens):  # the new cache covers this entry
                self._drop(key)
        nbytes = cache.n_ctx * cache.nbytes_per_token
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return False
        self._entries[self._next] = _Entry(tokens.copy(), cache, nbytes)
        self._next += 1
        self.nbytes += nbytes
        while self._entries and (len(self._entries) > self.max_entries or
                                 (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: int) -> None:
        e = self._entries.pop(key)
        self.nbytes -= e.nbytes
        if self.on_drop is not None:
            self.on_drop(e.cache)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "tokens_reused": self.tokens_reused}
