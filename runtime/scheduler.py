"""Continuous batching: one scheduler thread owns the engine and runs every request's sequences together.

Each turn of the loop, at a step boundary:
1. cancelled requests are dropped and their slots freed (a client that went away costs at most one more step);
2. waiting requests are admitted, first come first served, while `parallel` slots are free (a request takes one
   slot per choice, `n`); beyond the slots a bounded queue waits, and `submit` refuses past it (`QueueFullError`);
3. prompts are prefilled in turn, in pieces of `prefill_chunk` tokens counted from where each prompt's prefill
   starts: all of them while nothing is decoding, else whole pieces up to `prefill_chunk` tokens in all, so that
   running streams keep flowing while long prompts go in and short prompts arriving together start together. The
   pieces are the same under load as alone, so a request's answer does not depend on what else runs (the
   prefill's attention sums in an order that follows its shape). The prompt starts from the longest prefix the
   prefix cache holds (`prefix_cache.py`); `n > 1` choices fork the prefilled cache, so the prompt runs once;
4. every running sequence advances by one token in one `engine.decode_batch` call (one read of the weights).

A sequence's next token is chosen in one place, `Scheduler.select_token` (logits -> token, given the sequence's
sampler, history and, for structured output, its constraint's mask; the next mask is computed on a background
thread while `decode_batch` runs, and a choice whose structure is closed ends with "stop"). Finished sequences
give their cache to the prefix cache. Results go back through each request's `emit` callback (called on the
scheduler thread) as `Delta`, `ChoiceEnd`, `RequestEnd` or `RequestError` events; the HTTP layer (server.py) only
translates them.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import numpy as np

from ..kernels.ops import top_k_ids
from .engine import set_threads
from .errors import ConstraintError, EdgeLLMError
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplerSettings, log_softmax

log = logging.getLogger("edgellm.scheduler")

PREFILL_CHUNK = 128  # prompt tokens per step while other sequences are decoding


class QueueFullError(EdgeLLMError):
    """Every slot is busy and the waiting queue is full."""


class SchedulerStoppedError(EdgeLLMError):
    """The scheduler is not running (shutting down)."""


# ---------------------------------------------------------------------------------------------- what goes in
@dataclass(frozen=True)
class GenParams:
    """How to generate one request's choices."""
    max_tokens: int
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None          # None: none; k >= 0: the sampled token's logprob and the k most likely
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0        # OpenAI's: over the generated tokens only
    frequency_penalty: float = 0.0
    cache_prompt: bool = True            # llama.cpp's: reuse (and keep) caches through the prefix cache
    constraint: object = None            # a compiled constraints.Constraint: each choice samples from a fork of it

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if self.n < 1:
            raise ValueError(f"n must be >= 1 (got {self.n})")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (got {self.logprobs})")


# ---------------------------------------------------------------------------------------------- what comes out
@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens with their logprobs, most likely first


@dataclass
class Delta:
    """New text of choice `index` (may be empty when only logprobs come), with the logprobs of its tokens."""
    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class ChoiceEnd:
    index: int
    finish_reason: str  # "stop" (end-of-generation token or a stop string) or "length"


@dataclass
class RequestEnd:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class RequestError:
    message: str


_ids = itertools.count(1)


class Request:
    """One prompt with its choices. `emit` receives the events (on the scheduler thread: keep it quick).
    `index0` numbers the choices index0, index0 + 1, ... (several prompts of one HTTP request)."""

    def __init__(self, prompt: Seq[int], params: GenParams, emit: Callable[[object], None], index0: int = 0):
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        self.id = next(_ids)
        self.prompt = [int(t) for t in prompt]
        self.params, self.emit, self.index0 = params, emit, index0
        self.cancelled = False
        self.finished = False
        self.cache = None           # while prefilling
        self.pos = 0                # prompt tokens in self.cache
        self.cached_tokens = 0      # of them, reused from the prefix cache
        self.completion_tokens = 0
        self.open = 0               # choices still running
        self.prefill_tokens = 0     # prompt tokens run through the model


class Sequence:
    """One choice being generated: its cache, its tokens (prompt + generated; the last one not yet in the cache
    while `next_token` is set), its sampler and its text state."""
    __slots__ = ("req", "index", "cache", "tokens", "sampler", "decoder", "pending", "n_gen", "next_token",
                 "counts", "infos", "constraint")

    def __init__(self, req: Request, index: int, cache, sampler: Sampler, decoder):
        self.req, self.index, self.cache, self.sampler, self.decoder = req, index, cache, sampler, decoder
        c = req.params.constraint
        self.constraint = c.fork() if c is not None else None  # this choice's grammar state (structured output)
        self.tokens = list(req.prompt)
        self.pending = ""           # text held back: it could be the start of a stop string
        self.n_gen = 0
        self.next_token: int | None = None
        self.counts: dict[int, int] = {}   # generated token -> times (presence / frequency penalties)
        self.infos: list[TokenLogprob] = []  # logprobs of tokens whose text is still held back


def _settings_for_choice(s: SamplerSettings, i: int) -> SamplerSettings:
    """Choice i of a seeded request draws from seed + i (choice 0 reproduces n = 1 with the same seed)."""
    if s.seed is None or i == 0:
        return s
    return SamplerSettings(temp=s.temp, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, repeat_penalty=s.repeat_penalty,
                           repeat_last_n=s.repeat_last_n, seed=(s.seed + i) % 2**64)


class Scheduler:
    """Owns `engine` on its own thread (start() / stop()); see the module docstring."""

    def __init__(self, engine, parallel: int = 4, max_queue: int = 16, cache_bytes: int | None = 1 << 30,
                 prefill_chunk: int = PREFILL_CHUNK):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1 (got {parallel})")
        if max_queue < 0:
            raise ValueError(f"the queue size must be >= 0 (got {max_queue})")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (got {prefill_chunk})")
        self.engine, self.parallel, self.max_queue, self.prefill_chunk = engine, parallel, max_queue, prefill_chunk
        self.tokenizer = engine.tokenizer
        self.prefix = PrefixCache(cache_bytes, on_drop=self._recycle)
        self._spares: list = []          # emptied caches whose memory the next new cache or copy reuses
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._prefilling: deque[Request] = deque()
        self._running: list[Sequence] = []
        self._busy = 0                   # slots taken (choices admitted and not finished)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "rejected": 0,
                         "prompt_tokens": 0, "prefill_tokens": 0, "generated_tokens": 0, "decode_steps": 0,
                         "decode_rows": 0}

    # ------------------------------------------------------------------ the other threads' side
    def start(self) -> "Scheduler":
        """Run the scheduler on a thread of its own (see `run` for running it on the calling thread)."""
        self._thread = threading.Thread(target=self._run, name="edgellm-scheduler", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the scheduler on the calling thread until `stop` (from another thread). `edgellm serve` runs it on
        the thread that loaded the model, which then runs all its kernels: GNU OpenMP gives each thread that starts
        parallel regions a team of its own, and with more threads in teams than cores its idle workers stop
        spinning between regions, so that every region waits for a woken thread (measured on 2 cores, SmolLM2: a
        decode step on a second thread 3.9 -> 10-13 ms once the main thread had run one)."""
        self._thread = threading.current_thread()
        self._run()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread() \
                and self._thread is not threading.main_thread():  # (`run` on the main thread: it returns by itself)
            self._thread.join(timeout)

    def submit(self, req: Request) -> None:
        """Queue a request (before start() too: it runs once started); raises QueueFullError when the queue is
        full, ValueError when it can never run."""
        if req.params.n > self.parallel:
            raise ValueError(f"n = {req.params.n} choices need more than the server's {self.parallel} slots")
        with self._cond:
            if self._stop:
                raise SchedulerStoppedError("the scheduler has stopped")
            if len(self._waiting) >= self.max_queue and not self._fits_now(req):
                self.counters["rejected"] += 1
                raise QueueFullError(f"all {self.parallel} slots are busy and {len(self._waiting)} requests are "
                                     "waiting; try again later")
            self.counters["requests"] += 1
            self._waiting.append(req)
            self._cond.notify_all()

    def _fits_now(self, req: Request) -> bool:
        return not self._waiting and self._busy + req.params.n <= self.parallel

    def cancel(self, req: Request) -> None:
        """Stop a request (its client went away): its slots are free at the next step boundary."""
        if not req.finished:
            req.cancelled = True
            with self._cond:
                self._cond.notify_all()

    def status(self) -> dict:
        with self._cond:
            return {"slots_total": self.parallel, "slots_busy": self._busy, "waiting": len(self._waiting),
                    "max_queue": self.max_queue, "prefilling": len(self._prefilling), "decoding": len(self._running),
                    "running": bool(self._thread and self._thread.is_alive()) and not self._stop,
                    "prefix_cache": self.prefix.stats(), "spare_caches": len(self._spares), **self.counters}

    # ------------------------------------------------------------------ the scheduler thread
    def _run(self) -> None:
        set_threads(self.engine.threads)  # Numba's thread count is per calling thread
        while True:
            with self._cond:
                while not self._stop and not (self._waiting or self._prefilling or self._running):
                    self._cond.wait()
                if self._stop:
                    break
                self._drop_cancelled_waiting()
                while self._waiting and self._busy + self._waiting[0].params.n <= self.parallel:
                    req = self._waiting.popleft()
                    self._busy += req.params.n
                    self._prefilling.append(req)
            try:
                self._reap_cancelled()
                budget = self.prefill_chunk
                while self._prefilling:
                    limit = budget if self._running else None
                    took = self._prefill_step(limit)
                    if took is None:  # the next piece waits for the next step
                        break
                    if limit is not None:
                        budget -= took
                if self._running:
                    self._decode_step()
            except Exception as e:  # noqa: BLE001 - a fault must not take the server down: fail those involved
                log.exception("scheduler step failed")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", waiting_too=True)

    def _drop_cancelled_waiting(self) -> None:
        keep = deque(r for r in self._waiting if not r.cancelled)
        for r in self._waiting:
            if r.cancelled:
                self._close(r, cancelled=True)
        self._waiting = keep

    def _reap_cancelled(self) -> None:
        for req in [r for r in self._prefilling if r.cancelled]:
            self._prefilling.remove(req)
            self._release_slots(req.params.n)
            if req.cache is not None:
                self._recycle(req.cache)
                req.cache = None
            self._close(req, cancelled=True)
        for seq in [s for s in self._running if s.req.cancelled]:
            self._end_sequence(seq, None)

    def _release_slots(self, n: int) -> None:
        with self._cond:
            self._busy -= n

    # ------------------------------------------------------------------ prefill
    def _prefill_step(self, budget: int | None) -> int | None:
        """Prefill the next piece (`prefill_chunk` tokens or the rest) of the first prompt waiting, if it fits in
        `budget` (None: no limit); -> the tokens it took, or None when it did not fit."""
        req = self._prefilling[0]
        eng = self.engine
        try:
            if req.cache is None:
                cache, k = self.prefix.lookup(req.prompt, self._copy) if req.params.cache_prompt else (None, 0)
                req.cache = cache if cache is not None else self._new_cache()
                req.pos = req.cached_tokens = k
                self._trim_spares()
            step = min(len(req.prompt) - req.pos, self.prefill_chunk)
            if budget is not None and step > budget:
                return None
            logits = eng.prefill(req.prompt[req.pos:req.pos + step], req.cache)
        except Exception as e:  # noqa: BLE001 - this request's fault (e.g. context), not the server's
            self._prefilling.popleft()
            self._release_slots(req.params.n)
            self._fail(req, e)
            return 0
        req.pos += step
        req.prefill_tokens += step
        self.counters["prefill_tokens"] += step
        if req.pos < len(req.prompt):
            return step
        self._prefilling.popleft()
        self.counters["prompt_tokens"] += len(req.prompt)
        n = req.params.n
        caches = [req.cache] + [self._copy(req.cache) for _ in range(n - 1)]
        req.cache = None
        req.open = n
        for i, cache in enumerate(caches):
            seq = Sequence(req, req.index0 + i, cache, Sampler(_settings_for_choice(req.params.settings, i)),
                           self.tokenizer.stream_decoder())
            self._running.append(seq)
            self._advance(seq, logits)
        return step

    # ------------------------------------------------------------------ cache memory
    # A new cache's memory is zeroed by the kernel page by page as it is first written, and a dim-major cache touches
    # a page per row on its first token (SmolLM2: 11,520 rows, 2,880 pages at 256 positions). So the
    # caches the scheduler lets go (ended sequences not kept, prefix entries dropped) are emptied (`truncate(0)`) and
    # kept as spares for the next new cache or copy (`fork(n, into=spare)`: the cache contract, nothing more), as long
    # as the caches held by requests plus the spares stay within `parallel`: memory stays bounded by `parallel`
    # contexts plus the prefix cache's bytes.
    def _held(self) -> int:
        return len(self._running) + sum(r.cache is not None for r in self._prefilling)

    def _recycle(self, cache) -> None:
        if self._held() + len(self._spares) < self.parallel and cache.can_truncate(0):
            cache.truncate(0)
            self._spares.append(cache)

    def _trim_spares(self) -> None:
        del self._spares[max(0, self.parallel - self._held()):]

    def _new_cache(self):
        return self._spares.pop() if self._spares else self.engine.new_cache()

    def _copy(self, cache, n: int | None = None):
        # an independent copy of `cache`'s first n tokens (default: all), into a spare when there is one
        return cache.fork(n, into=self._spares.pop() if self._spares else None)

    # ------------------------------------------------------------------ decode
    def _decode_step(self) -> None:
        seqs = list(self._running)
        logits = self.engine.decode_batch([s.next_token for s in seqs], [s.cache for s in seqs])
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(seqs)
        for seq, row in zip(seqs, logits):
            if seq.cache is not None:  # not ended meanwhile (a failed constraint ends its request's choices)
                self._advance(seq, row)

    def select_token(self, seq: Sequence, logits: np.ndarray) -> tuple[int, TokenLogprob | None]:
        """The next token of `seq` from its logits (n_vocab,): logit bias and presence / frequency penalties, then
        the sequence's sampler (repetition penalty over its tokens, top-k / top-p / min-p, temperature, draw).
        Logprobs, when asked for, are the model's own distribution (before bias, penalties and temperature)."""
        p = seq.req.params
        x = logits
        if p.logit_bias or (seq.counts and (p.presence_penalty or p.frequency_penalty)):
            x = np.array(logits, dtype=np.float32)
            for tok, bias in p.logit_bias:
                x[tok] += bias
            if seq.counts and (p.presence_penalty or p.frequency_penalty):
                ids = np.fromiter(seq.counts.keys(), dtype=np.int64, count=len(seq.counts))
                cnt = np.fromiter(seq.counts.values(), dtype=np.float32, count=len(seq.counts))
                x[ids] -= p.frequency_penalty * cnt + p.presence_penalty
        tok = seq.sampler(x, seq.tokens, seq.constraint.allowed() if seq.constraint is not None else None)
        info = None
        if p.logprobs is not None:
            lp = log_softmax(np.asarray(logits))
            top: list[tuple[int, float]] = []
            if p.logprobs > 0:
                k = min(p.logprobs, len(lp))
                top = [(int(i), float(lp[i])) for i in top_k_ids(lp, k)]
            info = TokenLogprob(tok, float(lp[tok]), top)
        return tok, info

    def _advance(self, seq: Sequence, logits: np.ndarray) -> None:
        """Choose seq's next token from `logits`, emit its text, and finish the sequence or queue the token."""
        try:
            tok, info = self.select_token(seq, logits)
            if seq.constraint is not None:
                seq.constraint.advance(tok)
        except ConstraintError as e:  # a grammar that hit llguidance's limits: this request fails, not the batch
            self._fail(seq.req, e)
            for s in [s for s in self._running if s.req is seq.req]:
                self._end_sequence(s, None)
            return
        req, p = seq.req, seq.req.params
        seq.n_gen += 1
        req.completion_tokens += 1
        self.counters["generated_tokens"] += 1
        seq.next_token = None
        if self.tokenizer.is_eog(tok):
            self._end_sequence(seq, "stop")
            return
        seq.counts[tok] = seq.counts.get(tok, 0) + 1
        if info is not None:
            seq.infos.append(info)
        seq.pending += seq.decoder.push(tok)
        hits = [i for i in (seq.pending.find(s) for s in p.stop) if i >= 0]
        if hits:
            seq.pending = seq.pending[:min(hits)]
            self._end_sequence(seq, "stop", flush=False)
            return
        # release all but the last (longest stop string - 1) characters, with the logprobs of the tokens so far
        cut = len(seq.pending) - max((len(s) - 1 for s in p.stop), default=0)
        if cut > 0:
            text, seq.pending = seq.pending[:cut], seq.pending[cut:]
            self._emit_delta(seq, text)
        if seq.constraint is not None and seq.constraint.is_finished:  # the structure is closed: nothing can follow
            self._end_sequence(seq, "stop")
            return
        if seq.n_gen >= p.max_tokens or seq.cache.n >= seq.cache.n_ctx:
            self._end_sequence(seq, "length")
            return
        seq.tokens.append(tok)
        seq.next_token = tok
        if seq.constraint is not None:
            seq.constraint.prefetch()  # the next mask is computed while decode_batch runs

    def _emit_delta(self, seq: Sequence, text: str) -> None:
        infos, seq.infos = seq.infos, []
        seq.req.emit(Delta(seq.index, text, infos if seq.req.params.logprobs is not None else None))

    def _end_sequence(self, seq: Sequence, reason: str | None, flush: bool = True) -> None:
        """Finish a sequence (reason None: cancelled): last text, its end event, its slot, its cache."""
        req = seq.req
        self._running.remove(seq)
        self._release_slots(1)
        if reason is not None:
            if flush:
                seq.pending += seq.decoder.flush()
            if seq.pending or seq.infos:
                self._emit_delta(seq, seq.pending)
                seq.pending = ""
            req.emit(ChoiceEnd(seq.index, reason))
        # the cache holds seq.tokens minus a sampled token not fed yet
        if not (req.params.cache_prompt and self.prefix.insert(seq.tokens[:seq.cache.n], seq.cache)):
            self._recycle(seq.cache)
        seq.cache = None
        req.open -= 1
        if req.open == 0:
            self._close(req, cancelled=req.cancelled)

    def _close(self, req: Request, cancelled: bool) -> None:
        if req.finished:
            return
        req.finished = True
        if cancelled:
            self.counters["cancelled"] += 1
            req.emit(RequestError("the request was cancelled"))
            return
        self.counters["completed"] += 1
        req.emit(RequestEnd(len(req.prompt), req.cached_tokens, req.completion_tokens))

    def _fail(self, req: Request, e: BaseException) -> None:
        if req.finished:
            return
        req.finished = True
        self.counters["failed"] += 1
        msg = str(e) if isinstance(e, (EdgeLLMError, ValueError)) else f"internal error: {type(e).__name__}: {e}"
        log.warning("request %d failed: %s", req.id, msg)
        req.emit(RequestError(msg))

    def _fail_all(self, message: str, waiting_too: bool = False) -> None:
        """After a fault in a batched step (or at shutdown): end every admitted request with an error."""
        err = EdgeLLMError(message)
        reqs = {s.req.id: s.req for s in self._running}
        reqs.update({r.id: r for r in self._prefilling})
        self._running.clear()
        self._prefilling.clear()
        with self._cond:
            self._busy = 0
            if waiting_too:
                reqs.update({r.id: r for r in self._waiting})
                self._waiting.clear()
        for r in reqs.values():
            self._fail(r, err)
