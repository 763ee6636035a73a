"""Search over reasoning steps under a hard token budget: A*-decoding, best-of-N, particle filtering, greedy.

A state is the prompt plus the steps generated so far; a step ends at `step_delimiter` (default "\\n\\n")
or at an end-of-generation token (a goal state). Every strategy runs on one tree of states:

- **A\\*-decoding** (Chatziveroglou 2025): pop the state of least f = g + h from a priority queue, expand
  it into k sampled next steps, score each child with the PRM: h = 1 − r, g(child) = g(parent) +
  max(0, h(child) − h(parent)) (only increases of h are paid; the root has g = h = 0). The first goal
  state popped is the answer.
- **best-of-N**: N whole solutions sampled together; the answer is the PRM's best, or the majority final answer.
- **particle filtering** (Puri et al. 2025): N particles advance one step at a time, are weighted by
  softmax(logit(r) / T) and resampled with replacement; finished particles stay in the pool.
- **greedy**: one argmax continuation.

**Budgets are hard.** Every sampled token on every branch counts against `token_budget` and a token is
only sampled while the count is below it; PRM calls never exceed `prm_budget`. When a budget runs out
the best completed answer (else the best partial one) is returned with `budget_exhausted = True`.

**Prefix sharing.** A node's K/V rows are computed once: children continue from the parent's cache
(`KVCache.fork()`), and a node waiting in the frontier keeps only a snapshot of its own rows, from
which its cache is rebuilt by copying (not recomputing) when it is expanded. The last token of a step is
fed to the model only if that state is expanded. The trace counts every token the policy processes and
any position processed twice (`prefill_tokens_recomputed`, 0 by construction and checked by tests).
"""
from __future__ import annotations

import heapq
import itertools
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .errors import ArgumentError, ContextOverflowError, EdgeLLMError
from .prm import PRM, make_prm
from .sampling import Sampler, SamplerSettings
from .tasks import extract_answer

STRATEGIES = ("astar", "best-of-n", "particle", "greedy")


@dataclass
class SearchTrace:
    strategy: str
    token_budget: int
    prm_budget: int | None
    k: int
    prm: str
    seed: int | None
    states_expanded: int = 0
    tokens_generated: int = 0            # sampled tokens, all branches
    prm_calls: int = 0
    prm_tokens: int = 0                  # tokens a judge model ran for the PRM calls (0 for self / verifier)
    prompt_tokens: int = 0
    tokens_processed: int = 0            # tokens the policy ran (prompt + generated tokens fed back)
    prefill_tokens_recomputed: int = 0   # positions processed more than once (goal: 0)
    kv_rows_restored: int = 0            # K/V rows copied back from snapshots (copies, not compute)
    states_created: int = 0              # root excluded
    completed_states: int = 0            # of them, ending in EOS
    wall_seconds: float = 0.0
    budget_exhausted: bool = False
    stop_reason: str = ""                # goal, finished, token-budget, prm-budget, frontier-empty


@dataclass
class SearchResult:
    answer: str                          # the chosen solution's text
    steps: list[str]
    final_answer: object                 # number read from the answer ("The answer is N"), if any
    score: float | None                  # the PRM's score of the chosen state
    completed: bool                      # ended with EOS (else a partial answer)
    trace: SearchTrace
    nodes: list = field(default_factory=list, repr=False)  # every state of the tree (for tests, debugging)

    def as_dict(self) -> dict:
        d = {"answer": self.answer, "final_answer": self.final_answer, "completed": self.completed,
             "score": self.score, "steps": self.steps}
        d.update(asdict(self.trace))
        return d


class Node:
    """A state: its parent's state plus one step. The root's tokens are the prompt."""
    __slots__ = ("id", "parent", "depth", "pos0", "tokens", "logprobs", "text", "done", "cut", "nfed", "cache",
                 "seg", "logits", "r", "g", "h", "lp_sum", "lp_n", "cur")

    def __init__(self, id: int, parent: "Node | None", tokens=None):
        self.id, self.parent = id, parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.pos0 = 0 if parent is None else parent.pos0 + len(parent.tokens)
        self.tokens: list[int] = list(tokens or [])
        self.logprobs: list[float] = []
        self.text = ""
        self.done = False         # ended with an end-of-generation token: a goal state
        self.cut = None           # "budget" / "length": stopped before a step boundary
        self.nfed = 0             # own tokens whose K/V rows are computed
        self.cache = None         # a live cache holding pos0 + nfed tokens
        self.seg = []             # or snapshots of the own computed rows (Cache.snapshot)
        self.logits = None        # logits after all own tokens (once expanded)
        self.r = None             # PRM score
        self.g = self.h = 0.0
        self.lp_sum = 0.0 if parent is None else parent.lp_sum
        self.lp_n = 0 if parent is None else parent.lp_n
        self.cur = None           # logits for the next token while generating

    def path(self) -> list["Node"]:
        out, n = [], self
        while n is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    @property
    def expandable(self) -> bool:
        return not self.done and self.cut != "length"


def _logprob(logits: np.ndarray, tok: int) -> float:
    x = logits.astype(np.float64)
    m = x.max()
    return float(x[tok] - m - math.log(np.exp(x - m).sum()))


class Searcher:
    """One search over one prompt: the tree, the budgets and the accounting."""

    def __init__(self, engine, prompt: str, *, strategy: str, token_budget: int, prm, prm_budget: int | None,
                 k: int, step_delimiter: str | None, seed: int | None, temp: float, top_k: int, top_p: float,
                 min_p: float, max_step_tokens: int, max_answer_tokens: int, chat: bool, system: str | None,
                 select: str, particle_temp: float, task=None, stop: Sequence[str] = (),
                 reopen: float | None = None):
        if strategy not in STRATEGIES:
            raise ArgumentError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})", "strategy")
        if not isinstance(token_budget, (int, np.integer)) or token_budget < 0:
            raise ArgumentError(f"token_budget must be an integer >= 0 (got {token_budget!r})", "token_budget")
        if prm_budget is not None and (not isinstance(prm_budget, (int, np.integer)) or prm_budget < 0):
            raise ArgumentError(f"prm_budget must be an integer >= 0 (got {prm_budget!r})", "prm_budget")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ArgumentError(f"k must be an integer >= 1 (got {k!r})", "k")
        if step_delimiter is not None and not step_delimiter:
            raise ArgumentError("step_delimiter must not be empty", "step_delimiter")
        if max_step_tokens < 1 or max_answer_tokens < 1:
            raise ArgumentError("max_step_tokens and max_answer_tokens must be >= 1",
                                ("max_step_tokens", "max_answer_tokens"))
        if select not in ("prm", "vote"):
            raise ArgumentError(f"select must be 'prm' or 'vote' (got {select!r})", "select")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ArgumentError("the prompt is empty", "prompt")
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(x, str) or not x for x in stop):
            raise ArgumentError("stop strings must be non-empty strings", "stop")
        self.stop = stop
        if reopen is not None and not reopen > 0:
            raise ArgumentError(f"reopen must be > 0 (got {reopen})", "reopen")
        self.reopen = reopen
        if particle_temp <= 0:
            raise ArgumentError(f"particle_temp must be > 0 (got {particle_temp})", "particle_temp")
        self.engine, self.prompt, self.strategy = engine, prompt, strategy
        self.budget, self.prm_budget, self.k = int(token_budget), prm_budget, int(k)
        self.delim, self.select, self.particle_temp = step_delimiter, select, particle_temp
        self.max_step_tokens, self.max_answer_tokens = max_step_tokens, max_answer_tokens
        tok = engine.tokenizer
        self.tok = tok
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True)
        else:
            text = prompt
        self.prompt_ids = tok.encode(text, add_bos=None, parse_special=chat)
        if not self.prompt_ids:
            raise ArgumentError("the prompt encodes to no tokens", "prompt")
        if len(self.prompt_ids) + 2 > engine.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(self.prompt_ids)} tokens but the context holds "
                                       f"{engine.n_ctx} (a larger n_ctx holds it)", "n_ctx")
        self.cap = min(engine.n_ctx, len(self.prompt_ids) + min(self.budget, max_answer_tokens) + 2)
        greedy = strategy == "greedy"
        self.sampler = Sampler(SamplerSettings(temp=0.0 if greedy else temp, top_k=top_k, top_p=top_p,
                                               min_p=min_p, seed=seed))
        self.rng = np.random.default_rng(None if seed is None else seed + 7919)
        needs_prm = strategy in ("astar", "particle") or (strategy == "best-of-n" and select == "prm")
        self.prm = make_prm(prm, engine, task=task) if needs_prm else None
        self.trace = SearchTrace(strategy=strategy, token_budget=self.budget, prm_budget=prm_budget, k=self.k,
                                 prm=self.prm.name if self.prm else ("vote" if select == "vote" else "none"),
                                 seed=seed,
                                 prompt_tokens=len(self.prompt_ids))
        self._ids = itertools.count()
        self._computed: set[tuple[int, int]] = set()
        self.nodes: list[Node] = []
        self.root = Node(next(self._ids), None, self.prompt_ids)

    # ------------------------------------------------------------------ K/V bookkeeping
    def _mark(self, node: Node, j0: int, j1: int) -> None:
        """Own tokens j0..j1 of `node` were just run through the model."""
        for j in range(j0, j1):
            key = (node.id, j)
            if key in self._computed:
                self.trace.prefill_tokens_recomputed += 1
            self._computed.add(key)
        self.trace.tokens_processed += j1 - j0
        node.nfed = j1

    def _snapshot(self, node: Node, cache, a: int | None = None) -> None:
        """Keep only `node`'s own computed rows (from its own position a on) and let its live cache go."""
        a = node.pos0 if a is None else a
        node.seg.append(cache.snapshot(a, node.pos0 + node.nfed))
        node.cache = None

    def _restore(self, node: Node):
        """A cache holding the whole computed path of `node` (rebuilt from snapshots by copying)."""
        if node.cache is not None:
            return node.cache
        c = self.engine.new_cache(self.cap)
        self.trace.kv_rows_restored += c.restore([s for n in node.path() for s in n.seg])
        return c

    def _open(self, node: Node):
        """(cache, logits) after every token of `node`: feeds its still-pending tokens (normally the
        step's last one; the whole prompt for the root)."""
        if node.logits is not None and node.nfed == len(node.tokens):
            return self._restore(node), node.logits
        cache = self._restore(node) if (node.cache is not None or node.seg) else self.engine.new_cache(self.cap)
        j0 = node.nfed
        logits = self.engine.prefill(node.tokens[j0:], cache)
        self._mark(node, j0, len(node.tokens))
        node.logits = np.asarray(logits, dtype=np.float32)
        self._snapshot(node, cache, node.pos0 + j0)
        return cache, node.logits

    # ------------------------------------------------------------------ generation
    def _stop_at(self, node: Node) -> int | None:
        """Where the first stop string starts in `node`'s text (negative: it began in the text before), or
        None. Whitespace before any answer text does not count (a stop string must end something)."""
        text = self.tok.decode(node.tokens, special=False)
        prior = "".join(n.text for n in node.path()[1:-1])
        if prior.strip():
            span = max(len(x) for x in self.stop) - 1
            tail = prior[-span:] if span else ""
            start = 0
        else:
            tail = ""
            start = len(text) - len(text.lstrip())
            if start == len(text):
                return None
        full = tail + text
        hits = [i for i in (full.find(x, start) for x in self.stop) if i >= 0]
        return min(hits) - len(tail) if hits else None

    def _ends_step(self, node: Node, delim: str | None) -> bool:
        if delim is None:
            return False
        return delim in self.tok.decode(node.tokens, special=False).lstrip()

    def extend(self, requests: Sequence[tuple[Node, int]], delim: str | None) -> list[Node]:
        """Sample `count` next steps of each requested state, all advanced together (one batched decode
        per token position). Returns the new states (none that got no token)."""
        kids: list[Node] = []
        for node, count in requests:
            if count <= 0:
                continue
            cache, logits = self._open(node)
            for i in range(count):
                c = Node(next(self._ids), node)
                owned = node.cache is not cache  # a rebuilt cache may be handed to the last child
                c.cache = cache if (owned and i == count - 1) else cache.fork()
                c.cur = logits
                kids.append(c)
        tr, answer_cap = self.trace, self.max_answer_tokens
        step_cap = self.max_step_tokens if delim else answer_cap
        root_len = len(self.prompt_ids)
        active = list(kids)
        while active:
            room = self.budget - tr.tokens_generated
            if room < len(active):
                for c in active[max(room, 0):]:
                    c.cut = "budget"
                active = active[:max(room, 0)]
            feed = []
            for c in active:
                t = self.sampler(c.cur)
                c.tokens.append(t)
                lp = _logprob(c.cur, t)
                c.logprobs.append(lp)
                c.lp_sum += lp
                c.lp_n += 1
                tr.tokens_generated += 1
                if self.tok.is_eog(t):
                    c.done = True
                elif self.stop and self._stop_at(c) is not None:
                    c.done = True  # a stop string ends the answer, as EOS does
                elif self._ends_step(c, delim):
                    pass
                elif c.pos0 + len(c.tokens) - root_len >= answer_cap or c.cache.n + 2 > self.cap:
                    c.cut = "length"
                elif len(c.tokens) >= step_cap:
                    pass  # an over-long step ends here (not a goal)
                else:
                    feed.append(c)
            if feed:
                logits = self.engine.decode_batch([c.tokens[-1] for c in feed], [c.cache for c in feed])
                for c, row in zip(feed, logits):
                    self._mark(c, len(c.tokens) - 1, len(c.tokens))
                    c.cur = row
            active = feed
        out = []
        for c in kids:
            c.cur = None
            if not c.tokens:
                continue
            body = c.tokens[:-1] if c.done and self.tok.is_eog(c.tokens[-1]) else c.tokens
            c.text = self.tok.decode(body, special=False)
            at = self._stop_at(c) if c.done and self.stop else None
            if at is not None:
                c.text = c.text[:max(at, 0)]
            self._snapshot(c, c.cache)
            out.append(c)
            self.nodes.append(c)
            tr.states_created += 1
            tr.completed_states += int(c.done)
        return out

    # ------------------------------------------------------------------ scoring
    def steps_of(self, node: Node) -> list[str]:
        text = "".join(n.text for n in node.path()[1:])
        parts = text.split(self.delim) if self.delim else [text]
        return [p.strip() for p in parts if p.strip()]

    def answer_of(self, node: Node) -> str:
        return "".join(n.text for n in node.path()[1:]).strip()

    def prm_left(self) -> bool:
        return self.prm_budget is None or self.trace.prm_calls < self.prm_budget

    def score(self, node: Node) -> bool:
        """PRM score of a state (one call, if the PRM budget allows)."""
        if not self.prm_left():
            return False
        steps = self.steps_of(node)
        lps = [lp for n in node.path()[1:] for lp in n.logprobs]
        prm = self.prm
        self.trace.prm_calls += 1
        r = float(prm.score_state(self.prompt, steps, logprobs=lps, final=node.done))
        if not math.isfinite(r):
            raise EdgeLLMError(f"the PRM {prm.name!r} returned {r}")
        node.r = min(1.0, max(0.0, r))
        return True

    # ------------------------------------------------------------------ strategies
    def run(self) -> SearchResult:
        t0 = time.perf_counter()
        judge0 = self.prm.tokens_processed if self.prm else 0
        if self.budget > 0:
            {"astar": self._astar, "best-of-n": self._best_of_n, "particle": self._particle,
             "greedy": self._greedy}[self.strategy]()
        else:
            self.trace.budget_exhausted, self.trace.stop_reason = True, "token-budget"
            self.chosen = None
        self.trace.wall_seconds = time.perf_counter() - t0
        self.trace.prm_tokens = (self.prm.tokens_processed if self.prm else 0) - judge0
        n = self.chosen
        if n is None:
            return SearchResult("", [], None, None, False, self.trace, self.nodes)
        ans = self.answer_of(n)
        return SearchResult(ans, self.steps_of(n), extract_answer(ans), n.r, n.done, self.trace, self.nodes)

    def _exhausted(self, reason: str) -> None:
        self.trace.budget_exhausted, self.trace.stop_reason = True, reason

    def _budget_reason(self) -> str | None:
        if self.trace.tokens_generated >= self.budget:
            return "token-budget"
        if not self.prm_left():
            return "prm-budget"
        return None

    @staticmethod
    def _best(nodes: Sequence[Node]) -> Node | None:
        """The best completed state, else the best partial one: highest PRM score, then longest."""
        if not nodes:
            return None
        done = [n for n in nodes if n.done]
        pool = done or list(nodes)
        return max(pool, key=lambda n: (n.r is not None, n.r or 0.0, n.depth, len(n.tokens), -n.id))

    def _astar(self) -> None:
        """Best-first on f = g + h; the first goal popped wins. With `reopen` = c, an expanded state goes back
        into the queue at f + c·(times expanded), so that it can be sampled again (its successors are an
        unbounded set of which one expansion draws k) when everything else looks worse."""
        root = self.root
        heap = [(0.0, 0, root.id, root)]
        expanded: Counter = Counter()
        self.chosen = None
        while heap:
            f, _, _, node = heapq.heappop(heap)
            if node.done:
                self.chosen, self.trace.stop_reason = node, "goal"
                return
            if not node.expandable:
                continue
            reason = self._budget_reason()
            if reason:
                self._exhausted(reason)
                break
            kids = self.extend([(node, self.k)], self.delim)
            self.trace.states_expanded += 1
            expanded[node.id] += 1
            for c in kids:
                if not self.score(c):
                    continue
                c.h = 1.0 - c.r
                c.g = node.g + max(0.0, c.h - node.h)
                heapq.heappush(heap, (c.g + c.h, -c.depth, c.id, c))
            if self.reopen is not None and node.cut is None:
                heapq.heappush(heap, (node.g + node.h + self.reopen * expanded[node.id], -node.depth, node.id, node))
        else:
            self.trace.stop_reason = "frontier-empty"
        self.chosen = self._best(self.nodes)

    def _greedy(self) -> None:
        kids = self.extend([(self.root, 1)], None)
        self.trace.states_expanded = 1
        self.chosen = kids[0] if kids else None
        if self.chosen is not None and self.chosen.cut == "budget":
            self._exhausted("token-budget")
        else:
            self.trace.stop_reason = "finished"

    def _best_of_n(self) -> None:
        kids = self.extend([(self.root, self.k)], None)
        self.trace.states_expanded = 1
        if any(c.cut == "budget" for c in kids):
            self._exhausted("token-budget")
        else:
            self.trace.stop_reason = "finished"
        if self.select == "vote":
            done = [c for c in kids if c.done] or kids
            keys = [_answer_key(self.answer_of(c)) for c in done]
            counts = Counter(keys)
            top = max(counts.values(), default=0)
            self.chosen = next((c for c, key in zip(done, keys) if counts[key] == top), None)
            return
        order = sorted(kids, key=lambda c: (not c.done, c.id))  # completed answers are scored first
        for c in order:
            if not self.score(c):
                self._exhausted("prm-budget")
                break
        self.chosen = self._best(kids)

    def _particle(self) -> None:
        n = self.k
        parts = self.extend([(self.root, n)], self.delim)
        self.trace.states_expanded = 1
        for c in parts:
            self.score(c)
        while True:
            if not parts:
                break
            if not any(p.expandable for p in parts):
                self.trace.stop_reason = "finished"
                break
            if any(p.r is None for p in parts) and not self.prm_left():
                self._exhausted("prm-budget")
                break
            reason = self._budget_reason()
            if reason:
                self._exhausted(reason)
                break
            r = np.clip(np.array([p.r for p in parts], dtype=np.float64), 1e-4, 1 - 1e-4)
            z = np.log(r) - np.log1p(-r)
            w = np.exp((z - z.max()) / self.particle_temp)
            w /= w.sum()
            pick = self.rng.choice(len(parts), size=n, replace=True, p=w)
            keep, want = [], Counter()
            for i in sorted(pick):
                p = parts[i]
                if p.expandable:
                    want[p] += 1
                else:
                    keep.append(p)
            kids = self.extend(sorted(want.items(), key=lambda x: x[0].id), self.delim)
            self.trace.states_expanded += len(want)
            for c in kids:
                self.score(c)
            parts = keep + kids
        final = [p for p in parts if p.done]
        self.chosen = self._best(final) if final else self._best([p for p in self.nodes if p.done] or parts)


def _answer_key(text: str):
    a = extract_answer(text)
    if a is not None:
        return a
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def search(model, prompt: str, strategy: str = "astar", token_budget: int = 512, prm=None, k: int = 4,
           step_delimiter: str | None = "\n\n", prm_budget: int | None = None, seed: int | None = None,
           temp: float = 0.7, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
           max_step_tokens: int = 96, max_answer_tokens: int = 512, chat: bool = True, system: str | None = None,
           select: str = "prm", particle_temp: float = 1.0, task=None, stop: Sequence[str] = (),
           reopen: float | None = None) -> SearchResult:
    """Search for an answer to `prompt` with at most `token_budget` generated tokens (all branches).

    model: a backend (`Engine`, `OnnxEngine`), or a path / catalog name / None (the default model) to load.
    strategy: "astar", "best-of-n" (k samples; `select` "prm" or "vote"), "particle" (k particles), "greedy".
    prm: a PRM object or function `score(prompt, steps) -> [0, 1]`, or "self" (default), "verifier",
    "judge", or a model path / catalog name to load as judge.
    reopen: None (A* as defined: an expanded state is closed) or c > 0: an expanded state is queued again
    at f + c·(times expanded), so it can be sampled again when everything else looks worse.
    stop: strings that end an answer as EOS does (a goal state), e.g. "\n\n" after a few-shot prompt.
    Returns a `SearchResult` (answer, steps, final_answer, score, completed, trace)."""
    from .engine import load
    engine = load(model) if model is None or isinstance(model, (str, os.PathLike)) else model
    s = Searcher(engine, prompt, strategy=strategy, token_budget=token_budget, prm=prm, prm_budget=prm_budget,
                 k=k, step_delimiter=step_delimiter, seed=seed, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                 max_step_tokens=max_step_tokens, max_answer_tokens=max_answer_tokens, chat=chat, system=system,
                 select=select, particle_temp=particle_temp, task=task, stop=stop, reopen=reopen)
    return s.run()
