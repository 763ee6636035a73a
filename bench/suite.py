"""`edgellm bench` from options to output: check the settings, measure the machine's ceiling, run every
backend with a progress bar, then print (table / JSON / CSV), write the report and plots. On Ctrl-C what
was measured so far is still printed and written."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..runtime.errors import EdgeLLMError
from .llama_bench import BenchRow, add_ratios, run_bench

SWEEPS = {"ctx": (0, 512, 1024, 2048, 4096)}  # later: delta-attention sparsity, KV types


@dataclass
class Settings:
    model: str | None = None
    backends: list = field(default_factory=lambda: ["edgellm", "llama.cpp"])
    n_prompt: int = 512
    n_gen: int = 128
    depths: list = field(default_factory=lambda: [0])
    reps: int = 5
    threads: int | None = None
    n_batch: int = 512
    onnx: str | None = None
    seed: int = 0
    sweep: str | None = None
    ceiling: bool = True      # measure the machine (bandwidth) to state the fraction reached


@dataclass
class Result:
    rows: list[BenchRow]
    interrupted: bool
    machine: dict | None
    meta: dict


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise EdgeLLMError(f"{what} is empty")
    return items


def parse_depths(text: str) -> list[int]:
    try:
        depths = [int(x) for x in parse_list(text, "--depth")]
    except ValueError:
        raise EdgeLLMError(f"--depth must be comma-separated token counts (got {text!r})") from None
    if any(d < 0 for d in depths):
        raise EdgeLLMError(f"--depth values must be >= 0 (got {text!r})")
    return sorted(set(depths))


def check(s: Settings) -> None:
    """Every option error as one clear line, before anything is loaded or measured."""
    from .backends import check_backends
    if s.reps < 1:
        raise EdgeLLMError("--repetitions must be >= 1")
    if s.n_prompt < 0 or s.n_gen < 0:
        raise EdgeLLMError("--n-prompt and --n-gen must be >= 0")
    if s.n_prompt == 0 and s.n_gen == 0:
        raise EdgeLLMError("nothing to measure: --n-prompt and --n-gen are both 0")
    if s.threads is not None and s.threads < 1:
        raise EdgeLLMError(f"--threads must be >= 1 (got {s.threads})")
    if s.n_batch < 1:
        raise EdgeLLMError("--batch-size must be >= 1")
    if s.sweep is not None and s.sweep not in SWEEPS:
        raise EdgeLLMError(f"unknown sweep {s.sweep!r} (available: {', '.join(SWEEPS)})")
    if len(set(s.backends)) != len(s.backends):
        raise EdgeLLMError("--backends lists a backend twice")
    check_backends(s.backends, s.onnx)


def run_suite(s: Settings, progress=None) -> Result:
    from ..runtime.engine import physical_cores, set_threads
    from ..runtime.fetch import resolve_model
    from .machine import machine_info
    from .report import run_meta
    check(s)
    path = resolve_model(s.model)
    s.threads = set_threads(s.threads or physical_cores())
    if s.sweep and s.depths == [0]:
        s.depths = list(SWEEPS[s.sweep])
    machine = machine_info(s.threads) if s.ceiling else None
    rows, interrupted = run_bench(path, s.backends, s.n_prompt, s.n_gen, s.depths, s.reps, s.threads, s.n_batch,
                                  s.onnx, s.seed, machine["bandwidth_gbs"] if machine else None, progress=progress)
    add_ratios(rows)
    if machine is not None:
        import os
        machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]  # was the machine busy meanwhile?
    settings = {k: v for k, v in asdict(s).items() if k != "model"}
    return Result(rows, interrupted, machine, run_meta(path, settings, machine, interrupted))


def emit(res: Result, fmt: str = "table", report_dir=None, plot=None, out=None) -> list[Path]:
    """Print the rows (fmt: table, json, csv) and write the report and plot; the paths written."""
    from .report import ceiling_line, machine_line, markdown_table, to_csv, to_json, write_report
    out = out or sys.stdout
    written = []
    if fmt == "json":
        out.write(to_json(res.rows) + "\n")
    elif fmt == "csv":
        out.write(to_csv(res.rows))
    else:
        m = res.meta
        out.write(f"model {Path(m['model']).name}, {m['settings']['threads']} threads, "
                  f"{m['settings']['reps']} runs after a discarded warm-up\n")
        if res.machine:
            out.write(f"machine: {machine_line(res.machine)}\n")
        out.write("\n" + markdown_table(res.rows) + "\n")
        if ceiling_line(res.rows, res.machine):
            out.write("\n" + ceiling_line(res.rows, res.machine) + "\n")
    if report_dir:
        written += list(write_report(report_dir, res.rows, res.meta))
    if plot and res.rows:
        from .plot import plot_bars, plot_depth_sweep
        title = f"{Path(res.meta['model']).name}, {res.meta['settings']['threads']} threads"
        many_depths = len({r.n_depth for r in res.rows}) > 1
        written.append((plot_depth_sweep if many_depths else plot_bars)(res.rows, plot, title))
    return written


def progress_bar():
    """A context manager yielding progress(done, total, text): a rich bar on stderr (silent off a terminal)."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar():
        console = Console(stderr=True)
        with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=console, transient=True,
                      disable=not console.is_terminal) as p:
            task = p.add_task("", total=None)
            yield lambda done, total, text: p.update(task, completed=done, total=total, description=text)
    return bar()
