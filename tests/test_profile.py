"""bench/profile.py: the parts of a token add up, kernel calls are counted, and the instrumentation is removed."""
from __future__ import annotations

import gguf
import pytest
from numba.core.registry import CPUDispatcher

from conftest import write_tiny_llama
from edgellm.bench import profile as prof
from edgellm.kernels import ops
from edgellm.runtime import weights
from edgellm.runtime.engine import Engine


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32],
                         ids=["q4_0", "f32"])
def test_profile_of_a_tiny_llama(tmp_path, qtype):
    path = write_tiny_llama(tmp_path / "m.gguf", n_layer=2, n_embd=64, n_ff=96, qtype=qtype)
    eng = Engine(path, n_ctx=64, threads=1)
    before = (weights.QMatrix.__dict__["matmul"], ops.rmsnorm, "__call__" in CPUDispatcher.__dict__)
    res = prof.profile(eng, n_prompt=6, n_gen=3)
    assert (weights.QMatrix.__dict__["matmul"], ops.rmsnorm, "__call__" in CPUDispatcher.__dict__) == before
    d = res["decode"]
    assert d["tokens"] == 3 and abs(sum(d["parts_ms"].values()) - d["ms_per_token"]) < 1e-6 * d["ms_per_token"] + 1e-9
    assert all(v >= 0 for v in d["parts_ms"].values())
    # per layer: qkv, output, gate|up, down products, and the head: each one compiled kernel call (F32: BLAS)
    if qtype != gguf.GGMLQuantizationType.F32:
        assert d["calls_per_token"]["mat-vec"] >= 4 * 2 + 1
    assert d["calls_per_token"]["norm/rope/act"] >= 2 * 2 + 1  # two norms per layer and the final one at least
    assert d["kernel_calls_per_token"] == sum(d["calls_per_token"].values())
    assert {"attn_q.weight+attn_k.weight+attn_v.weight", "ffn_down.weight"} <= set(d["matrices"])
    b = res["bytes_per_token"]
    assert b["weights"] == eng.weight_bytes_per_token and b["kv"] > 0
    res.update(model="m.gguf", threads=1, isa=None, bandwidth_gbs=10.0)
    text = prof.format_report(res)
    assert "mat-vec" in text and "of the measured 10.0 GB/s" in text
