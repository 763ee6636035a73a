"""Decode speed with a JSON schema active against free decoding, and the time spent computing token masks.

    python -m edgellm.bench.structured [--model M] [--tokens 128] [--reps 5] [--threads 2] [--json]

Each repetition decodes `tokens` tokens from the same chat prompt in three ways, interleaved so that a busy
machine slows them alike: free (no constraint), constrained (the schema below; the next mask computed on a
background thread while the forward pass runs) and constrained without that overlap (the mask computed after the
logits arrive). The schema asks for a long array of records, so constrained decoding never finishes before
`tokens`; free decoding runs the same number of tokens (end-of-generation tokens are decoded through). One warm-up
run of each (JIT, llguidance's vocabulary and lexer) is discarded; medians are reported. The goal is constrained
>= 0.9x free. Mask ms/token is the time llguidance spends per mask; wait ms/token is what the decode loop waited
for it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from ..runtime.constraints import compile_constraint, json_schema_spec
from ..runtime.engine import load
from ..runtime.generate import GenerationStats, generate_step
from ..runtime.sampling import Sampler, SamplerSettings

SCHEMA = {"type": "object", "properties": {
    "people": {"type": "array", "minItems": 60, "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "skills": {"type": "array", "items": {"enum": ["python", "rust", "cooking", "chess", "music"]},
                   "maxItems": 3}},
        "required": ["name", "age", "city", "skills"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False}
PROMPT = "List many people as JSON: name, age, city and skills of each."


def run_once(eng, ids, tokens: int, mode: str, seed: int) -> dict:
    """One decode of `tokens` tokens; mode "free", "constrained" or "sync" (constrained, no overlap)."""
    constraint = None
    if mode != "free":
        constraint = compile_constraint(eng.tokenizer, json_schema_spec(SCHEMA), n_vocab=eng.cfg.n_vocab)
        constraint.overlap = mode == "constrained"
    st = GenerationStats()
    sampler = Sampler(SamplerSettings(temp=0.7, seed=seed))
    n = 0
    for _ in generate_step(eng, ids, sampler, tokens, cache=eng.new_cache(), stats=st, constraint=constraint):
        n += 1
    if n != tokens:
        raise RuntimeError(f"{mode}: decoded {n} of {tokens} tokens (the schema should outlast the run)")
    return {"tps": st.decode_tps, "mask_ms": 1000 * st.mask_seconds / n if constraint else 0.0,
            "wait_ms": 1000 * st.mask_wait_seconds / n if constraint else 0.0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="A .gguf path or catalog name (default: the default model).")
    ap.add_argument("--tokens", type=int, default=128, help="Tokens decoded per run.")
    ap.add_argument("--reps", type=int, default=5, help="Measured repetitions (after one warm-up).")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="Print one JSON line.")
    a = ap.parse_args(argv)
    if a.tokens < 2 or a.reps < 1:
        ap.error("--tokens must be >= 2 and --reps >= 1")
    eng = load(a.model, threads=a.threads, n_ctx=1024)
    prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    ids = eng.tokenizer.encode(prompt, add_bos=None, parse_special=True)
    modes = ("free", "constrained", "sync")
    t0 = time.perf_counter()
    for m in modes:  # warm-up
        run_once(eng, ids, a.tokens, m, seed=0)
    res = {m: [] for m in modes}
    for r in range(a.reps):
        for m in modes:
            res[m].append(run_once(eng, ids, a.tokens, m, seed=r + 1))
    med = {m: {k: statistics.median(x[k] for x in res[m]) for k in ("tps", "mask_ms", "wait_ms")} for m in modes}
    out = {"model": str(eng.path.name), "threads": eng.threads, "tokens": a.tokens, "reps": a.reps,
           "free_tps": med["free"]["tps"], "constrained_tps": med["constrained"]["tps"],
           "sync_tps": med["sync"]["tps"], "ratio": med["constrained"]["tps"] / med["free"]["tps"],
           "sync_ratio": med["sync"]["tps"] / med["free"]["tps"], "mask_ms_per_token": med["constrained"]["mask_ms"],
           "wait_ms_per_token": med["constrained"]["wait_ms"], "sync_wait_ms_per_token": med["sync"]["wait_ms"],
           "seconds": round(time.perf_counter() - t0, 1)}
    if a.json:
        print(json.dumps(out))
        return
    print(f"{out['model']}, {out['threads']} threads, {a.tokens} tokens x {a.reps} reps (medians):")
    print(f"  free                   {out['free_tps']:7.1f} tok/s")
    print(f"  JSON schema, overlap   {out['constrained_tps']:7.1f} tok/s  ({out['ratio']:.2f}x)  "
          f"mask {out['mask_ms_per_token']:.3f} ms/token, waited {out['wait_ms_per_token']:.3f} ms/token")
    print(f"  JSON schema, in line   {out['sync_tps']:7.1f} tok/s  ({out['sync_ratio']:.2f}x)  "
          f"waited {out['sync_wait_ms_per_token']:.3f} ms/token")


if __name__ == "__main__":
    main()
