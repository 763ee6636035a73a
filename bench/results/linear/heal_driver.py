import torch, copy, time, json, sys
torch.set_num_threads(2)
from tokenizers import Tokenizer
from edgellm.converters.variant import load_teacher, tokenize_windows, perplexity, Context, variants, distill, n_params
from edgellm.converters import linear as L
n1, n2, seq, fm = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
budget = {"heal-attn": float(sys.argv[5]), "heal-kl": float(sys.argv[6])}
class Stop(Exception): pass
stage_t0 = {}
src = "/work/ckpt/smollm2-135m"
ckpt, teacher = load_teacher(src); teacher.requires_grad_(False)
tok = Tokenizer.from_file(src + "/tokenizer.json")
calib = tokenize_windows(tok, open("/tmp/lin/calib.txt").read(), seq)
ev = tokenize_windows(tok, open("/tmp/lin/eval.txt").read(), 256, 8)
T0 = time.time()
done = {}
def prog(stage, i, n):
    stage_t0.setdefault(stage, time.time()); done[stage] = i
    if time.time() - stage_t0[stage] > budget[stage]: raise Stop()
    if True: print(f"{time.time()-T0:7.0f}s {stage} {i}/{n}", flush=True)
ctx = Context(teacher=teacher, calib=calib, heal_steps=n1 + n2, batch=4, log=print, progress=prog)
v = variants()["linear"](feature_map=fm)
r = dict(feature_map=fm, seq_len=seq, calib_windows=int(calib.shape[0]), eval_tokens=int(ev.numel()),
         params_original=n_params(teacher), ppl_original=perplexity(teacher, ev))
print(r, flush=True)
st = v.transform(copy.deepcopy(teacher).requires_grad_(True), ctx)
r.update(params=n_params(st), state_bytes=L.state_bytes(st.linear_config), ppl_before=perplexity(st, ev))
print(r, flush=True)
t = time.time()
try: l1 = L.match_attention(st, ctx, n1)
except Stop: l1 = []
st.eval(); r["stage1_s"] = time.time() - t; r["stage1_steps"] = done.get("heal-attn", 0)
r["stage1_loss"] = [l1[0], sum(l1[-5:]) / 5] if l1 else []
r["ppl_after_stage1"] = perplexity(st, ev); print(r, flush=True)
torch.save(st.state_dict(), f"/tmp/lin/student_{fm}_s1.pt")
t = time.time()
try: l2 = distill(st, ctx, n2, params=L.attention_params(st), stage="heal-kl")
except Stop: l2 = []
st.eval(); r["stage2_s"] = time.time() - t; r["stage2_steps"] = done.get("heal-kl", 0)
r["stage2_loss"] = [l2[0], sum(l2[-5:]) / 5] if l2 else []
r["ppl_after_stage2"] = perplexity(st, ev); print(r, flush=True)
torch.save(st.state_dict(), f"/tmp/lin/student_{fm}.pt")
for ot in ("f16",):
    L.write_linear_gguf(st, ckpt, __import__("pathlib").Path(f"/tmp/lin/smol-linear-{fm}-{ot}.gguf"), ot)
r["seconds"] = time.time() - T0
json.dump(r, open(f"/tmp/lin/heal_{fm}.json", "w"), indent=1); print(r, flush=True)
