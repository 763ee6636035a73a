"""Accuracy against token budget for A*-decoding, best-of-N, particle filtering and greedy on the seeded
task suite (runtime/tasks.py), every strategy under the same hard budget and the same accounting.

    python -m edgellm.bench.search [--model M] [--tasks 12] [--budgets 64,128,256] [--prm verifier]
        [-k 4] [--strategies greedy,best-of-n,particle,astar[,astar+reopen,best-of-n+vote]] [--bon-len 40]
        [--seed 0] [--threads N] [--json out.json] [--plot out.png]

Per budget B: astar expands k children per state; best-of-n samples N = max(1, B // bon_len) whole
answers (so it can spend its budget) and keeps the PRM's best; particle runs k particles; greedy is one
argmax answer. The table gives accuracy, mean tokens generated, mean PRM calls, mean wall time and how
often the budget ran out; the summary says whether A* reached best-of-N's best accuracy with at most half
of its tokens (the issue's goal; the paper reports up to a third).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

STRATS = ("greedy", "best-of-n", "particle", "astar")
VARIANTS = {  # bench name -> (strategy, extra search arguments)
    "greedy": ("greedy", {}), "best-of-n": ("best-of-n", {}), "best-of-n+vote": ("best-of-n", {"select": "vote"}),
    "particle": ("particle", {}), "astar": ("astar", {}), "astar+reopen": ("astar", {"reopen": 1.0}),
}


def run(engine, suite, budgets, strategies=STRATS, prm="verifier", k=4, bon_len=40, seed=0, temp=0.7,
        max_step_tokens=48, settings=None, progress=None) -> list[dict]:
    """One row per (strategy, budget): accuracy and mean cost over `suite` (searched with the suite's
    settings: few-shot prompt, one line per step, a blank line ends the answer)."""
    from ..runtime.search import search
    from ..runtime.tasks import SEARCH_SETTINGS
    settings = dict(SEARCH_SETTINGS, **(settings or {}))
    rows = []
    for name in strategies:
        if name not in VARIANTS:
            raise SystemExit(f"unknown strategy {name!r} (choose from {', '.join(VARIANTS)})")
        strategy, extra = VARIANTS[name]
        for B in budgets:
            n = max(1, B // bon_len) if strategy == "best-of-n" else k
            acc = tok = calls = wall = exh = 0.0
            per_task = []
            for i, t in enumerate(suite):
                r = search(engine, t.prompt, strategy=strategy, token_budget=B, prm=prm, k=n, seed=seed + i, temp=temp,
                           max_step_tokens=max_step_tokens, task=t, **settings, **extra)
                ok = t.check(r.answer) and r.completed
                tr = r.trace
                assert tr.tokens_generated <= B and tr.prefill_tokens_recomputed == 0
                acc += ok
                tok += tr.tokens_generated
                calls += tr.prm_calls
                wall += tr.wall_seconds
                exh += tr.budget_exhausted
                per_task.append({"task": t.id, "correct": bool(ok), "answer": r.final_answer,
                                 "tokens": tr.tokens_generated, "prm_calls": tr.prm_calls,
                                 "states_expanded": tr.states_expanded, "exhausted": tr.budget_exhausted})
                if progress:
                    progress(f"{name} B={B} {t.id}: {'ok' if ok else '--'} {tr.tokens_generated} tok "
                             f"{tr.prm_calls} prm {tr.wall_seconds:.1f}s")
            m = len(suite)
            rows.append({"strategy": name, "budget": B, "n": 1 if strategy == "greedy" else n,
                         "accuracy": acc / m, "tokens": tok / m, "prm_calls": calls / m, "seconds": wall / m,
                         "exhausted": exh / m, "tasks": per_task})
    return rows


def goal(rows) -> dict:
    """Did A* reach best-of-N's best accuracy with <= 1/2 of its tokens?"""
    bon = [r for r in rows if r["strategy"] == "best-of-n"]
    ast = [r for r in rows if r["strategy"] == "astar"]
    if not bon or not ast:
        return {}
    best = max(r["accuracy"] for r in bon)
    bon_tok = min(r["tokens"] for r in bon if r["accuracy"] == best)
    reach = [r["tokens"] for r in ast if r["accuracy"] >= best]
    out = {"best_of_n_best_accuracy": best, "best_of_n_tokens": bon_tok,
           "astar_best_accuracy": max(r["accuracy"] for r in ast)}
    if reach:
        out["astar_tokens_to_reach"] = min(reach)
        out["token_ratio"] = min(reach) / bon_tok if bon_tok else None
        out["goal_met"] = bool(bon_tok and min(reach) <= 0.5 * bon_tok)
    else:
        out["goal_met"] = False
    return out


def table(rows) -> str:
    lines = ["| strategy | budget | N/k | accuracy | tokens | PRM calls | s/task | budget ran out |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['budget']} | {r['n']} | {r['accuracy']:.2f} | {r['tokens']:.0f} | "
                     f"{r['prm_calls']:.1f} | {r['seconds']:.1f} | {r['exhausted']:.2f} |")
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for s in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == s]
        a.plot([r["tokens"] for r in rs], [r["accuracy"] for r in rs], "o-", label=s)
        b.plot([r["budget"] for r in rs], [r["accuracy"] for r in rs], "o-", label=s)
    a.set_xlabel("mean tokens generated per task")
    b.set_xlabel("token budget")
    for ax in (a, b):
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("search on the task suite (SmolLM2-135M-Instruct)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", type=int, default=12, help="tasks of the suite (first N)")
    ap.add_argument("--suite-seed", type=int, default=0)
    ap.add_argument("--budgets", default="64,128,256")
    ap.add_argument("--strategies", default=",".join(STRATS))
    ap.add_argument("--prm", default="verifier")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--bon-len", type=int, default=40, help="best-of-n draws budget // bon-len samples (a suite "
                                                          "answer is about 30 tokens)")
    ap.add_argument("--max-step-tokens", type=int, default=48)
    ap.add_argument("--temp", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args(argv)
    from ..runtime.engine import load
    from ..runtime.tasks import make_suite
    budgets = [int(x) for x in a.budgets.split(",") if x]
    strategies = [s for s in a.strategies.split(",") if s]
    engine = load(a.model, threads=a.threads, n_ctx=2048)
    suite = make_suite(a.tasks, a.suite_seed)
    t0 = time.time()
    rows = run(engine, suite, budgets, strategies, prm=a.prm, k=a.k, bon_len=a.bon_len,
               seed=a.seed, temp=a.temp, max_step_tokens=a.max_step_tokens,
               progress=lambda s: print(s, file=sys.stderr, flush=True))
    g = goal(rows)
    print(table(rows))
    if g:
        print("\n" + json.dumps(g))
    print(f"\n{len(suite)} tasks, prm {a.prm}, k {a.k}, {time.time() - t0:.0f} s in all")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"rows": rows, "goal": g, "args": vars(a)}, f, indent=1)
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
