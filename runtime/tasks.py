"""A seeded suite of small reasoning tasks with exact answers and a step verifier, for search.

Three families, generated from a seed (no data files): multi-step arithmetic ("What is (3 + 4) * 5?"),
unit conversions ("Convert 2 hours and 15 minutes to minutes.") and list manipulations ("What is the sum
of the list [4, 7, 2]?"). Every answer is an integer. Each task also carries the intermediate values a
correct solution passes through (`values`), which the step verifier uses to tell a true-but-useless
equation from one on the way to the answer.

The verifier reads equations a step writes (`12 + 7 = 19`, `2 * 60 = 120`), checks their arithmetic
exactly, and checks a claimed final answer ("The answer is 14") against the task's exact answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import numpy as np

INSTRUCTION = "Solve the problem. Write one calculation per line, then the answer."
EXAMPLES = {  # one worked example per kind, in the format the verifier reads (one equation per line)
    "arith": ("What is (6 + 2) * 3?", "6 + 2 = 8\n8 * 3 = 24\nThe answer is 24."),
    "units": ("One meter has 100 centimeters. How many centimeters are in 4 meters and 7 centimeters?",
              "4 * 100 = 400\n400 + 7 = 407\nThe answer is 407."),
    "list": ("What is the sum of the list [4, 1, 6]?", "4 + 1 = 5\n5 + 6 = 11\nThe answer is 11."),
}
STEP_DELIMITER = "\n"  # the suite's solutions are one calculation per line
# How the suite is meant to be searched: the prompt is a few-shot completion (no chat template: the
# 135M model follows the worked example far better that way), a step is a line, and the blank line
# after the answer ends it (the model would go on to invent the next problem).
SEARCH_SETTINGS = {"chat": False, "step_delimiter": STEP_DELIMITER, "stop": ("\n\n",)}


@dataclass(frozen=True)
class Task:
    id: str                  # "arith-3", "units-0", "list-7"
    kind: str                # "arith", "units", "list"
    question: str
    answer: int
    values: tuple = field(default=())   # intermediate values of correct solutions (the answer included)

    @property
    def prompt(self) -> str:
        """What the policy model continues: the instruction, a worked example, the problem (SEARCH_SETTINGS)."""
        q, a = EXAMPLES[self.kind]
        return f"{INSTRUCTION}\n\nExample:\nProblem: {q}\n{a}\n\nProblem: {self.question}\n"

    def check(self, text: str) -> bool:
        """Is the final answer in `text` exactly right?"""
        a = extract_answer(text)
        return a is not None and a == self.answer


# ----------------------------------------------------------------------------------- generation
_UNITS = [  # (big unit, its singular, small unit, factor)
    ("hours", "hour", "minutes", 60), ("minutes", "minute", "seconds", 60), ("meters", "meter", "centimeters", 100),
    ("kilograms", "kilogram", "grams", 1000), ("feet", "foot", "inches", 12), ("dollars", "dollar", "cents", 100),
    ("weeks", "week", "days", 7), ("days", "day", "hours", 24), ("kilometers", "kilometer", "meters", 1000),
]


def _arith(rng, i: int) -> Task:
    r = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
    form = i % 4
    if form == 0:
        a, b, c = r(2, 9), r(2, 9), r(1, 5)
        q, ans, vals = f"What is {a} + {b} - {c}?", a + b - c, (a + b, a - c, b - c)
    elif form == 1:
        a, b, c = r(1, 6), r(1, 6), r(2, 4)
        q, ans, vals = f"What is ({a} + {b}) * {c}?", (a + b) * c, (a + b,)
    elif form == 2:
        a, b, c = r(2, 5), r(2, 5), r(1, 9)
        q, ans, vals = f"What is {a} * {b} + {c}?", a * b + c, (a * b,)
    else:
        a, b, c = r(6, 12), r(1, 5), r(2, 4)
        q, ans, vals = f"What is ({a} - {b}) * {c}?", (a - b) * c, (a - b,)
    return Task(f"arith-{i}", "arith", q, ans, tuple(sorted(set(vals) | {ans})))


def _units(rng, i: int) -> Task:
    big, one, small, f = _UNITS[int(rng.integers(len(_UNITS)))]
    x = int(rng.integers(2, 6))
    head = f"One {one} has {f} {small}."
    if i % 2 == 0:
        q, ans, vals = f"{head} How many {small} are in {x} {big}?", x * f, (x * f,)
    else:
        y = int(rng.integers(1, min(f, 10)))
        if (big, x, y) == ("meters", 4, 7):  # the worked example's own question
            y = 8
        q, ans, vals = f"{head} How many {small} are in {x} {big} and {y} {small}?", x * f + y, (x * f,)
    return Task(f"units-{i}", "units", q, ans, tuple(sorted(set(vals) | {ans})))


def _list(rng, i: int) -> Task:
    n = int(rng.integers(3, 5))
    xs = [int(v) for v in rng.integers(1, 10, n)]
    form = i % 3
    if form == 0:
        q, ans = f"What is the sum of the list {xs}?", sum(xs)
        vals = tuple(int(v) for v in np.cumsum(xs)[1:])
    elif form == 1:
        q, ans, vals = f"What is the largest number in {xs} minus the smallest?", max(xs) - min(xs), (max(xs), min(xs))
    else:
        q, ans, vals = f"What is the first number of {xs} plus the last one?", xs[0] + xs[-1], (xs[0], xs[-1])
    return Task(f"list-{i}", "list", q, ans, tuple(sorted(set(vals) | {ans})))


_KINDS = {"arith": _arith, "units": _units, "list": _list}


def make_suite(n: int = 30, seed: int = 0, kinds=("arith", "units", "list")) -> list[Task]:
    """`n` tasks, the kinds taking turns; the same (n, seed) always gives the same tasks."""
    rng = np.random.default_rng(seed)
    counts = {k: 0 for k in kinds}
    out = []
    for j in range(n):
        k = kinds[j % len(kinds)]
        out.append(_KINDS[k](rng, counts[k]))
        counts[k] += 1
    return out


@lru_cache(maxsize=4)
def _default_suite(n: int = 300, seed: int = 0) -> tuple:
    return tuple(make_suite(n, seed))


def get_task(task_id: str, n: int = 300, seed: int = 0) -> Task:
    """A task of the default suite by id ("arith-3")."""
    for t in _default_suite(n, seed):
        if t.id == task_id:
            return t
    raise KeyError(task_id)


def find_task(prompt: str, suite: list[Task] | None = None) -> Task | None:
    """The suite task whose question ends `prompt` (so `--prm verifier` knows the answer)."""
    p = prompt.rstrip()
    for t in suite if suite is not None else _default_suite():
        if p.endswith(t.question):
            return t
    return None


# ----------------------------------------------------------------------------------- reading answers
_NUM = r"-?\d+(?:\.\d+)?"
_ANSWER_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*\**\s*\$?\s*(" + _NUM + r")", re.I)
_LAST_NUM_RE = re.compile(_NUM)


def _clean(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000


def _to_num(s: str):
    v = Fraction(s)
    return int(v) if v.denominator == 1 else float(v)


def extract_answer(text: str):
    """The final answer of a solution: the number after the first "answer is" (a small model may go on
    to invent and answer a problem of its own), else the last number."""
    text = _clean(text)
    m = _ANSWER_RE.findall(text)
    if m:
        return _to_num(m[0])
    m = _LAST_NUM_RE.findall(text)
    return _to_num(m[-1]) if m else None


def claimed_answer(text: str):
    """The number after "answer is" in `text`, or None when the text claims no final answer."""
    m = _ANSWER_RE.findall(_clean(text))
    return _to_num(m[-1]) if m else None


# ----------------------------------------------------------------------------------- equations
_OP = r"[-+*/×x÷]"
_OPERAND = r"\(?\s*" + _NUM + r"\s*\)?"
_EXPR = _OPERAND + r"(?:\s*" + _OP + r"\s*" + _OPERAND + r")*"
_CHAIN_RE = re.compile(r"(" + _EXPR + r")((?:\s*=\s*" + _EXPR + r")+)(?![\d.]*\d)")


def _eval(expr: str) -> Fraction:
    """Exact value of an expression of numbers, + - * / and parentheses (a small recursive-descent parser)."""
    toks = re.findall(r"\d+(?:\.\d+)?|[-+*/()]", expr.replace("×", "*").replace("x", "*").replace("÷", "/"))
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def atom():
        t = take()
        if t == "(":
            v = add()
            if take() != ")":
                raise ValueError("unbalanced")
            return v
        if t == "-":
            return -atom()
        return Fraction(t)

    def mul():
        v = atom()
        while peek() in ("*", "/"):
            op, w = take(), atom()
            v = v * w if op == "*" else v / w
        return v

    def add():
        v = mul()
        while peek() in ("+", "-"):
            op, w = take(), mul()
            v = v + w if op == "+" else v - w
        return v

    v = add()
    if pos != len(toks):
        raise ValueError("trailing tokens")
    return v


def _balanced(expr: str) -> str:
    expr = expr.strip()
    while expr.count("(") > expr.count(")") and expr.startswith("("):
        expr = expr[1:].strip()
    while expr.count(")") > expr.count("(") and expr.endswith(")"):
        expr = expr[:-1].strip()
    return expr


def equations(text: str) -> list[tuple[str, Fraction, bool]]:
    """The equations written in `text`, chains included (`18 + 14 - 5 = 32 - 5 = 27`): one
    (left side, value claimed, arithmetic is right) per `=`; a side that is only a number is the claim."""
    out = []
    for m in _CHAIN_RE.finditer(_clean(text)):
        sides = [_balanced(x) for x in [m.group(1)] + m.group(2).split("=")[1:]]
        try:
            vals = [_eval(x) for x in sides]
        except (ValueError, ZeroDivisionError, IndexError, TypeError):
            continue
        if all(re.fullmatch(_NUM, x) for x in sides):
            continue  # "3 = 3": nothing computed
        for i in range(1, len(sides)):
            out.append((sides[i - 1], vals[i], vals[i - 1] == vals[i]))
    return out


def verify_step(step: str, task: Task | None = None) -> float | None:
    """A score in [0, 1] for one step, or None if it says nothing checkable.

    0 if any equation is wrong or a claimed final answer is wrong; 1 if its equations are right and
    one of them lands on a value a correct solution passes through (or the claimed answer is right);
    0.6 for right arithmetic that goes nowhere known; without a task, right arithmetic scores 1."""
    eqs = equations(step)
    claim = claimed_answer(step)
    if any(not ok for _, _, ok in eqs):
        return 0.0
    if task is not None and claim is not None:
        return 1.0 if claim == task.answer else 0.0
    if not eqs:
        return None
    if task is None:
        return 1.0
    return 1.0 if any(v in task.values for _, v, _ in eqs) else 0.6


def verify_solution(steps: list[str], task: Task | None = None, final: bool = False) -> float:
    """Score a state: the lowest score of its checkable steps (0.5 if none is checkable). A final state
    of a known task scores 0 unless its final answer is exactly right."""
    scores = [s for s in (verify_step(st, task) for st in steps) if s is not None]
    r = min(scores) if scores else 0.5
    if final and task is not None:
        ans = extract_answer("\n\n".join(steps))
        if ans is None or ans != task.answer:
            return 0.0
        return 1.0 if r > 0 else 0.8  # a right answer reached through a wrong step is worth less
    return r
