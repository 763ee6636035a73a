"""PNG plots of benchmark rows (matplotlib, the optional `plot` extra)."""
from __future__ import annotations

from pathlib import Path

from ..runtime.errors import EdgeLLMError
from .llama_bench import BenchRow


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise EdgeLLMError("plots need matplotlib: pip install 'edgellm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path) -> Path:
    """A finished figure -> the PNG at path (120 dpi), the figure closed."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_depth_sweep(rows: list[BenchRow], path, title: str = "") -> Path:
    """tok/s against context depth, one line per backend, prompt processing and generation side by side."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("pp", "tg")):
        sel = [r for r in rows if (r.n_prompt if kind == "pp" else r.n_gen)]
        for backend in dict.fromkeys(r.backend for r in sel):
            pts = sorted((r.n_depth, r.avg_ts, r.stddev_ts) for r in sel if r.backend == backend)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=backend)
        n = next((r.n_prompt or r.n_gen for r in sel), 0)
        ax.set_title(f"{'prompt processing' if kind == 'pp' else 'generation'} ({kind}{n})")
        ax.set_xlabel("context depth (tokens)")
        ax.set_ylabel("tok/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if sel:
            ax.legend()
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def plot_bars(rows: list[BenchRow], path, title: str = "") -> Path:
    """tok/s per test, one bar per backend."""
    plt = _plt()
    tests = list(dict.fromkeys(r.test for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tests)), 4))
    w = 0.8 / max(1, len(backends))
    for j, b in enumerate(backends):
        by = {r.test: r for r in rows if r.backend == b}
        xs = [i + j * w for i, t in enumerate(tests) if t in by]
        ax.bar(xs, [by[t].avg_ts for t in tests if t in by], w, yerr=[by[t].stddev_ts for t in tests if t in by],
               capsize=3, label=b)
    ax.set_xticks([i + w * (len(backends) - 1) / 2 for i in range(len(tests))], tests)
    ax.set_ylabel("tok/s")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)
