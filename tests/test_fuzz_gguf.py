"""Seeded byte mutations of tiny GGUF files (F32, Q8_0, Q4_0 Llamas; a TQ2_0 BitNet; deci, deepseek2 and
edgellm-linear files with their per-architecture metadata), each loaded and used as a
user would (tokenize, prefill, decode, detokenize, chat template) in long-lived workers under an address-space
limit (tests/fuzzkit.py): each either works or raises edgellm's error; nothing else, no crash, no kill.
(test_bad_input.py mutates the real default model's header the same way, 300 times, in-process.)"""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest

import fuzzkit

N_FAST = 100   # per Llama/BitNet file, unmarked (4 files: 400); 40 per other architecture (120)
N_SLOW = 250   # per Llama/BitNet file, @slow (1,000); 100 per other architecture (300): 1,820 here, and
#                test_bad_input.py mutates the real model 300 times
OTHER = ("deci", "deepseek2", "edgellm-linear")


def header_regions(path) -> dict[str, tuple[int, int]]:
    """Byte ranges of a GGUF: the fixed header, the metadata, the tensor table, the tensor data."""
    from edgellm.runtime.gguf_file import GGUFFile
    f = GGUFFile(path)
    raw = path.read_bytes()
    first = next(iter(f.tensors))
    table = raw.rfind(struct.pack("<Q", len(first)) + first.encode(), 0, f.data_offset)
    return {"fixed": (0, 24), "metadata": (24, table), "table": (table, f.data_offset),
            "data": (f.data_offset, len(raw))}


def mutations(path, n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    reg = header_regions(path)
    size = reg["data"][1]
    out = []
    for i in range(n):
        kind = ["fixed", "metadata", "metadata", "table", "table", "data", "truncate"][i % 7]
        if kind == "truncate":
            out.append(("truncate", int(rng.integers(0, size))))
            continue
        lo, hi = reg[kind]
        off = int(rng.integers(lo, max(lo + 1, hi)))
        k = int(rng.integers(4))
        if k == 0:
            b = bytes([int(rng.integers(256))])
        elif k == 1:
            b = struct.pack("<Q", [0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1][int(rng.integers(6))])
        elif k == 2:
            b = struct.pack("<I", int(rng.integers(0, 2**32)))
        else:
            b = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        out.append(("bytes", off, b))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import gguf
    from tiny_models import write_tiny, write_tiny_llama
    from edgellm.converters import convert_to_gguf
    d = tmp_path_factory.mktemp("fuzz-gguf")
    qt = gguf.GGMLQuantizationType
    out = {"f32": write_tiny_llama(d / "f32.gguf", n_embd=64, n_ff=96, seed=1),
           "q8_0": write_tiny_llama(d / "q8.gguf", n_embd=64, n_ff=96, qtype=qt.Q8_0, seed=2),
           "q4_0": write_tiny_llama(d / "q4.gguf", n_embd=64, n_ff=96, qtype=qt.Q4_0, seed=3, tied=False)}
    out["tq2_0"] = convert_to_gguf(fuzzkit.write_checkpoint(d / "bitnet", "bitnet"), d / "tq2.gguf", "tq2_0")
    for arch in OTHER:
        out[arch] = write_tiny(d / f"{arch}.gguf", arch)
    return out


@pytest.fixture(scope="module")
def pool(files):
    p = fuzzkit.Pool(2, warmup=("fuzzkit:exercise_all", ([str(files[k]) for k in ("q8_0", "q4_0", "tq2_0")],)))
    yield p
    p.close()


def run_and_check(pool, path, muts):
    t0 = time.time()
    res = pool.run([("fuzzkit:gguf_bytes_mutant", (str(path), m)) for m in muts])
    t = fuzzkit.assert_contained(muts, res)
    print(f"{path.name}: {len(muts)} mutations in {time.time() - t0:.1f} s: {t.get('ok', 0)} loaded and ran, "
          f"{t.get('error', 0)} clear errors")
    return t


@pytest.mark.parametrize("name", ["f32", "q8_0", "q4_0", "tq2_0", *OTHER])
def test_fuzz_gguf_fast(files, pool, name):
    run_and_check(pool, files[name], mutations(files[name], N_FAST if name not in OTHER else 40,
                                               seed=100 + len(name)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["f32", "q8_0", "q4_0", "tq2_0", *OTHER])
def test_fuzz_gguf_slow(files, pool, name):
    run_and_check(pool, files[name], mutations(files[name], N_SLOW if name not in OTHER else 100,
                                               seed=200 + len(name)))
