"""Bad input gets one clear line and a non-zero exit: never a traceback, never a segfault."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from edgellm.runtime.engine import Engine
from edgellm.runtime.errors import EdgeLLMError
from edgellm.runtime.gguf_file import GGUFFile

import fuzzkit

N_MUTATIONS = 300


def cli(*args, input=None):
    env = dict(os.environ, EDGELLM_DEBUG="")
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True,
                          input=input, env=env, timeout=300)


def assert_clean_error(r):
    assert r.returncode not in (0, -11, -6), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("edgellm: error:"), r.stderr[-2000:]


def test_cli_missing_file():
    assert_clean_error(cli("run", "/nonexistent/model.gguf", "-p", "hi", "-n", "2"))


def test_cli_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello, this is not a gguf file at all" * 10)
    assert_clean_error(cli("inspect", str(p)))


def test_cli_empty_and_truncated(tmp_path, model_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_clean_error(cli("inspect", str(empty)))
    data = model_path.read_bytes()
    for n in (4, 24, 1000, 500_000, len(data) // 2, len(data) - 1):
        p = tmp_path / f"trunc{n}.gguf"
        p.write_bytes(data[:n])
        assert_clean_error(cli("run", str(p), "-p", "hi", "-n", "2"))


def test_cli_unsupported_architecture(tmp_path):
    import gguf
    p = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_block_count(1)
    w.add_tensor("x.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    r = cli("run", str(p), "-p", "hi")
    assert_clean_error(r)
    assert "mamba" in r.stderr


def test_cli_prompt_longer_than_context(model_path):
    r = cli("run", str(model_path), "-p", "hello " * 200, "-n", "4", "--ctx", "64")
    assert_clean_error(r)
    assert "context" in r.stderr


def test_cli_bad_options(model_path):
    assert_clean_error(cli("run", str(model_path), "-p", "hi", "--temp", "-1"))
    assert_clean_error(cli("run", str(model_path), "-p", "hi", "--threads", "0"))
    assert_clean_error(cli("perplexity", str(model_path), "--file", "/nonexistent.txt"))


def _mutations(header_len: int, tensor_table: tuple[int, int], seed: int):
    """Seeded byte mutations of the header: bit flips, random bytes, extreme integers; a third of them
    aimed at the tensor table."""
    rng = np.random.default_rng(seed)
    for i in range(N_MUTATIONS):
        if i % 3 == 0:
            off = int(rng.integers(*tensor_table))
        elif i % 3 == 1:
            off = int(rng.integers(0, 4096))  # magic, counts, the model's hyper-parameters
        else:
            off = int(rng.integers(0, header_len))
        kind = i % 4
        if kind == 0:
            b = bytes([int(rng.integers(0, 256))])
        elif kind == 1:
            b = struct.pack("<Q", [0, 1, 2**31, 2**63 - 1, 2**64 - 1][int(rng.integers(0, 5))])
        elif kind == 2:
            b = struct.pack("<I", int(rng.integers(0, 2**32)))
        else:
            b = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        yield off, b


def test_mutated_header_loads_and_runs_or_fails_cleanly(tmp_path, model_path):
    """Hundreds of seeded mutations of the real file's header and tensor table: each either loads and
    generates, or raises EdgeLLMError (which the CLI prints as one line)."""
    p = tmp_path / "mutant.gguf"
    shutil.copyfile(model_path, p)
    f = GGUFFile(model_path)
    header_len = f.data_offset
    # the tensor table is the tail of the header: find where the first tensor name record starts
    first = next(iter(f.tensors))
    raw = model_path.open("rb").read(header_len)
    table_start = raw.rfind(struct.pack("<Q", len(first)) + first.encode())
    assert table_start > 0
    ran = failed = 0
    with open(p, "r+b") as fh:
        for off, b in _mutations(header_len, (table_start, header_len), seed=1234):
            orig = raw[off:off + len(b)]
            fh.seek(off); fh.write(b[:len(orig)]); fh.flush()
            try:
                eng = Engine(p, n_ctx=64, threads=2)
                toks = eng.tokenizer.encode("Hello", add_bos=None) or [0]
                logits = eng.prefill(toks)
                eng.decode(int(np.argmax(logits)))
                ran += 1
            except EdgeLLMError as e:
                assert "\n" not in str(e)
                failed += 1
            finally:
                fh.seek(off); fh.write(orig); fh.flush()
    print(f"mutations: {ran} loaded and ran, {failed} failed with a clear error")
    assert ran + failed == N_MUTATIONS
    assert failed > 0


def test_mutated_files_through_the_cli(tmp_path, model_path):
    """A few mutants through the real command: exit code and stderr as a user sees them."""
    data = bytearray(model_path.read_bytes()[:GGUFFile(model_path).data_offset + 4096])
    rng = np.random.default_rng(99)
    for i in range(6):
        m = bytearray(data)
        off = int(rng.integers(8, 64 if i < 3 else len(m)))
        m[off:off + 8] = struct.pack("<Q", 2**63 - 1)
        p = tmp_path / f"m{i}.gguf"
        p.write_bytes(bytes(m))
        assert_clean_error(cli("run", str(p), "-p", "hi", "-n", "2"))


# ---------------------------------------------------------------------------- memory checked before it is spent
def _limited(script: str, headroom_mb: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python after edgellm's imports, with the address space limited to what the process
    maps then + headroom_mb (an allocation past it fails at once instead of growing until the kernel kills)."""
    pre = ("import resource\n"
           "import edgellm.runtime.engine, edgellm.converters\n"
           "from edgellm.runtime.memory import _vm_size\n"
           f"lim = _vm_size() + ({headroom_mb} << 20)\n"
           "resource.setrlimit(resource.RLIMIT_AS, (lim, resource.getrlimit(resource.RLIMIT_AS)[1]))\n")
    return subprocess.run([sys.executable, "-c", pre + script], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, EDGELLM_DEBUG=""))


def _refused(imports: str, call: str, headroom_mb: int) -> str:
    """`call` (one line of Python, after `imports`) run under _limited must raise InsufficientMemoryError -> its
    message."""
    r = _limited(f"{imports}from edgellm.runtime.errors import InsufficientMemoryError\n"
                 f"try:\n    {call}\nexcept InsufficientMemoryError as e:\n    print('REFUSED', e)\n", headroom_mb)
    assert r.returncode == 0 and "REFUSED" in r.stdout, (r.stdout, r.stderr[-2000:])
    return r.stdout


def test_huge_context_is_refused_before_it_is_allocated(model_path):
    r = cli("run", str(model_path), "-p", "hi", "-n", "2", "--ctx", "100000000")
    assert_clean_error(r)
    assert "needs" in r.stderr and "available" in r.stderr and "smaller context" in r.stderr, r.stderr
    assert "q8_0" in r.stderr  # the smaller KV type is suggested for an f32 cache
    # under an address-space limit the check sees the limit, not the machine's memory
    msg = _refused("from edgellm.runtime.engine import Engine\n",
                   f"Engine({str(model_path)!r}, n_ctx=2_000_000, threads=1)", headroom_mb=1024)
    assert "available" in msg


def test_available_memory_respects_rlimit():
    r = _limited("from edgellm.runtime.memory import available_bytes\nprint(available_bytes())\n", headroom_mb=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0 < int(r.stdout) <= 300 << 20


def test_huge_layer_count_in_config_is_a_clear_error(tmp_path):
    import json
    src = fuzzkit.write_checkpoint(tmp_path / "ck", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**12
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("convert", str(src), "-o", str(tmp_path / "o.gguf"))
    assert_clean_error(r)
    assert "num_hidden_layers" in r.stderr and "config.json" in r.stderr
    # a value that is in range but disagrees with the tensors is an error too
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("convert", str(src), "-o", str(tmp_path / "o.gguf"))
    assert_clean_error(r)
    assert "num_hidden_layers = 3" in r.stderr and "2 layers" in r.stderr
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("imports, call, headroom_mb, word", [
    ("from edgellm.converters import convert_to_gguf\n", "convert_to_gguf({src!r}, {out!r}, 'f32')", 40,
     "converting"),
    # a variant's memory (teacher, student, training state) is checked before transformers loads the checkpoint
    ("from pathlib import Path\nfrom edgellm.converters.variant import check_variant\n",
     "check_variant(Path({src!r}), 'prune', 100, 4, 256)", 100, "prune"),
], ids=["gguf", "variant"])
def test_conversion_that_cannot_fit_is_refused_before_reading(tmp_path, imports, call, headroom_mb, word):
    src = fuzzkit.write_checkpoint(tmp_path / "ck", "llama")
    msg = _refused(imports, call.format(src=str(src), out=str(tmp_path / "o.gguf")), headroom_mb)
    assert word in msg
    assert not (tmp_path / "o.gguf").exists()
