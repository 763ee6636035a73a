"""A prefix cache across requests: caches of finished sequences kept in an LRU, keyed by the tokens they hold, so
that a request whose prompt starts with those tokens (a conversation re-sent with one more turn, the same system
prompt) pays only for the tokens after the common prefix.

`lookup` forks the entry it reuses (`Cache.fork()`) and truncates the fork to the common prefix (`Cache.truncate(n)`,
when `Cache.can_truncate(n)`: a recurrent state can only be reused whole), so that the entry stays valid for the
next request; but an entry that is wholly a prefix of the new tokens (the previous turn of a conversation) is handed
out itself, without a copy: the request's own cache will hold all of it and more, and replace it when it ends.
The entries are bounded in number and in bytes, each charged for its whole context
(`Cache.n_ctx` x `Cache.nbytes_per_token`): a cache allocates its context up front (lazily), and how its rows lie in
memory is its own business, so the pages a short entry keeps resident can be many more than its tokens' bytes; the
whole context is the bound that holds. Only the scheduler thread uses it (no locking).

It also keeps up to `max_spares` emptied caches (`recycle`: evicted entries, caches of ended requests not kept),
charged to the same byte bound, for the next new cache or copy (`new_cache`, `copy`): a cache's memory is zeroed
by the kernel page by page as it is first written, and a dim-major cache touches a page per row on its first token
(SmolLM2 at 4,096 tokens: 11,520 pages, ~30 ms of page faults for every new request); a spare has them already.
Emptied is `truncate(0)`, and a copy into a spare is `restore(snapshot(0, n))`: the cache contract, nothing more.
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


def _charge(cache) -> int:
    # the bytes a kept cache is charged: its whole context (see above)
    return cache.n_ctx * cache.nbytes_per_token


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    # a (n,), b (m,) int64 -> length of their longest common prefix
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


class PrefixCache:
    """LRU of caches keyed by token prefix, bounded by `max_bytes` (None: no byte bound; 0: disabled)."""

    def __init__(self, max_bytes: int | None, max_entries: int = MAX_ENTRIES, max_spares: int = 0):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"the prefix cache size must be >= 0 bytes (got {max_bytes})")
        if max_entries < 0 or max_spares < 0:
            raise ValueError(f"max_entries and max_spares must be >= 0 (got {max_entries}, {max_spares})")
        self.max_bytes, self.max_entries, self.max_spares = max_bytes, max_entries, max_spares
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._spares: list[tuple[object, int]] = []  # (emptied cache, bytes charged)
        self._next = 0
        self.nbytes = 0
        self.hits = self.misses = self.tokens_reused = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes != 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens) -> tuple[object | None, int]:
        """A cache holding the longest prefix of `tokens` found (at most len(tokens) - 1 tokens, so that at least
        one token is left to run for the next logits) and that prefix's length; (None, 0) when nothing is reusable.
        The cache returned is the caller's (a fork of the entry, or the entry itself, then no longer kept)."""
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
            self._drop(best, recycle=False)
            cache = e.cache
        else:
            self._entries.move_to_end(best)
            cache = self.copy(e.cache)
            cache.truncate(best_k)
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
        nbytes = _charge(cache)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return False
        self._entries[self._next] = _Entry(tokens.copy(), cache, nbytes)
        self._next += 1
        self.nbytes += nbytes
        while self._spares and self._over():  # spares go first
            self.nbytes -= self._spares.pop()[1]
        while self._entries and (len(self._entries) > self.max_entries or self._over()):
            self._drop(next(iter(self._entries)))  # (kept as a spare if that fits)
        return True

    # ------------------------------------------------------------------ spares
    def recycle(self, cache) -> None:
        """A cache nobody holds any more (an evicted entry, a request's cache not kept): emptied and kept as a
        spare when there is room (`max_spares`, and the byte bound with the entries), else left to be freed."""
        nbytes = _charge(cache)
        if len(self._spares) >= self.max_spares or not self.enabled or not cache.can_truncate(0) or \
                (self.max_bytes is not None and self.nbytes + nbytes > self.max_bytes):
            return
        cache.truncate(0)
        self._spares.append((cache, nbytes))
        self.nbytes += nbytes

    def new_cache(self, make):
        """An empty cache: a spare if there is one, else `make()`."""
        spare = self._take_spare()
        return spare if spare is not None else make()

    def copy(self, cache):
        """An independent copy of `cache` (`fork()`), into a spare if there is one (a spare holds caches of the
        same configuration: one scheduler, one engine)."""
        spare = self._take_spare()
        if spare is None:
            return cache.fork()
        spare.restore([cache.snapshot(0, cache.n)])
        return spare

    def _take_spare(self):
        if not self._spares:
            return None
        cache, nbytes = self._spares.pop()
        self.nbytes -= nbytes
        return cache

    def _over(self) -> bool:
        return self.max_bytes is not None and self.nbytes > self.max_bytes

    def _drop(self, key: int, recycle: bool = True) -> None:
        e = self._entries.pop(key)
        self.nbytes -= e.nbytes
        if recycle:
            self.recycle(e.cache)

    def clear(self) -> None:
        self._entries.clear()
        self._spares.clear()
        self.nbytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._entries), "spares": len(self._spares), "bytes": self.nbytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "tokens_reused": self.tokens_reused}
