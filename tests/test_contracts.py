"""The contracts of runtime/contracts.py, checked on every architecture and backend with tiny random models:
llama, bitnet, deci, deepseek2 (MLA), edgellm-linear (GGUF on the Numba kernels) and ONNX folders (optimum's past
key values; a recurrent state) on onnxruntime.

- prefill then decode == one prefill; a batched decode == single decodes
- a fork is independent of its parent; a fork of a prefix (into a used cache) == fork then truncate; truncate then
  re-run == the original
- snapshot / restore rebuilds a cache by copying: the same logits, bit for bit
"""
from __future__ import annotations

import numpy as np
import pytest

from edgellm.models.cache_spec import CacheSpec
from edgellm.runtime.contracts import Cache, Snapshot
from edgellm.runtime.engine import Engine, load
from edgellm.runtime.errors import CacheError
from tiny_models import ARCHS, write_tiny, write_tiny_hf_llama, write_tiny_onnx

CASES = ARCHS + ("onnx", "onnx-recurrent")
IDS = [int(x) for x in np.random.default_rng(0).integers(3, 250, 40)]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    return write_tiny_hf_llama(tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture(scope="module", params=CASES)
def backend(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param in ARCHS:
        path = write_tiny(d / "model.gguf", request.param)
    else:
        path = write_tiny_onnx(d / "onnx", request.getfixturevalue("hf_llama"), request.param == "onnx-recurrent")
    return load(path, n_ctx=64, threads=2)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-4 * max(1.0, float(np.abs(b).max())))


def test_declared_interface(backend):
    c = backend.new_cache()
    assert isinstance(c, Cache) and c.n == 0 and c.n_ctx == backend.n_ctx == 64
    assert backend.new_cache(16).n_ctx == 16
    assert c.nbytes_per_token == backend.kv_bytes_per_token >= 0
    assert isinstance(backend.attention_stats(), dict)
    if isinstance(backend, Engine):  # a GGUF model describes its cache, the runtime builds it
        assert isinstance(backend.model.cache_spec(), CacheSpec) and c.spec == backend.model.cache_spec()
    with pytest.raises(ValueError):
        backend.prefill([backend.cfg.n_vocab], c)  # token ids are checked
    assert c.n == 0


def test_prefill_then_decode_equals_one_prefill(backend):
    full = backend.prefill(IDS, backend.new_cache(), logits="all")
    assert full.shape == (len(IDS), backend.cfg.n_vocab) and np.isfinite(full).all()
    c = backend.new_cache()
    close(backend.prefill(IDS[:25], c), full[24])
    for i in range(25, len(IDS)):
        close(backend.decode(IDS[i], c), full[i])
    assert c.n == len(IDS)
    # a long prompt in chunks == at once
    close(backend.prefill(IDS, backend.new_cache(), logits="all", chunk=7), full)


def test_batched_decode_equals_single_decodes(backend):
    caches = [backend.new_cache() for _ in range(3)]
    for n, c in zip((5, 17, 11), caches):
        backend.prefill(IDS[:n], c)
    forks = [c.fork() for c in caches]
    toks = [IDS[5], IDS[17], IDS[11]]
    batched = backend.decode_batch(toks, caches)
    assert batched.shape == (3, backend.cfg.n_vocab)
    for row, t, f in zip(batched, toks, forks):
        close(row, backend.decode(t, f))
    assert [c.n for c in caches] == [6, 18, 12]


def test_fork_is_independent_of_its_parent(backend):
    parent = backend.new_cache()
    backend.prefill(IDS[:12], parent)
    before = parent.snapshot(0, 12)
    child = parent.fork()
    assert child.n == 12
    backend.prefill(IDS[20:26], child)  # the child diverges
    assert child.n == 18 and parent.n == 12
    after = parent.snapshot(0, 12)
    assert all(np.array_equal(a, b) for a, b in zip(before.rows + before.state, after.rows + after.state))
    # the parent continues as if the child had never run
    fresh = backend.new_cache()
    backend.prefill(IDS[:12], fresh)
    np.testing.assert_array_equal(backend.prefill(IDS[12:14], parent), backend.prefill(IDS[12:14], fresh))


def test_fork_of_a_prefix_into_a_used_cache(backend):
    # fork(n) == fork() then truncate(n), copying only what is kept; fork(n, into=c) reuses an emptied cache
    c = backend.new_cache()
    backend.prefill(IDS[:30], c)
    k = 20 if c.can_truncate(20) else 30  # (a recurrent state: all or nothing)
    ref = c.fork()
    ref.truncate(k)
    spare = backend.new_cache()
    backend.prefill(IDS[3:40], spare)
    spare.truncate(0)  # its memory still holds another sequence
    want = backend.prefill(IDS[k:k + 3], ref.fork())
    for dst in (c.fork(k), c.fork(k, into=spare)):
        assert dst.n == k and c.n == 30 and dst is not c
        np.testing.assert_array_equal(backend.prefill(IDS[k:k + 3], dst), want)
    assert dst is spare
    empty = c.fork(0)
    assert empty.n == 0
    np.testing.assert_array_equal(backend.prefill(IDS[:4], empty), backend.prefill(IDS[:4], backend.new_cache()))
    whole = c.fork(into=spare.fork(0))  # (a fork of nothing is an empty cache to copy into)
    np.testing.assert_array_equal(backend.prefill(IDS[30:32], whole), backend.prefill(IDS[30:32], c))
    for bad in (dict(n=c.n + 1), dict(n=k, into=spare), dict(n=k, into=backend.new_cache(16))):
        with pytest.raises(CacheError):
            c.fork(**bad)  # more than it holds; a cache that is not empty; one too small
    if not c.can_truncate(5):
        with pytest.raises(CacheError):
            c.fork(5)


def test_truncate_then_rerun_equals_the_original(backend):
    c = backend.new_cache()
    want = backend.prefill(IDS[:30], c)
    if c.can_truncate(20):
        c.truncate(20)
        assert c.n == 20
        close(backend.prefill(IDS[20:30], c), want)
    else:  # a recurrent state goes back only to the start
        with pytest.raises(CacheError):
            c.truncate(20)
        assert c.n == 30 and c.can_truncate(0) and c.can_truncate(30)
    c.truncate(0)
    assert c.n == 0
    close(backend.prefill(IDS[:30], c), want)
    with pytest.raises(CacheError):
        c.truncate(31)


def test_snapshot_restore_equals_the_original(backend):
    c = backend.new_cache()
    backend.prefill(IDS[:10], c)
    s1 = c.snapshot(0, 10)
    backend.prefill(IDS[10:21], c)
    s2 = c.snapshot(10, 21)
    assert isinstance(s1, Snapshot) and (s2.start, s2.stop) == (10, 21) and s2.nbytes > 0
    r = backend.new_cache()
    assert r.restore([s1, s2]) == 21 == r.n
    np.testing.assert_array_equal(backend.decode(IDS[21], r), backend.decode(IDS[21], c))
    np.testing.assert_array_equal(backend.decode(IDS[22], r), backend.decode(IDS[22], c))
    with pytest.raises(CacheError):
        r.restore([s1])  # not empty
    with pytest.raises(CacheError):
        backend.new_cache().restore([s2])  # not from position 0


def test_each_engine_runs_on_its_own_thread_count(tmp_path, monkeypatch):
    """Constructing an engine changes no other engine's (nor the caller's) thread count; each call runs on its
    engine's count, from any thread (the server calls from a scheduler thread)."""
    import threading

    import numba
    path = write_tiny(tmp_path / "llama.gguf", "llama")
    before = numba.get_num_threads()
    two = Engine(path, n_ctx=32, threads=2)
    one = Engine(path, n_ctx=32, threads=1)
    assert numba.get_num_threads() == before and (one.threads, two.threads) == (1, min(2, numba.config.NUMBA_NUM_THREADS))
    seen = []
    for eng in (one, two):
        forward = eng.model.forward
        monkeypatch.setattr(eng.model, "forward", lambda *a, _f=forward, **k: seen.append(numba.get_num_threads())
                            or _f(*a, **k))
    one.prefill(IDS[:4], one.new_cache())
    two.decode_batch(IDS[:2], [two.new_cache(), two.new_cache()])
    worker = threading.Thread(target=lambda: one.decode(IDS[0], one.new_cache()))
    worker.start()
    worker.join()
    assert seen == [1, two.threads, 1] and numba.get_num_threads() == before
    # the entry point load() makes the engine's count the default of the thread that calls it
    got = []
    worker = threading.Thread(target=lambda: (load(path, n_ctx=32, threads=1), got.append(numba.get_num_threads())))
    worker.start()
    worker.join()
    assert got == [1] and numba.get_num_threads() == before
