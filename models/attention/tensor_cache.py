"""Tensor Cache (docs/design.md#tensor-cache): L1 sliding window + L2 outer-product memory.

L2 is fed ONLY by pairs evicted from the window: token i is written at step t = i + W,
    A_t = lam A_{t-1} + eta k_{t-W}^T v_{t-W},    o2_t = q_t A_t,
with un-rotated q and (L2-normalised) k. Fusion: o = o1 + sigmoid(gate_h) * o2.
`write: delta` writes the prediction error instead (eta = sigmoid(.) in (0, 1)):
    A_t = lam A_{t-1} + eta k_{t-W}^T (v_{t-W} - k_{t-W} A_{t-1}).
Training uses the chunked scan of the write (`exact` or `delta`) or the chunked-mean ablation
(`write: chunk_mean`); decode is always the per-token write, exact or delta (one token at a time
through the fused step of kernels.tc_decode; a prefill through the scan with the delay made
explicit).
With `sinks: n`, positions i < n stay in L1 for good and are never written to L2 (zeroed in the
stream L2 sees); decode then takes the unfused path (window attention over [sinks; ring; new],
the scan with delay 0 on the evicted pair).
State per layer: ring 2 * g * d_h * (n + W) + L2 h * d_h * d_h elements, constant in T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.l2_scan import evicted_scan
from kernels.tc_decode import tc_decode

from ..cache import StateCache, TwoLevelCache
from ..rope import rope_cos_sin
from .base import DecayWriteRate, merge_heads, repeat_kv
from .swa import SlidingWindowAttention


class TensorCacheAttention(SlidingWindowAttention):
    def __init__(self, cfg):
        super().__init__(cfg)
        a = cfg.attention
        self.C, self.write, self.normalize_k = a.chunk_size, a.write, a.normalize_k
        self.memory = DecayWriteRate(self.h, "sigmoid" if self.write == "delta" else "softplus")
        self.serve_mode = "delta" if self.write == "delta" else "exact"  # chunk_mean serves exact
        self.gate = nn.Parameter(torch.full((self.h,), a.gate_init))

    def l2_pairs(self, k, v, first: int):
        """(B, g, T, d_h) un-rotated pairs at positions first, first+1, ... -> per query head,
        keys normalised; sinks (positions < n) zeroed: a sink never enters L2."""
        sinks = min(max(self.sinks - first, 0), k.shape[2])
        if sinks:
            k, v = (F.pad(x[:, :, sinks:], (0, 0, sinks, 0)) for x in (k, v))
        if self.normalize_k:
            k = F.normalize(k, dim=-1)
        n_rep = self.h // self.g
        return repeat_kv(k, n_rep), repeat_kv(v, n_rep)

    def decode_step(self, q, k, v, pos: int, cache: TwoLevelCache):
        """One token (T = 1) through the fused step (kernels.tc_decode: window attention, L2
        write of the pair leaving the window, L2 read); then the ring shifts the new pair in."""
        cos, sin = rope_cos_sin(torch.arange(pos - self.W, pos + 1, device=q.device), self.d_h,
                                self.rope_base, q.dtype)
        lam, eta = self.memory()
        ring = cache.ring
        o = tc_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], ring.k, ring.v, cache.memory.state, cos, sin,
                      lam, eta, torch.sigmoid(self.gate), pos, self.normalize_k,
                      delta=self.serve_mode == "delta")
        ring.update(k, v)  # the kernel wrote the leaving pair into L2 already
        return o[:, :, None]

    def serve_l2(self, q, evicted, pos: int, memory: StateCache):
        """L2 of a call with a cache, o2 (B, h, T, d_h): the pairs the ring handed back (positions
        pos-W .. pos+T-1-W) left the window at steps pos .. pos+T-1, so this is the scan with
        delay 0 on them from the cached A, with the per-token write; A is written back in place."""
        lam, eta = self.memory()
        k2, v2 = self.l2_pairs(*evicted, pos - self.W)
        o2, A = evicted_scan(q, k2, v2, lam, eta, window=0, chunk_size=self.C, mode=self.serve_mode,
                             initial_state=memory.state, output_final_state=True)
        memory.write_(A)
        return o2

    def fuse(self, o1, o2):
        """o = o1 + sigmoid(gate_h) o2, then the output projection."""
        return self.o_proj(merge_heads(o1 + torch.sigmoid(self.gate)[None, :, None, None] * o2))

    def forward(self, x, pos: int, cache: TwoLevelCache | None = None):
        T = x.shape[1]
        q, k, v = self.project(x)
        if cache is not None and T == 1 and not self.sinks:
            return self.o_proj(merge_heads(self.decode_step(q, k, v, pos, cache)))
        o1, evicted = self.window_attention(q, k, v, pos, cache.ring if cache is not None else None)
        if cache is not None:
            return self.fuse(o1, self.serve_l2(q, evicted, pos, cache.memory))
        lam, eta = self.memory()  # training: the scan applies the W-step delay itself
        k2, v2 = self.l2_pairs(k, v, pos)
        o2, _ = evicted_scan(q, k2, v2, lam, eta, window=self.W, chunk_size=self.C, mode=self.write)
        return self.fuse(o1, o2)

    def init_cache(self, batch_size, device, dtype) -> TwoLevelCache:
        memory = StateCache((batch_size, self.h, self.d_h, self.d_h), device, dtype)
        return TwoLevelCache(super().init_cache(batch_size, device, dtype), memory)

    def cache_elements(self, context_len: int) -> int:
        return super().cache_elements(context_len) + self.h * self.d_h * self.d_h
