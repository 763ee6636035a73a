"""The two ways a cache keeps a sequence, as shared implementations of the `Cache` contract (runtime/contracts.py):

- `RowCache`: arrays allocated for n_ctx positions, one row per token along a position axis (K/V, latents),
  plus whole-sequence state. A subclass declares which of its arrays are which (`_rows`, `_state`, `_state_rows`)
  and how to make an empty one like itself (`_empty`); fork, truncate, snapshot and restore follow from that.
- `RecurrentState`: a constant-size state (linear attention), no rows: it can go back only to the start.
"""
from __future__ import annotations

import mmap
from typing import Sequence

import numpy as np

from .contracts import Cache, Snapshot
from .errors import CacheError


def lazy_zeros(shape: tuple, dtype) -> np.ndarray:
    """np.zeros for the arrays a cache allocates for its whole context: anonymous memory that the kernel zeroes page
    by page as it is first written, in small pages. A sequence writes a few positions of every row of a dim-major
    cache, so it touches one page per row; NumPy advises huge pages for large arrays, and then each of those writes
    zero-fills 2 MiB: a fresh 4,096-token cache of SmolLM2 cost 430 ms to write its first 30 tokens (47 ms in small
    pages) and kept all 189 MB resident."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < 1 << 20 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype=dtype).reshape(shape)


def _along(axis: int, a: int, b: int) -> tuple:
    """Index of positions a .. b - 1 along `axis`."""
    return (slice(None),) * axis + (slice(a, b),)


def check_consecutive(snapshots: Sequence[Snapshot], n: int, n_ctx: int) -> int:
    """The cache a restore writes into must be empty and the snapshots consecutive from 0; -> their last stop."""
    if n != 0:
        raise CacheError(f"restore needs an empty cache (this one holds {n} tokens)")
    pos = 0
    for s in snapshots:
        if s.start != pos or s.stop < s.start:
            raise CacheError(f"snapshots are not consecutive: positions {s.start}..{s.stop} after {pos}")
        pos = s.stop
    if pos > n_ctx:
        raise CacheError(f"{pos} restored tokens do not fit in a cache of {n_ctx}")
    return pos


def check_fork_target(src: Cache, into: Cache, room: int, layout=lambda c: None) -> Cache:
    """`into` (the target of src.fork(into=...)) is an empty cache made like src (same type, spec and `layout(c)`)
    with room for `room` positions."""
    if type(into) is not type(src) or into.spec != src.spec or layout(into) != layout(src):
        raise CacheError("fork(into=...) needs a cache made like this one (the same backend's new_cache())")
    if into.n != 0 or room > into.n_ctx:
        raise CacheError(f"fork(into=...) needs an empty cache with room for {room} tokens "
                         f"(it holds {into.n} of {into.n_ctx})")
    return into


def _state_layout(c) -> list:
    return [(a.dtype, a.shape) for a in c._state()]


class RowCache(Cache):
    """A cache of per-position rows. Subclasses set `n`, `n_ctx` and declare their arrays:
    `_rows()`: [(array, position axis)] of per-token contents (copied by position range);
    `_state()`: [array] of whole-sequence state (copied whole);
    `_state_rows()`: [(array, position axis)] of state kept per position but rewritten as the sequence grows
    (delta attention's score rows: copied whole up to the last position);
    `_empty()`: an empty cache of the same configuration;
    `reserve(n)` (optional): room for n positions, for a cache whose arrays grow with the sequence."""

    def _rows(self) -> list[tuple[np.ndarray, int]]:
        raise NotImplementedError

    def _state(self) -> list[np.ndarray]:
        return []

    def _state_rows(self) -> list[tuple[np.ndarray, int]]:
        return []

    def _empty(self) -> "RowCache":
        raise NotImplementedError

    def reserve(self, n: int) -> None:
        """Room for positions 0 .. n - 1 in the arrays of `_rows()` (a cache that allocates as it grows)."""

    def can_truncate(self, n: int) -> bool:
        return 0 <= n <= self.n

    def truncate(self, n: int) -> None:
        if not self.can_truncate(n):
            raise CacheError(f"cannot truncate a cache of {self.n} tokens to {n}")
        self.n = n

    def fork(self, n: int | None = None, into: "RowCache | None" = None) -> "RowCache":
        """A cache of the same configuration (statistics are shared) holding a copy of the first n positions (default:
        all) and of the state, then truncated to n (see Cache.fork); `into`: an empty one to copy into."""
        n = self.n if n is None else n
        if not self.can_truncate(n):
            raise CacheError(f"cannot fork {n} of the {self.n} tokens of this cache")
        c = self._empty() if into is None else check_fork_target(
            self, into, self.n if self._state_rows() else n, RowCache._layout)  # (state rows: copied up to self.n)
        c.reserve(n)
        for (src, ax), (dst, _) in zip(self._rows(), c._rows()):
            dst[_along(ax, 0, n)] = src[_along(ax, 0, n)]
        for (src, ax), (dst, _) in zip(self._state_rows(), c._state_rows()):  # (allocated for n_ctx positions)
            dst[_along(ax, 0, self.n)] = src[_along(ax, 0, self.n)]
        for src, dst in zip(self._state(), c._state()):
            dst[...] = src
        c.n = self.n  # (the rows past n are not copied: truncate only forgets them)
        c.truncate(n)
        return c

    def _layout(self) -> list:
        # dtype and shape but the position axis of every array (what a fork into another cache relies on)
        rows = [(a.dtype, a.shape[:ax] + a.shape[ax + 1:], ax) for a, ax in self._rows() + self._state_rows()]
        return rows + _state_layout(self)

    def snapshot(self, start: int, stop: int) -> Snapshot:
        if not 0 <= start <= stop <= self.n:
            raise CacheError(f"cannot snapshot positions {start}..{stop} of a cache of {self.n} tokens")
        if stop != self.n and self._state_rows():
            raise CacheError("this cache's state changes with every token: snapshot up to its last position")
        return Snapshot(start, stop, tuple(a[_along(ax, start, stop)].copy() for a, ax in self._rows()),
                        tuple(a.copy() for a in self._state())
                        + tuple(a[_along(ax, 0, stop)].copy() for a, ax in self._state_rows()))

    def restore(self, snapshots: Sequence[Snapshot]) -> int:
        stop = check_consecutive(snapshots, self.n, self.n_ctx)
        self.reserve(stop)
        rows = self._rows()
        for s in snapshots:
            if len(s.rows) != len(rows):
                raise CacheError("a snapshot of a different kind of cache")
            for (dst, ax), part in zip(rows, s.rows):
                dst[_along(ax, s.start, s.stop)] = part
        if snapshots:
            state, srows = self._state(), self._state_rows()
            last = snapshots[-1].state
            if len(last) != len(state) + len(srows):
                raise CacheError("a snapshot of a different kind of cache")
            for dst, src in zip(state, last):
                dst[...] = src
            for (dst, ax), src in zip(srows, last[len(state):]):
                dst[_along(ax, 0, stop)] = src
        self.n = stop
        return stop


class RecurrentState(Cache):
    """A cache without per-token rows (a recurrent state): it can go back only to the start (0) or stay where it is.
    Subclasses set `n`, `n_ctx`, declare their arrays in `_state()` and make an empty one in `_empty()`."""

    @property
    def nbytes_per_token(self) -> int:
        return 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of the whole state (constant in the context length)."""
        return sum(a.nbytes for a in self._state())

    def _state(self) -> list[np.ndarray]:
        raise NotImplementedError

    def _empty(self) -> "RecurrentState":
        raise NotImplementedError

    def can_truncate(self, n: int) -> bool:
        return n in (0, self.n)

    def truncate(self, n: int) -> None:
        """Only n == 0 (start afresh) or n == self.n (keep everything) are possible."""
        if n == self.n:
            return
        if n != 0:
            raise CacheError(f"a recurrent state cannot go back to token {n} of {self.n} "
                             "(only to 0: re-run the prompt)")
        self.n = 0
        for a in self._state():
            a[...] = 0

    def fork(self, n: int | None = None, into: "RecurrentState | None" = None) -> "RecurrentState":
        """A copy of the state (n = self.n, the default) or an empty one (n = 0); `into`: an empty state to use."""
        n = self.n if n is None else n
        if not self.can_truncate(n):
            raise CacheError(f"a recurrent state cannot go back to token {n} of {self.n} (only to 0)")
        c = self._empty() if into is None else check_fork_target(self, into, n, _state_layout)
        for src, dst in zip(self._state(), c._state()):
            if n:
                dst[...] = src
            else:
                dst[...] = 0
        c.n = n
        return c

    def snapshot(self, start: int, stop: int) -> Snapshot:
        """The state as of the last position (stop must be self.n: earlier states are not kept)."""
        if not 0 <= start <= stop == self.n:
            raise CacheError(f"a recurrent state can be snapshotted only at its last position ({self.n}), "
                             f"not at {stop}")
        return Snapshot(start, stop, (), tuple(a.copy() for a in self._state()))

    def restore(self, snapshots: Sequence[Snapshot]) -> int:
        stop = check_consecutive(snapshots, self.n, self.n_ctx)
        if snapshots:
            state = self._state()
            if len(snapshots[-1].state) != len(state) or snapshots[-1].rows:
                raise CacheError("a snapshot of a different kind of cache")
            for dst, src in zip(state, snapshots[-1].state):
                dst[...] = src
        self.n = stop
        return stop
