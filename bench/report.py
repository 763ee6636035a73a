"""What a benchmark run writes: a Markdown table (with ratios to llama.cpp), CSV, JSON, JSON lines, and a report
(Markdown + JSON lines) that carries the machine, package versions, model file hash and every setting."""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import platform
from dataclasses import fields
from importlib import metadata
from pathlib import Path

from .llama_bench import BenchRow

PACKAGES = ("edgellm", "numpy", "numba", "llama-cpp-python", "onnxruntime", "gguf")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def run_meta(model, settings: dict, machine: dict | None, interrupted: bool = False) -> dict:
    """Everything needed to read (or repeat) a run: when, on what, with which code, file and settings."""
    p = Path(str(model))
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "model": str(p), "model_sha256": sha256(p) if p.is_file() else None,
            "settings": settings, "machine": machine, "versions": versions(), "interrupted": interrupted}


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def markdown_table(rows: list[BenchRow]) -> str:
    """One row per test; a model column when several models were measured, a threads column when several
    thread counts were (llama-bench shows what varies)."""
    many = len({r.model_filename for r in rows}) > 1
    threads = len({r.n_threads for r in rows}) > 1
    lines = [("| model " if many else "") + "| backend " + ("| threads " if threads else "") +
             "| test | t/s | vs llama.cpp | first logits ms | peak RSS MiB | KV MiB | GB/s read | of ceiling |",
             ("|---" if many else "") + "|---" + ("|---:" if threads else "") + "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            (f"| {Path(r.model_filename).name} " if many else "") + f"| {r.backend} "
            + (f"| {r.n_threads} " if threads else "") + f"| {r.test} | {r.avg_ts:.2f} ± {r.stddev_ts:.2f} | "
            f"{_f(r.ratio_vs_llama_cpp, '.2f')}{'x' if r.ratio_vs_llama_cpp is not None else ''} | {r.ttft_ms:.1f} | "
            f"{r.peak_rss_bytes / 2**20:.0f} | {r.kv_bytes / 2**20:.1f} | {_f(r.bandwidth_gbs, '.2f')} | "
            f"{_f(None if r.bandwidth_frac is None else 100 * r.bandwidth_frac, '.0f')}"
            f"{'%' if r.bandwidth_frac is not None else ''} |")
    return "\n".join(lines)


def models_table(models: list[dict]) -> str:
    """One row per model (variant vs original): architecture, file size, parameters, KV bytes per token, perplexity."""
    ppl = any("ppl" in m for m in models)
    lines = ["| model | arch | file MiB | parameters | weights read / token MiB | KV bytes / token |"
             + (" perplexity |" if ppl else ""), "|---|---|---:|---:|---:|---:|" + ("---:|" if ppl else "")]
    for m in models:
        lines.append(f"| {Path(m['model']).name} | {m['arch']} | {m['file_bytes'] / 2**20:.1f} | {m['n_params']:,} | "
                     f"{m['weight_bytes_per_token'] / 2**20:.1f} | {m['kv_bytes_per_token']:,} |"
                     + (f" {m['ppl']:.3f} |" if 'ppl' in m else (" - |" if ppl else "")))
    if ppl:
        m = next(m for m in models if "ppl" in m)
        lines.append(f"\nperplexity: edgellm, {m['ppl_tokens']} tokens scored in windows of {m['ppl_ctx']}")
    return "\n".join(lines)


def machine_line(m: dict | None) -> str:
    if not m:
        return ""
    return (f"{m.get('cpu', '?')}, {m.get('physical_cores', '?')} cores ({', '.join(m.get('simd', [])) or 'no SIMD flags'}), "
            f"{m.get('threads', '?')} threads: read bandwidth {m.get('bandwidth_gbs', '?')} GB/s, "
            f"sgemm {m.get('sgemm_gflops', '?')} GFLOPS, load average {m.get('load_avg', '?')}")


def ceiling_line(rows: list[BenchRow], machine: dict | None) -> str:
    """The decode ceiling of each tg test: read bandwidth / bytes a step reads (of the first backend)."""
    bw = (machine or {}).get("bandwidth_gbs")
    tg = [r for r in rows if r.n_gen and r.read_bytes_per_token and r.backend == rows[0].backend]
    if not bw or not tg:
        return ""
    return (f"decode ceiling ({bw} GB/s ÷ bytes read per step, {tg[0].backend}): "
            + ", ".join(f"{r.test} ≤ {bw * 1e9 / r.read_bytes_per_token:.0f} tok/s "
                        f"({r.read_bytes_per_token / 1e6:.0f} MB/step)" for r in tg))


def to_csv(rows: list[BenchRow]) -> str:
    names = [f.name for f in fields(BenchRow)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in rows:
        d = r.as_dict()
        w.writerow([" ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, list)
                    else ("" if v is None else v) for v in (d[n] for n in names)])
    return buf.getvalue()


def to_json(rows: list[BenchRow]) -> str:
    """llama-bench's -o json: one array of row objects."""
    return json.dumps([r.as_dict() for r in rows], indent=2)


def to_jsonl(rows: list[BenchRow]) -> str:
    """llama-bench's -o jsonl: one row object per line."""
    return "".join(json.dumps(r.as_dict()) + "\n" for r in rows)


def write_report(out_dir, rows: list[BenchRow], meta: dict, extra: dict | None = None) -> tuple[Path, Path]:
    """out_dir/bench.md (settings, machine, versions, the table) and out_dir/bench.jsonl (a `meta` line,
    then one `row` line per row). Returns both paths."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    md, jl = d / "bench.md", d / "bench.jsonl"
    with open(jl, "w", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "meta", **meta, **(extra or {})}) + "\n")
        for r in rows:
            f.write(json.dumps({"kind": "row", **r.as_dict()}) + "\n")
    s = meta["settings"]
    v = meta["versions"]
    text = [f"# edgellm bench, {meta['date']}" + (" (interrupted: partial)" if meta.get("interrupted") else ""), "",
            f"- model: `{Path(meta['model']).name}` (sha256 `{meta['model_sha256']}`)",
            f"- settings: " + ", ".join(f"{k}={v_}" for k, v_ in s.items()),
            f"- machine: {machine_line(meta.get('machine'))}",
            f"- versions: " + ", ".join(f"{k} {v_}" for k, v_ in v.items()), "",
            markdown_table(rows), "", ceiling_line(rows, meta.get("machine")), ""]
    md.write_text("\n".join(text), encoding="utf-8")
    return md, jl
