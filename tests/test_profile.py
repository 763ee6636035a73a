"""bench/profile.py: the parts of a token add up, kernel calls are counted, and the instrumentation is removed."""
from __future__ import annotations

import gguf
import pytest
from numba.core.registry import CPUDispatcher

from tiny_models import write_tiny_llama
from edgellm.bench import profile as prof
from edgellm.kernels import ops
from edgellm.runtime import weights
from edgellm.runtime.engine import Engine


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.F32],
                         ids=["q4_1", "f32"])
def test_profile_of_a_tiny_llama(tmp_path, qtype):
    # Q4_1 layers and a Q8_0 embedding, as the default model: decoded by the compiled step where the CPU has it
    path = write_tiny_llama(tmp_path / "m.gguf", n_layer=2, n_embd=64, n_ff=96, qtype=qtype,
                            embd_qtype=gguf.GGMLQuantizationType.Q8_0 if qtype != gguf.GGMLQuantizationType.F32 else None)
    eng = Engine(path, n_ctx=64, threads=1)
    before = (weights.QMatrix.__dict__["matmul"], ops.rmsnorm, "__call__" in CPUDispatcher.__dict__)
    res = prof.profile(eng, n_prompt=6, n_gen=3)
    assert (weights.QMatrix.__dict__["matmul"], ops.rmsnorm, "__call__" in CPUDispatcher.__dict__) == before
    assert eng.fast is None or eng.fast.__class__.__name__ == "FastDecode"  # restored after the per-operation pass
    assert res["fast_step"] == (eng.fast is not None)
    if res["fast_step"]:
        assert res["decode"]["kernel_calls_per_token"] == 1  # one compiled call per token
        d = res["decode_per_operation"]
    else:
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
