"""The compiled decode step (kernels/decode_step.py) of an engine's model, when its weights and caches allow it:
one call from Python per decode step, for one sequence or a batch. The model's own forward (models/) stays the
reference and the fallback: `FastDecode.build` returns None (with the reason in `why_not`) for what the step does
not cover, and `accepts` declines caches it cannot take (delta attention, another model's cache, a quantized cache
whose centring offsets the first token has not yet fixed).

Covered: Llama, Deci (per-layer widths) and BitNet, with every layer matrix in one integer-kernel format
(Q4_0, Q4_1, Q8_0; BitNet: ternary), the embedding and output head in an integer-kernel format, dense attention
over KV caches of any storage type (f32, f16, q8_0, q4_0; rotated and centred as the cache keeps them).
"""
from __future__ import annotations

import threading
import weakref

import numba
import numpy as np

from ..kernels import decode_step as ds
from ..kernels import q8act
from ..kernels.ternary_i2 import TernaryI2Matrix
from ..models.bitnet import BitNet
from ..models.deci import Deci
from ..models.llama import Llama
from .kv_cache import DECODE, KVCache, parse_kv
from .weights import QMatrix

def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def cache_addresses(c: KVCache) -> np.ndarray:
    """The data addresses of one cache's per-layer arrays: its rows (B of them) of the step's `addr`. They hold
    until the cache reallocates its arrays (it grows: `c.version` changes)."""
    L = c.n_layer
    t = np.empty((ds.N_ADDR, L), dtype=np.int64)
    for j, arr in ((ds.K_DATA, c.k), (ds.K_SCALES, c.k_scales), (ds.V_DATA, c.v), (ds.V_SCALES, c.v_scales),
                   (ds.K_MEAN, c.k_mean), (ds.V_MEAN, c.v_mean)):
        for li in range(L):
            layer = arr[li]
            if not layer.flags.c_contiguous:
                raise ValueError("cache arrays must be contiguous")
            t[j, li] = _addr(layer)
    return t


class FastDecode:
    """The arrays of a model for its compiled decode step, gathered once at load."""

    why_not: str = ""

    @classmethod
    def build(cls, engine) -> "FastDecode | None":
        """The fast step of this engine, or None (the reason in FastDecode.why_not)."""
        try:
            return cls(engine)
        except _NotCovered as e:
            cls.why_not = str(e)
            return None

    def __init__(self, engine):
        m = engine.model
        if type(m) not in (Llama, Deci, BitNet):
            raise _NotCovered(f"architecture {m.arch}")
        if engine.attn.kind != "dense":
            raise _NotCovered(f"{engine.attn.kind} attention")
        self.model, self.engine = m, engine
        bitnet = isinstance(m, BitNet)
        mats = [[L.attn.qkv, L.attn.wo, L.ffn.gate_up, L.ffn.down] for L in m.layers]
        kind = TernaryI2Matrix if bitnet else QMatrix
        if not all(type(x) is kind for row in mats for x in row):
            raise _NotCovered("layer matrices not all on the integer kernels of one kind")
        if bitnet:
            fmt, isa = "tq2", mats[0][0].isa
        else:
            fmt, isa = mats[0][0].fmt, mats[0][0].isa
            if fmt is None or any(x.fmt != fmt for row in mats for x in row):
                raise _NotCovered("layer matrices not all in one integer format")
        if any(x.isa != isa for row in mats for x in row):
            raise _NotCovered("matrices on different instruction sets")
        for name, x in (("embedding", m.tok_embd), ("output head", m.output)):
            if type(x) is not QMatrix or x.fmt is None or x.isa != isa:
                raise _NotCovered(f"{name} not on the integer kernels")
        f = q8act.FORMATS[m.tok_embd.fmt]
        emb = (m.tok_embd.fmt != "q8_0", {"q4_0": 8, "q4_1": 0, "q8_0": 128}[m.tok_embd.fmt], f.has_min, f.code_bytes)
        c = m.cfg
        self.widths = np.array(m.widths, dtype=np.int64)  # (H, Hkv, n_ff) per layer
        self.kv = parse_kv(engine.kv)
        self.relu2 = bitnet and m.act == "relu2"
        self.key = (isa, fmt, m.output.fmt, emb, bitnet, self.relu2, self.kv)
        self.step = ds.step_kernel(*self.key)
        hd = c.head_dim
        # the matrices by address (kernels/decode_step.py's wtab); self.keep holds every array addressed
        self.keep = []
        self.wtab = np.zeros((c.n_layer, 4, 6), dtype=np.int64)
        for li, row in enumerate(mats):
            for j, x in enumerate(row):
                if not x.W.flags.c_contiguous:
                    raise _NotCovered("records not contiguous")
                self.wtab[li, j, :4] = (_addr(x.W),) + x.W.shape
                self.keep.append(x.W)
                if bitnet:
                    rs = np.ascontiguousarray(x.scale, dtype=np.float32)
                    self.wtab[li, j, 4:] = (_addr(rs), len(rs))
                    self.keep.append(rs)
        if bitnet:
            self.attn_sub = np.stack([L.attn.sub_norm for L in m.layers])
            self.ffn_sub = np.stack([L.ffn.sub_norm for L in m.layers])
        else:
            self.attn_sub = self.ffn_sub = np.zeros((c.n_layer, 0), dtype=np.float32)
        self.attn_norm = np.stack([L.attn.norm for L in m.layers])
        self.ffn_norm = np.stack([L.ffn.norm for L in m.layers])
        H, Hkv, F = self.widths.max(0)
        self.max_rows = int(max(((self.widths[:, 0] + 2 * self.widths[:, 1]) * hd).max(), 2 * F, c.n_embd))
        self.max_att = int(max(H * hd, F))
        self.max_in = int(max(c.n_embd, H * hd, F))
        self.dims = (int(H), int(Hkv), hd)
        self._state: dict = {}
        self._addrs = weakref.WeakKeyDictionary()  # cache -> (its version, address table); not keeping it alive
        self._lock = threading.Lock()  # the run-state buffers are shared: one step at a time

    # ------------------------------------------------------------------ per call
    def accepts(self, caches) -> bool:
        """Whether the step can run on these caches (else the model's forward runs)."""
        for c in caches:
            if type(c) is not KVCache or c.attn.kind != "dense" or c.recorder is not None \
                    or (c.type_k, c.type_v) != self.kv or c.spec != self.engine.spec:
                return False
            if (c.center_k or c.center_v) and c.n == 0:  # the first token fixes the offsets: the forward does that
                return False
        c0 = caches[0]
        flags = (c0.rot_k, c0.rot_v, c0.center_k, c0.center_v)
        return all((c.rot_k, c.rot_v, c.center_k, c.center_v) == flags for c in caches)

    def _buffers(self, B: int):
        st = self._state.get(B)
        if st is None:
            c = self.model.cfg
            H, Hkv, hd = self.dims
            f32 = np.float32
            nb = self.max_in // 32 + 1
            st = self._state[B] = dict(
                x=np.empty((B, c.n_embd), f32), h=np.empty((B, c.n_embd), f32), big=np.empty(B * self.max_rows, f32),
                att=np.empty(B * self.max_att, f32), q=np.empty((B, H, hd), f32), k=np.empty((B, Hkv, hd), f32),
                v=np.empty((B, Hkv, hd), f32), qbuf=np.empty(B * self.max_in, np.int8),
                dbuf=np.empty(B * nb, f32), sbuf=np.empty(B * nb, np.int32), tokscale=np.empty(B, f32))
        return st

    def _table(self, c: KVCache) -> np.ndarray:
        vt = self._addrs.get(c)
        if vt is None or vt[0] != c.version:
            vt = self._addrs[c] = (c.version, cache_addresses(c))
        return vt[1]

    def run(self, tokens: np.ndarray, caches: list) -> np.ndarray:
        """tokens (B,) int64, one per cache (checked by the engine) -> logits (B, n_vocab); each cache advances."""
        with self._lock:
            return self._run(tokens, caches)

    def _run(self, tokens: np.ndarray, caches: list) -> np.ndarray:
        m, c = self.model, self.model.cfg
        B = len(caches)
        pos = np.array([x.n for x in caches], dtype=np.int64)
        m.ensure_rope(int(pos.max()) + 1)
        for x in caches:  # the step writes position n of each cache: allocated before its addresses are taken
            x.reserve(x.n + 1)
        addr = np.stack([self._table(x) for x in caches])
        cap = np.array([x.cap for x in caches], dtype=np.int64)
        c0 = caches[0]
        flags = np.array([c0.rot_k, c0.rot_v, c0.center_k, c0.center_v], dtype=np.bool_)
        st = self._buffers(B)
        logits = np.empty((B, c.n_vocab), dtype=np.float32)
        self.step(np.ascontiguousarray(tokens, dtype=np.int64), pos, m.tok_embd.W, self.attn_norm, self.ffn_norm,
                  self.wtab, self.widths, self.attn_sub, self.ffn_sub, m.output_norm, m.output.W,
                  m.rope_cos, m.rope_sin, c.rope_dim, c.head_dim, c.norm_eps, m.scale,
                  addr, cap, flags, st["x"], st["h"], st["big"], st["att"], st["q"], st["k"],
                  st["v"], st["qbuf"], st["dbuf"], st["sbuf"], st["tokscale"], logits, 4 * numba.get_num_threads())
        for x in caches:
            x.n += 1
            x.stats.calls[DECODE] += c.n_layer
        return logits


class _NotCovered(Exception):
    pass
