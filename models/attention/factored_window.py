"""Tensor Cache with a factored (TPA) window (docs/design.md#a-factored-window).

q, k, v come from TPA's contextual factors, ranks R_q, R_k, R_v (rank_q None: a plain query
projection, as TPA-KVonly), nothing rotated yet:
    K_t = (1/R_k) sum_s a^k_s(x_t) (outer) b^k_s(x_t),   likewise V (R_v) and Q (R_q).
Everything after the projections is the Tensor Cache: L1 softmax over the last W positions (and
the sinks) with RoPE at absolute positions; L2 fed by the pairs leaving the window, un-rotated q,
normalised k, the variant's write rule; o = o1 + sigmoid(gate_h) * o2.

Training runs the Tensor Cache forward on the materialised q, k, v. The ring holds each window
token's factors only, one row [a_s | b_s] per rank, b^k un-rotated (rotated when read, so the
evicted key is the one training writes to L2). Decode (T = 1, no sinks) scores the window straight
from the factors (kernels.tpa_decode), materialises the pair leaving the window from its row and
writes it to L2 through the Tensor Cache's delay-0 scan: torch (plus tpa_decode's Triton kernel
on CUDA), not the fused tc_decode step. Prefill, and any call with sinks, materialises the ring's
rows and runs the Tensor Cache's prefill on them.
Cache per layer: (R_k + R_v)(h + d_h)(n + W) + h d_h^2 elements, constant in T.
"""
from __future__ import annotations

import torch

from kernels.tpa_decode import tpa_decode

from ..cache import RingCache, StateCache, TwoLevelCache
from ..rope import apply_rope, rope_cos_sin
from .base import split_heads
from .tensor_cache import TensorCacheAttention
from .tpa import TensorProductAttention, factor_projections, plain_query_factors


class FactoredWindowAttention(TensorCacheAttention):
    factors = TensorProductAttention.factors  # a (B, T, R, h), b (B, T, R, d_h), b rotated if asked
    materialise = TensorProductAttention.materialise  # (1/R) sum_r a_r (outer) b_r -> (B, h, T, d_h)

    def __init__(self, cfg):
        super().__init__(cfg)  # the Tensor Cache's window, L2 memory, gate and output projection
        f = cfg.attention.factors
        self.ranks = {"k": f.rank_k, "v": f.rank_v} | ({"q": f.rank_q} if f.rank_q else {})
        del self.k_proj, self.v_proj  # k and v come from factors, and q too when rank_q is set
        if f.rank_q:
            self.q_proj = None
        self.a_proj, self.b_proj = factor_projections(cfg.d_model, self.h, self.d_h, self.ranks)

    def query(self, x):
        """Un-rotated q (B, h, T, d_h): the plain projection, or materialised from its factors."""
        if self.q_proj is not None:
            return split_heads(self.q_proj(x), self.h)
        return self.materialise(*self.factors(x, "q"))

    def project(self, x):
        """q, k, v (B, h, T, d_h) materialised from the factors, nothing rotated yet: what the
        Tensor Cache's training forward runs on."""
        return self.query(x), self.materialise(*self.factors(x, "k")), self.materialise(*self.factors(x, "v"))

    def rows(self, x, name: str):
        """The factors the ring keeps of each new token: (B, R, T, h + d_h), row s = [a_s | b_s]."""
        return torch.cat(self.factors(x, name), dim=-1).transpose(1, 2)

    def unpack(self, rows):
        """(B, R, L, h + d_h) rows -> a (B, L, R, h), b (B, L, R, d_h)."""
        return rows.transpose(1, 2).split([self.h, self.d_h], dim=-1)

    def ring_pairs(self, k, v):
        """Key and value factor rows -> the un-rotated pairs they stand for, (B, h, L, d_h)."""
        return self.materialise(*self.unpack(k)), self.materialise(*self.unpack(v))

    def decode_window(self, x, pos: int, ring: RingCache):
        """One token's L1 straight from the factors (TPA decode over positions pos-W+1 .. pos),
        the ring shifted; returns (o1 (B, h, 1, d_h), un-rotated q, the pair that left)."""
        B = x.shape[0]
        k_rows, v_rows = self.rows(x, "k"), self.rows(x, "v")
        update = ring.update(k_rows, v_rows)  # rows of positions pos-W .. pos; row 0 leaves
        first = max(1, self.W - pos)  # slots at negative positions were never filled
        cos, sin = rope_cos_sin(torch.arange(pos - self.W + first, pos + 1, device=x.device), self.d_h,
                                self.rope_base, x.dtype)
        a_k, b_k = self.unpack(update.keys[:, :, first:])
        a_v, b_v = self.unpack(update.values[:, :, first:])
        if self.q_proj is None:
            a_q, b_q = self.factors(x, "q")
        else:  # the plain query as h rank-one factors h e_j (outer) q_j (R_q = h), as TPA-KVonly
            a_q = plain_query_factors(self.h, B, 1, x.dtype, x.device)
            b_q = self.q_proj(x).view(B, 1, self.h, self.d_h)
        q = self.materialise(a_q, b_q)  # L2 reads the un-rotated query
        b_q = apply_rope(b_q, cos[-1:, None], sin[-1:, None])
        b_k = apply_rope(b_k, cos[:, None], sin[:, None])
        o1 = tpa_decode(a_q[:, 0], b_q[:, 0], a_k, b_k, a_v, b_v)[:, :, None]
        return o1, q, self.ring_pairs(update.evicted_keys, update.evicted_values)

    def forward(self, x, pos: int, cache: TwoLevelCache | None = None):
        if cache is None:  # training: the Tensor Cache's parallel form on project()'s q, k, v
            return super().forward(x, pos)
        if x.shape[1] == 1 and not self.sinks:
            o1, q, evicted = self.decode_window(x, pos, cache.ring)
        else:  # the ring's rows materialised (ring_pairs), then the Tensor Cache's window
            q = self.query(x)
            o1, evicted = self.window_attention(q, self.rows(x, "k"), self.rows(x, "v"), pos, cache.ring)
        return self.fuse(o1, self.serve_l2(q, evicted, pos, cache.memory))

    def init_cache(self, batch_size, device, dtype) -> TwoLevelCache:
        ring = RingCache(batch_size, self.ranks["k"], self.W, self.h + self.d_h, device, dtype,
                         sinks=self.sinks, value_heads=self.ranks["v"])
        memory = StateCache((batch_size, self.h, self.d_h, self.d_h), device, dtype)
        return TwoLevelCache(ring, memory)

    def cache_elements(self, context_len: int) -> int:
        window = (self.ranks["k"] + self.ranks["v"]) * (self.h + self.d_h) * (self.sinks + self.W)
        return window + self.h * self.d_h * self.d_h
