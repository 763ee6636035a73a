"""The benchmark suite: row fields and names, outputs, the report, Ctrl-C, bad options. Tiny sizes, one
repetition; nothing here asserts a speed."""
from __future__ import annotations

import csv
import io
import json
import sys

import pytest

from edgellm.bench import backends as B
from edgellm.bench.llama_bench import BenchRow, add_ratios, name_of_test, run_bench
from edgellm.runtime.errors import EdgeLLMError

from test_bad_input import assert_clean_error, cli

LLAMA_BENCH_FIELDS = {"backend", "n_prompt", "n_gen", "n_depth", "n_threads", "avg_ts", "stddev_ts", "samples_ts",
                      "model_size", "model_n_params", "type_k", "type_v"}
EXTRA_FIELDS = {"test", "ttft_ms", "peak_rss_bytes", "kv_bytes", "bandwidth_gbs", "bandwidth_frac", "ratio_vs_llama_cpp"}


class FakeBackend:
    """A backend that only counts tokens: the harness without an engine."""
    name = "fake"
    type_k = type_v = "f32"
    n_vocab, kv_bytes_per_token, model_size, model_n_params, weight_bytes_per_token = 100, 10, 1000, 500, 1000

    def __init__(self, path, threads, n_ctx, n_batch=512):
        self.n, self.n_ctx = 0, n_ctx

    def truncate(self, n):
        assert 0 <= n <= self.n
        self.n = n

    def prompt(self, tokens):
        self.n += len(tokens)
        assert self.n <= self.n_ctx

    def step(self, token):
        self.prompt([token])

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(B.BACKENDS, "fake", FakeBackend)
    monkeypatch.setitem(B.BACKENDS, "fake2", FakeBackend)
    return "fake"


def test_test_names_follow_llama_bench():
    assert name_of_test("pp", 512, 0) == "pp512"
    assert name_of_test("tg", 128, 0) == "tg128"
    assert name_of_test("pp", 512, 4096) == "pp512 @ d4096"


def test_rows_with_a_registered_backend(fake, tmp_path):
    rows, interrupted = run_bench("m.gguf", ["fake", "fake2"], 8, 4, depths=(0, 16), reps=2, threads=1,
                                  machine_bw=10.0)
    assert not interrupted
    assert [r.test for r in rows[:4]] == ["pp8", "tg4", "pp8 @ d16", "tg4 @ d16"]
    add_ratios(rows, reference="fake")
    ref = {r.test: r.avg_ts for r in rows if r.backend == "fake"}
    for r in rows:
        d = r.as_dict()
        assert set(d) >= LLAMA_BENCH_FIELDS | EXTRA_FIELDS
        assert len(r.samples_ts) == 2 and r.avg_ts > 0
        assert r.ratio_vs_llama_cpp == pytest.approx(r.avg_ts / ref[r.test])
        assert r.kv_bytes == (r.n_depth + r.n_prompt + r.n_gen) * 10
        if r.n_gen:
            assert r.read_bytes_per_token > 1000 and r.bandwidth_frac == pytest.approx(r.bandwidth_gbs / 10)
        else:
            assert r.bandwidth_gbs is None
    assert {r.backend for r in rows} == {"fake", "fake2"}


def test_ctrl_c_keeps_what_was_measured(fake, tmp_path):
    from edgellm.bench import suite

    def interrupt_at(text):
        def progress(done, total, what):
            if what == text:
                raise KeyboardInterrupt
        return progress

    # during the second repetition of tg4: pp4 complete, tg4 kept with its one measured run
    rows, interrupted = run_bench("m", ["fake"], 4, 4, reps=2, threads=1, progress=interrupt_at("fake tg4: run 2/2"))
    assert interrupted and [r.test for r in rows] == ["pp4", "tg4"] and len(rows[1].samples_ts) == 1
    # through the suite: the report is still written, marked as partial
    s = suite.Settings(model=str(tmp_path / "m.gguf"), backends=["fake"], n_prompt=4, n_gen=4, reps=1, threads=1,
                       ceiling=False)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    res = suite.run_suite(s, progress=interrupt_at("fake tg4: warm-up"))
    assert res.interrupted and [r.test for r in res.rows] == ["pp4"]
    out = io.StringIO()
    md, jl = suite.emit(res, "json", report_dir=tmp_path / "rep", out=out)
    assert [r["test"] for r in json.loads(out.getvalue())] == ["pp4"]
    lines = [json.loads(x) for x in jl.read_text().splitlines()]
    assert lines[0]["kind"] == "meta" and lines[0]["interrupted"] is True
    assert [x["test"] for x in lines[1:]] == ["pp4"]
    assert "interrupted" in md.read_text()


def test_report_plots_and_csv(fake, tmp_path):
    pytest.importorskip("matplotlib")
    from edgellm.bench.plot import plot_bars, plot_depth_sweep
    from edgellm.bench.report import run_meta, to_csv, write_report
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    rows, _ = run_bench(str(model), ["fake", "fake2"], 4, 2, depths=(0, 8), reps=1, threads=1, machine_bw=5.0)
    add_ratios(rows, reference="fake")
    meta = run_meta(model, {"threads": 1}, {"cpu": "x", "bandwidth_gbs": 5.0})
    assert len(meta["model_sha256"]) == 64 and "numpy" in meta["versions"]
    md, jl = write_report(tmp_path / "r", rows, meta)
    text = md.read_text()
    assert meta["model_sha256"] in text and "| fake2 | tg2 @ d8 |" in text and "1.00x" in text
    assert len(jl.read_text().splitlines()) == 1 + len(rows)
    table = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert len(table) == len(rows) and set(table[0]) >= LLAMA_BENCH_FIELDS and table[2]["test"] == "pp4 @ d8"
    for fn, name in ((plot_depth_sweep, "sweep.png"), (plot_bars, "bars.png")):
        p = fn(rows, tmp_path / name)
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lists_run_every_combination_in_llama_bench_order(fake):
    # llama-bench: per thread count, per depth, each pp size then each tg length (sizes as given, 0 skipped)
    rows, _ = run_bench("m.gguf", ["fake", "fake2"], [8, 0, 4], [2], depths=(0, 16), reps=1, threads=[2, 1])
    tests = ("pp8", "pp4", "tg2", "pp8 @ d16", "pp4 @ d16", "tg2 @ d16")
    assert [(r.backend, r.n_threads, r.test) for r in rows] == [(b, t, x) for b in ("fake", "fake2") for t in (2, 1)
                                                                  for x in tests]
    add_ratios(rows, reference="fake")
    assert all(r.ratio_vs_llama_cpp is not None for r in rows)  # each against the same test at the same threads


def test_parse_ints_as_llama_bench():
    from edgellm.bench.suite import parse_ints
    assert parse_ints(["64,128", "256", "64"], "-p") == [64, 128, 256]
    assert parse_ints("0", "-n") == [0]
    for bad in ("1,,x", "-3", ""):
        with pytest.raises(EdgeLLMError):
            parse_ints(bad, "-p")


def _two_threads():
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")


def test_cli_thread_and_size_lists_jsonl(tmp_path):
    # the command on a tiny model: every combination, one JSON object per line, in llama-bench's order
    _two_threads()
    from tiny_models import write_tiny_llama
    tiny = write_tiny_llama(tmp_path / "tiny.gguf", n_ctx=256)
    r = cli("bench", str(tiny), "-t", "1,2", "-p", "64,128", "-n", "16", "-o", "jsonl", "-r", "1",
            "--backends", "edgellm", "--no-ceiling")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["n_threads"], x["test"], x["n_prompt"], x["n_gen"]) for x in rows] == [
        (1, "pp64", 64, 0), (1, "pp128", 128, 0), (1, "tg16", 0, 16),
        (2, "pp64", 64, 0), (2, "pp128", 128, 0), (2, "tg16", 0, 16)]
    assert all(set(x) >= LLAMA_BENCH_FIELDS and x["avg_ts"] > 0 for x in rows)


def test_cli_models_by_m_and_a_threads_column(tmp_path):
    _two_threads()
    from tiny_models import write_tiny_llama
    a = write_tiny_llama(tmp_path / "a.gguf", n_ctx=256)
    b = write_tiny_llama(tmp_path / "b.gguf", n_ctx=256, seed=1)
    r = cli("bench", str(a), "-m", str(b), "-t", "2", "-t", "1", "-p", "8", "-n", "0", "-r", "1",
            "--backends", "edgellm", "--no-ceiling", "-o", "md")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| a.gguf") or line.startswith("| b.gguf")]
    assert [line.split("|")[1:5] for line in rows if "| edgellm |" in line] == [
        [" a.gguf ", " edgellm ", " 2 ", " pp8 "], [" a.gguf ", " edgellm ", " 1 ", " pp8 "],
        [" b.gguf ", " edgellm ", " 2 ", " pp8 "], [" b.gguf ", " edgellm ", " 1 ", " pp8 "]]
    r2 = cli("bench", "-m", str(a), "-p", "8", "-n", "0", "-r", "1", "--backends", "edgellm", "--no-ceiling", "--csv")
    assert r2.returncode == 0, r2.stderr
    assert [x["test"] for x in csv.DictReader(io.StringIO(r2.stdout))] == ["pp8"]


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    from edgellm.bench import plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(EdgeLLMError, match="matplotlib"):
        plot._plt()


def test_machine_info_keys():
    from edgellm.bench.machine import machine_info
    info = machine_info(1, quick=True)
    assert set(info) >= {"cpu", "physical_cores", "logical_cores", "simd", "threads", "bandwidth_gbs", "sgemm_gflops"}
    assert info["bandwidth_gbs"] > 0 and info["sgemm_gflops"] > 0 and isinstance(info["simd"], list)


def test_cli_machine_json():
    r = cli("bench", "--machine", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert {"bandwidth_gbs", "sgemm_gflops", "simd", "physical_cores"} <= set(info) and info["threads"] == 1


def test_cli_json_both_backends_with_depth(model_path, llama_cpp):
    r = cli("bench", str(model_path), "-p", "4", "-n", "2", "-r", "1", "--depth", "0,8", "--threads", "2",
            "--json", "--no-ceiling")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["backend"], x["test"]) for x in rows] == [
        (b, t) for b in ("edgellm", "llama.cpp") for t in ("pp4", "tg2", "pp4 @ d8", "tg2 @ d8")]
    for x in rows:
        assert set(x) >= LLAMA_BENCH_FIELDS | EXTRA_FIELDS
        assert x["n_threads"] == 2 and x["n_batch"] == 512 and x["model_n_params"] > 100e6
        assert x["n_depth"] in (0, 8) and len(x["samples_ts"]) == 1 and x["peak_rss_bytes"] > 0
        assert x["ratio_vs_llama_cpp"] is not None
    assert {(x["backend"], x["type_k"], x["type_v"]) for x in rows} == {("edgellm", "f16", "f16"),  # (the defaults)
                                                                       ("llama.cpp", "f16", "f16")}


def test_cli_csv_and_table(model_path, tmp_path):
    r = cli("bench", str(model_path), "-p", "4", "-n", "0", "-r", "1", "--backends", "edgellm", "--csv",
            "--no-ceiling", "--report", str(tmp_path))
    assert r.returncode == 0, r.stderr
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["test"] for x in table] == ["pp4"] and float(table[0]["avg_ts"]) > 0
    assert (tmp_path / "bench.md").exists() and (tmp_path / "bench.jsonl").exists()


def test_two_models_in_one_table_with_perplexity(tmp_path, text):
    # a variant beside its original: one table with a model column, and the models table (arch, KV bytes, perplexity)
    from tiny_models import write_tiny_llama
    a = write_tiny_llama(tmp_path / "a.gguf", n_embd=64, n_ff=96, n_ctx=256)
    b = write_tiny_llama(tmp_path / "b.gguf", n_embd=64, n_ff=48, n_ctx=256, seed=1)
    (tmp_path / "t.txt").write_text(text[:4000])
    r = cli("bench", str(a), str(b), "-p", "4", "-n", "2", "-r", "1", "--backends", "edgellm", "--no-ceiling",
            "--ppl-file", str(tmp_path / "t.txt"), "--ppl-ctx", "64", "--ppl-chunks", "1", "--report", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "| a.gguf | edgellm | pp4 |" in r.stdout and "| b.gguf | edgellm | tg2 |" in r.stdout
    models = [line for line in r.stdout.splitlines() if line.startswith("| a.gguf | llama |")
              or line.startswith("| b.gguf | llama |")]
    assert len(models) == 2 and all(float(m.rstrip(" |").split("|")[-1]) > 1 for m in models)  # perplexities
    meta = json.loads((tmp_path / "bench.jsonl").read_text().splitlines()[0])
    assert len(meta["models"]) == 2 and meta["models"][0]["kv_bytes_per_token"] > 0
    assert_clean_error(cli("bench", str(a), "--ppl-file", str(tmp_path / "none.txt")))


@pytest.mark.parametrize("args", [
    ("-r", "0"), ("--depth", "1,x"), ("--depth", "-5"), ("-p", "0", "-n", "0"), ("--threads", "0"),
    ("--backends", "edgellm,nope"), ("--backends", "onnxruntime"), ("--backends", "onnxruntime", "--onnx", "/"),
    ("--json", "--csv"), ("--sweep", "nope"), ("/no/such/model.gguf", "-p", "4", "-n", "0"),
    ("-o", "xml"), ("-o", "md", "--json"), ("-t", "1,0"), ("-p", "8,x"), ("-n", "-1"), ("--machine", "-t", "1,2"),
])
def test_bad_options_one_line(args):
    assert_clean_error(cli("bench", *args))


def test_crosscheck_llama_cpp_by_hand(model_path, llama_cpp):
    """The harness's llama.cpp numbers beside llama-cpp-python timed by hand and llama.cpp's own counters
    (structure only here; `python -m edgellm.bench.crosscheck` compares them at full size)."""
    from edgellm.bench.crosscheck import crosscheck
    res = crosscheck(model_path, n_prompt=8, n_gen=2, reps=1, threads=2)
    for kind in ("pp", "tg"):
        assert set(res[kind]) == {"harness", "by_hand", "llama_perf"}
        assert all(v > 0 for v in res[kind].values())


def test_onnxruntime_backend_drives_the_onnx_engine(monkeypatch, tmp_path):
    """The bench's onnxruntime backend over the runtime's OnnxEngine (a stand-in here: only the plumbing)."""
    import numpy as np

    from edgellm.runtime import onnx_backend
    calls = []

    class Cache:
        n, nbytes_per_token = 0, 64

        def truncate(self, n):
            self.n = n

    class Engine:
        weight_bytes_per_token = 1234
        cfg = type("C", (), {"n_vocab": 50})

        def __init__(self, path, n_ctx=None, threads=None):
            calls.append(("init", threads, n_ctx))

        def new_cache(self, n_ctx):
            return Cache()

        def prefill(self, tokens, cache, chunk=512):
            calls.append(("prefill", len(tokens), chunk))
            cache.n += len(tokens)
            return np.zeros(50)

        def decode(self, token, cache):
            return self.prefill([token], cache)

    monkeypatch.setattr(onnx_backend, "OnnxEngine", Engine)
    rows, _ = run_bench("m.gguf", ["onnxruntime"], 6, 2, depths=(0, 4), reps=1, threads=2, n_batch=3,
                        onnx_dir=str(tmp_path))
    assert [r.test for r in rows] == ["pp6", "tg2", "pp6 @ d4", "tg2 @ d4"]
    assert calls[0][:2] == ("init", 2) and ("prefill", 6, 3) in calls
    assert rows[1].read_bytes_per_token == 1234 + 64 * 1.5 and rows[0].model_filename == tmp_path.name and rows[0].model_size == 1234 and rows[0].type_k == "f32"


@pytest.mark.slow
def test_cli_three_backends_on_a_tiny_exported_model(tmp_path):
    """End to end on a tiny random Llama exported both ways (GGUF and ONNX): one table, three backends."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    mc = pytest.importorskip("edgellm.bench.make_checkpoints")
    import subprocess
    r = subprocess.run([sys.executable, "-m", mc.__name__, str(tmp_path / "hf"), "--model", "tiny-llama"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for args in (("-o", str(tmp_path / "t.gguf"), "--outtype", "f32"), ("-o", str(tmp_path / "onnx"), "--format", "onnx")):
        r = cli("convert", str(tmp_path / "hf"), *args)
        assert r.returncode == 0, r.stderr[-2000:]
    r = cli("bench", str(tmp_path / "t.gguf"), "-p", "8", "-n", "2", "-r", "1", "--depth", "0,8", "--no-ceiling",
            "--backends", "edgellm,llama.cpp,onnxruntime", "--onnx", str(tmp_path / "onnx"), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert {(x["backend"], x["test"]) for x in rows} == {
        (b, t) for b in ("edgellm", "llama.cpp", "onnxruntime") for t in ("pp8", "tg2", "pp8 @ d8", "tg2 @ d8")}


def test_serve_bench_reports_medians_and_paired_ratios():
    # bench/serve.py: each level's rounds merge to the median round; the 8 / 1 goal is the median of the rounds' own
    # ratios (a drifting machine moves both levels of a round alike), not the ratio of the medians
    from edgellm.bench import serve as sb

    def rnd(clients, tps, ttft):
        return sb.Row("edgellm", clients, 128 * clients, tps, tps / clients, ttft, ttft, 1.0, 400.0, 0, [tps], [ttft])

    one = sb.merge_rounds([rnd(1, 100.0, 20.0), rnd(1, 200.0, 30.0), rnd(1, 150.0, 10.0)])
    eight = sb.merge_rounds([rnd(8, 320.0, 60.0), rnd(8, 700.0, 80.0), rnd(8, 420.0, 70.0)])
    assert (one.aggregate_tps, eight.aggregate_tps) == (150.0, 420.0)
    assert one.tokens == 384 and one.ttft_p50_ms == 20.0 and one.rounds_tps == [100.0, 200.0, 150.0]
    text = sb.report([one, eight], {}, "m.gguf", 2, 128)
    # rounds: 3.2x, 3.5x, 2.8x -> median 3.2x (the medians' ratio would be 2.8x)
    assert "single stream = 3.20x (rounds: 3.20x, 3.50x, 2.80x)" in text
    assert "| edgellm | 8 | 420.0 |" in text
