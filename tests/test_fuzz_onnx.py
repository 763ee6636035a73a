"""Seeded mutations of an ONNX folder (`edgellm convert --format onnx`: model.onnx, config.json, tokenizer files)
loaded by `edgellm run`'s loader and used as a user would (tokenize, prefill, decode, detokenize, chat template)
in long-lived workers under an address-space limit (tests/fuzzkit.py): the graph truncated, bit-flipped or
overwritten, config.json values changed or dropped, tokenizer files changed or missing. Each either works or
raises edgellm's error; nothing else, no crash, no kill."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import fuzzkit
from fuzzkit import DROP

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

N_FAST = 150   # the folder with the weights inside model.onnx; and 50 of the folder whose weights are in
N_SLOW = 600   # model.onnx_data (a graph of structure only); @slow: 600 and 250 more: 1,050 in all
N_EXTERNAL = (50, 250)
VALUES = [0, -1, 10**12, 3.5, "x", None, DROP, True, [], {}, 1, 2, 7, 64, 320, 321, 4096, 2**63]


def mutations(folder, n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    size = (folder / "model.onnx").stat().st_size
    data = folder / "model.onnx_data"  # external weights (models over 2 GB): cut or overwritten too
    cfg = json.loads((folder / "config.json").read_text())
    keys = sorted(cfg)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    out = []
    for i in range(n):
        r = i % 8
        if r == 0 and data.exists() and rng.random() < 0.6:
            dsize = data.stat().st_size
            out.append(pick([("truncate", data.name, int(rng.integers(0, dsize))), ("remove", data.name),
                             ("bytes", data.name, int(rng.integers(0, dsize)), bytes([int(rng.integers(256))]))]))
        elif r == 0:
            out.append(("truncate", "model.onnx", int(rng.integers(0, size))))
        elif r in (1, 2):  # random bytes: the graph's first kilobytes (structure) or anywhere
            off = int(rng.integers(0, 2048 if r == 1 else size))
            out.append(("bytes", "model.onnx", off, bytes(rng.integers(0, 256, int(rng.integers(1, 9)),
                                                                      dtype=np.uint8))))
        elif r == 3:  # one bit flipped
            off = int(rng.integers(0, size))
            b = (folder / "model.onnx").read_bytes()[off]
            out.append(("bytes", "model.onnx", off, bytes([b ^ (1 << int(rng.integers(8)))])))
        elif r in (4, 5):
            out.append(("json", "config.json", (pick(keys),), pick(VALUES)))
        elif r == 6:
            name = pick(["config.json", "tokenizer.json", "tokenizer_config.json"])
            if rng.random() < 0.3:
                out.append(("remove", name))
            else:
                fsize = (folder / name).stat().st_size
                out.append(("bytes", name, int(rng.integers(0, fsize)),
                            bytes(rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8))))
        else:
            out.append(pick([("json", "tokenizer_config.json", ("chat_template",),
                              pick(["{% if %}", "{{ x.y }}", 5, "{{ raise_exception('x') }}", DROP])),
                             ("json", "tokenizer_config.json", ("eos_token",), pick(VALUES + ["<|im_end|>"])),
                             ("json", "tokenizer.json", ("model", "vocab", "a"), pick(VALUES)),
                             ("json", "tokenizer.json", ("model", "merges", 0), pick(VALUES))]))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from edgellm.converters.onnx_export import convert_to_onnx
    d = tmp_path_factory.mktemp("fuzz-onnx")
    return convert_to_onnx(fuzzkit.write_checkpoint(d / "ck", "llama"), d / "onnx", builder=True)


@pytest.fixture(scope="module")
def folder_external(folder):
    """The same export with its weights in model.onnx_data beside the graph (how models over 2 GB are stored)."""
    import shutil
    import onnx
    out = folder.parent / "onnx-external"
    shutil.copytree(folder, out)
    onnx.save_model(onnx.load(str(folder / "model.onnx")), str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=1024)
    return out


@pytest.fixture(scope="module")
def pool(folder):
    p = fuzzkit.Pool(2, warmup=("fuzzkit:exercise", (str(folder),)))
    yield p
    p.close()


def run_and_check(pool, folder, muts):
    t0 = time.time()
    res = pool.run([("fuzzkit:folder_mutant", (str(folder), m)) for m in muts])
    t = fuzzkit.assert_contained(muts, res, show=lambda m: repr(m)[:150])
    print(f"onnx folder: {len(muts)} mutations in {time.time() - t0:.1f} s: {t.get('ok', 0)} loaded and ran, "
          f"{t.get('error', 0)} clear errors")


def test_fuzz_onnx_fast(pool, folder, folder_external):
    run_and_check(pool, folder, mutations(folder, N_FAST, seed=51))
    run_and_check(pool, folder_external, mutations(folder_external, N_EXTERNAL[0], seed=52))


@pytest.mark.slow
def test_fuzz_onnx_slow(pool, folder):
    run_and_check(pool, folder, mutations(folder, N_SLOW, seed=61))


@pytest.mark.slow
def test_fuzz_onnx_external_data_slow(pool, folder_external):
    assert fuzzkit.exercise(folder_external)["finite"]
    run_and_check(pool, folder_external, mutations(folder_external, N_EXTERNAL[1], seed=71))


def test_mutants_through_the_cli(folder, tmp_path):
    import shutil
    data = (folder / "model.onnx").read_bytes()
    cases = [(("truncate", "model.onnx", len(data) // 2), "model.onnx"),
             (("bytes", "model.onnx", 0, b"\xff" * 16), "model.onnx"),
             (("remove", "tokenizer.json"), "tokenizer.json"),
             (("json", "tokenizer.json", ("model", "merges", 0), 7), "merges")]
    for i, (m, word) in enumerate(cases):
        dst = tmp_path / f"m{i}"
        shutil.copytree(folder, dst)
        if m[0] == "remove":
            (dst / m[1]).unlink()
        else:
            fuzzkit.apply_mutation(dst, m)
        r = fuzzkit.cli("run", str(dst), "-p", "hi", "-n", "2")
        fuzzkit.assert_clean_error(r, word)
        assert "EP Error" not in r.stdout + r.stderr  # onnxruntime's own banner is not shown


def test_graph_that_loads_but_fails_to_run(folder, tmp_path):
    """A corrupted attribute onnxruntime checks only when the node runs: one line at the first prefill."""
    import shutil
    import onnx
    from edgellm.runtime.engine import load
    from edgellm.runtime.errors import EdgeLLMError
    dst = tmp_path / "bad"
    shutil.copytree(folder, dst)
    m = onnx.load(str(folder / "model.onnx"))
    node = next(n for n in m.graph.node if n.name == "/rotary/Concat")  # the rotary angles, run before any use
    next(a for a in node.attribute if a.name == "axis").i = -(1 << 47) - 1  # (a bit flip found by the fuzz)
    onnx.save(m, str(dst / "model.onnx"))
    eng = load(dst, n_ctx=64, threads=1)
    with pytest.raises(EdgeLLMError, match="onnxruntime cannot run"):
        eng.prefill([1, 2, 3])


def test_onnx_config_and_banner(folder, tmp_path, capsys):
    """config.json values are typed and must agree with the graph; onnxruntime's own banner is not printed."""
    import shutil
    from edgellm.runtime.engine import load
    from edgellm.runtime.errors import EdgeLLMError, InsufficientMemoryError
    dst = tmp_path / "f"
    shutil.copytree(folder, dst)
    cfg = json.loads((folder / "config.json").read_text())
    for key, value, words in [("vocab_size", 321, "vocab_size = 321"), ("max_position_embeddings", "x", "max_position"),
                              ("max_position_embeddings", 3.5, "max_position")]:
        (dst / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
        with pytest.raises(EdgeLLMError, match=words):
            load(dst, threads=1)
    (dst / "config.json").write_text("[1, 2]")
    with pytest.raises(EdgeLLMError, match="JSON object"):
        load(dst, threads=1)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InsufficientMemoryError, match="smaller context"):
        load(dst, n_ctx=10**12, threads=1)
    data = (folder / "model.onnx").read_bytes()
    i = data.find(b"\x05embed") + 1  # a node input's name: invalid UTF-8 ends in an error whose message onnxruntime
    (dst / "model.onnx").write_bytes(data[:i] + b"\xee" + data[i + 1:])  # cannot decode: it prints a banner, retries
    with pytest.raises(EdgeLLMError, match="onnxruntime cannot load"):
        load(dst, threads=1)
    assert "EP Error" not in capsys.readouterr().out
