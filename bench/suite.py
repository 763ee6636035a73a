"""`edgellm bench` from options to output: check the settings, measure the machine's ceiling, run every
backend with a progress bar, then print (as llama-bench's `-o`: md, csv, json, jsonl), write the report
and plots. On Ctrl-C what was measured so far is still printed and written."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..runtime.errors import EdgeLLMError
from .llama_bench import BenchRow, add_ratios, as_list, run_bench

FORMATS = ("md", "csv", "json", "jsonl")   # llama-bench's -o (less sql)
SWEEPS = {"ctx": (0, 512, 1024, 2048, 4096)}  # later: delta-attention sparsity, KV types


@dataclass
class Settings:
    model: str | list | None = None   # one model, or several compared in one table (e.g. a variant and its original)
    backends: list = field(default_factory=lambda: ["edgellm", "llama.cpp"])
    n_prompt: int | list = 512     # each: one value or a list (every combination runs, as in llama-bench)
    n_gen: int | list = 128
    depths: list = field(default_factory=lambda: [0])
    reps: int = 5
    threads: int | list | None = None   # None: the physical cores
    n_batch: int = 512
    onnx: str | None = None
    seed: int = 0
    sweep: str | None = None
    ceiling: bool = True      # measure the machine (bandwidth) to state the fraction reached
    ppl_file: str | None = None   # also each model's edgellm perplexity on this text (ctx ppl_ctx, ppl_chunks windows)
    ppl_ctx: int = 512
    ppl_chunks: int = 8
    skipped: dict = field(default_factory=dict)  # backends left out, and why (set by check)


@dataclass
class Result:
    rows: list[BenchRow]
    interrupted: bool
    machine: dict | None
    meta: dict
    models: list = field(default_factory=list)  # per model: file, architecture, size, params, KV bytes, perplexity


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise EdgeLLMError(f"{what} is empty")
    return items


def parse_ints(texts, what: str, minimum: int = 0) -> list[int]:
    """llama-bench's list values: comma-separated, and/or the option given several times ("64,128" or
    ["64", "128"]) -> [64, 128] in the order given, each once."""
    texts = [texts] if isinstance(texts, (str, int)) else list(texts)
    out = []
    for t in texts:
        for x in parse_list(t, what):
            try:
                v = int(x)
            except ValueError:
                raise EdgeLLMError(f"{what} takes comma-separated whole numbers (got {t!r})") from None
            if v < minimum:
                raise EdgeLLMError(f"{what} values must be >= {minimum} (got {v})")
            if v not in out:
                out.append(v)
    return out


def parse_depths(text) -> list[int]:
    return sorted(parse_ints(text, "--depth"))


def check(s: Settings) -> None:
    """Every option error as one clear line, before anything is loaded or measured."""
    from .backends import check_backends
    if s.reps < 1:
        raise EdgeLLMError("--repetitions must be >= 1")
    if any(n < 0 for n in as_list(s.n_prompt) + as_list(s.n_gen)):
        raise EdgeLLMError("--n-prompt and --n-gen must be >= 0")
    if not any(n > 0 for n in as_list(s.n_prompt) + as_list(s.n_gen)):
        raise EdgeLLMError("nothing to measure: --n-prompt and --n-gen are all 0")
    if s.threads is not None and (not as_list(s.threads) or min(as_list(s.threads)) < 1):
        raise EdgeLLMError(f"--threads must be >= 1 (got {s.threads})")
    if s.n_batch < 1:
        raise EdgeLLMError("--batch-size must be >= 1")
    if s.ppl_file is not None:
        if not Path(s.ppl_file).is_file():
            raise EdgeLLMError(f"--ppl-file {s.ppl_file}: no such file")
        if s.ppl_ctx < 4 or s.ppl_ctx % 2 or s.ppl_chunks < 1:
            raise EdgeLLMError("--ppl-ctx must be an even number >= 4 and --ppl-chunks >= 1")
    if s.sweep is not None and s.sweep not in SWEEPS:
        raise EdgeLLMError(f"unknown sweep {s.sweep!r} (available: {', '.join(SWEEPS)})")
    if len(set(s.backends)) != len(s.backends):
        raise EdgeLLMError("--backends lists a backend twice")
    for name, why in check_backends(s.backends, s.onnx).items():  # e.g. llama.cpp without llama-cpp-python
        print(f"edgellm: {name} skipped: {why}", file=sys.stderr)
        s.backends = [b for b in s.backends if b != name]
        s.skipped[name] = why


def model_list(model) -> list:
    """Settings.model -> the models to measure ([None]: the default model)."""
    if isinstance(model, (list, tuple)):
        return list(model) or [None]
    return [model]


def llama_cpp_knows(path) -> bool:
    """Whether llama.cpp has the file's architecture (gguf-py mirrors llama.cpp's list)."""
    import gguf

    from ..runtime.gguf_file import GGUFFile
    if Path(path).is_dir():
        return False
    arch = GGUFFile(path).metadata.get(gguf.Keys.General.ARCHITECTURE)
    return arch in gguf.MODEL_ARCH_NAMES.values()


def model_summary(path, ppl_text: str | None, ctx: int, chunks: int, threads: int) -> dict:
    """File, architecture, size, parameters and KV bytes per token of a model in edgellm (and its perplexity)."""
    from ..runtime.engine import Engine
    eng = Engine(path, n_ctx=max(ctx, 64), threads=threads)
    info = {"model": str(path), "arch": eng.cfg.arch, "file_bytes": Path(path).stat().st_size,
            "weight_bytes_per_token": eng.weight_bytes_per_token, "kv_bytes_per_token": eng.kv_bytes_per_token,
            "n_params": int(sum(t.n_elements for t in eng.file.tensors.values()))}
    if ppl_text is not None:
        from .perplexity import edgellm_perplexity
        r = edgellm_perplexity(eng, ppl_text, ctx=ctx, max_windows=chunks)
        info.update(ppl=r.ppl, ppl_tokens=r.tokens_scored, ppl_ctx=ctx)
    return info


def run_suite(s: Settings, progress=None) -> Result:
    from ..runtime.engine import physical_cores, set_threads
    from ..runtime.fetch import resolve_model
    from .machine import machine_info
    from .report import run_meta
    check(s)
    paths = [resolve_model(m) for m in model_list(s.model)]
    ppl_text = None
    if s.ppl_file is not None:
        try:
            ppl_text = Path(s.ppl_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeLLMError(f"cannot read --ppl-file {s.ppl_file}: {e}") from None
    asked = as_list(s.threads or physical_cores())
    s.threads = list(dict.fromkeys(set_threads(t) for t in asked))   # numba runs at most NUMBA_NUM_THREADS
    if len(s.threads) < len(asked) or any(t not in s.threads for t in asked):
        print(f"edgellm: threads {','.join(map(str, asked))} run as {','.join(map(str, s.threads))} "
              f"(at most NUMBA_NUM_THREADS)", file=sys.stderr)
    if s.sweep and s.depths == [0]:
        s.depths = list(SWEEPS[s.sweep])
    machine = machine_info(max(s.threads)) if s.ceiling else None
    rows, interrupted, models = [], False, []
    for path in paths:
        backends = [b for b in s.backends if b != "llama.cpp" or llama_cpp_knows(path)]
        if backends != s.backends:
            print(f"edgellm: llama.cpp does not know the architecture of {Path(path).name}: edgellm only",
                  file=sys.stderr)
        if s.ppl_file is not None or len(paths) > 1:
            models.append(model_summary(path, ppl_text, s.ppl_ctx, s.ppl_chunks, s.threads[0]))
        r, interrupted = run_bench(path, backends, s.n_prompt, s.n_gen, s.depths, s.reps, s.threads, s.n_batch,
                                   s.onnx, s.seed, machine["bandwidth_gbs"] if machine else None, progress=progress)
        add_ratios(r)
        rows += r
        if interrupted:
            break
    if machine is not None:
        import os
        machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]  # was the machine busy meanwhile?
    settings = {k: v for k, v in asdict(s).items() if k != "model"}
    meta = run_meta(paths[0], settings, machine, interrupted)
    if len(paths) > 1:
        meta["models"] = [str(p) for p in paths]
    return Result(rows, interrupted, machine, meta, models)


def emit(res: Result, fmt: str = "md", report_dir=None, plot=None, out=None) -> list[Path]:
    """Print the rows (fmt: md, csv, json, jsonl) and write the report and plot; the paths written."""
    from .report import (ceiling_line, machine_line, markdown_table, models_table, to_csv, to_json, to_jsonl,
                         write_report)
    if fmt not in FORMATS:
        raise EdgeLLMError(f"unknown output format {fmt!r} (choose from {', '.join(FORMATS)})")
    out = out or sys.stdout
    written = []
    if fmt == "json":
        out.write(to_json(res.rows) + "\n")
    elif fmt == "jsonl":
        out.write(to_jsonl(res.rows))
    elif fmt == "csv":
        out.write(to_csv(res.rows))
    else:
        m = res.meta
        threads = ",".join(map(str, as_list(m["settings"]["threads"])))
        out.write(f"model {', '.join(Path(x).name for x in m.get('models', [m['model']]))}, {threads} threads, "
                  f"{m['settings']['reps']} runs after a discarded warm-up\n")
        if res.machine:
            out.write(f"machine: {machine_line(res.machine)}\n")
        out.write("\n" + markdown_table(res.rows) + "\n")
        if res.models:
            out.write("\n" + models_table(res.models) + "\n")
        if ceiling_line(res.rows, res.machine):
            out.write("\n" + ceiling_line(res.rows, res.machine) + "\n")
    if report_dir:
        written += list(write_report(report_dir, res.rows, res.meta, {"models": res.models} if res.models else None))
    if plot and res.rows:
        from .plot import plot_bars, plot_depth_sweep
        title = f"{Path(res.meta['model']).name}, {','.join(map(str, as_list(res.meta['settings']['threads'])))} threads"
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
