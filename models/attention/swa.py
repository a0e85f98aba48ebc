"""Sliding-window attention (docs/design.md#sliding-window-attention): softmax over positions [t-W+1, t],
and with `sinks: n` over positions i < n as well (attention sinks).

The cache is a fixed ring of the W most recent past (k, v) pairs (plus the n sink pairs), keys
stored un-rotated and rotated when read, so that a Tensor Cache can hand the oldest pair to its
L2 memory as is. Cache per layer: 2 * g * d_h * (n + W) elements, constant in T.
"""
from __future__ import annotations

import torch
from torch import nn

from ..cache import RingCache
from ..rope import apply_rope, rope_cos_sin
from .base import attend, merge_heads, split_heads


class SlidingWindowAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.h, self.g, self.d_h, self.W = cfg.n_heads, a.n_kv_heads, cfg.d_head, a.window
        self.sinks = a.sinks
        self.rope_base = cfg.rope_base
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d_h, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.g * self.d_h, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.g * self.d_h, bias=False)
        self.o_proj = nn.Linear(self.h * self.d_h, cfg.d_model, bias=False)

    def project(self, x):
        """q (B, h, T, d_h), k and v (B, g, T, d_h); nothing rotated yet."""
        return (split_heads(self.q_proj(x), self.h), split_heads(self.k_proj(x), self.g),
                split_heads(self.v_proj(x), self.g))

    def window_attention(self, q, k, v, pos: int, ring: RingCache | None):
        """L1 output (B, h, T, d_h). With a ring, keys are [sinks held (positions 0..s-1);
        ring (positions pos-W..pos-1); new] and the ring keeps the W most recent afterwards;
        k and v are then the new tokens as the ring stores them, read back through `ring_pairs`.

        Returns (o1, evicted): the un-rotated pairs that left the window in this call, oldest
        first ((k, v) of T pairs; None without a ring), for a Tensor Cache's L2 memory.
        """
        T, evicted, held = q.shape[2], None, 0
        if ring is not None:
            held = ring.sinks_held  # positions 0 .. min(n, pos) - 1
            sink_k, sink_v = self.ring_pairs(ring.sink_k[:, :, :held], ring.sink_v[:, :, :held])
            update = ring.update(k, v)
            k, v = self.ring_pairs(update.keys, update.values)
            evicted = self.ring_pairs(update.evicted_keys, update.evicted_values)
        first = pos - self.W if ring is not None else pos  # position of k's first pair
        # ring slots at negative positions were never filled; those below `held` are read from
        # the sink buffer instead, so no key counts twice
        skip = max(0, held - first)
        k_pos = torch.arange(first + skip, pos + T, device=q.device)
        k, v = k[:, :, skip:], v[:, :, skip:]
        if held:
            k, v = torch.cat([sink_k, k], dim=2), torch.cat([sink_v, v], dim=2)
            k_pos = torch.cat([torch.arange(held, device=q.device), k_pos])
        # the keys at positions < n lead k (the held sinks, then any still in the window)
        sinks = held + max(0, min(self.sinks, pos + T) - (first + skip))
        cos, sin = rope_cos_sin(k_pos, self.d_h, self.rope_base, q.dtype)
        o = attend(apply_rope(q, cos[-T:], sin[-T:]), apply_rope(k, cos, sin), v,
                   window=self.W, sinks=sinks)
        return o, evicted

    def ring_pairs(self, k, v):
        """What the ring holds -> un-rotated pairs (B, g, L, d_h): here the pairs themselves (a
        factored window's ring holds factors, and materialises them here)."""
        return k, v

    def forward(self, x, pos: int, cache: RingCache | None = None):
        q, k, v = self.project(x)
        o, _ = self.window_attention(q, k, v, pos, cache)
        return self.o_proj(merge_heads(o))

    def init_cache(self, batch_size, device, dtype) -> RingCache:
        return RingCache(batch_size, self.g, self.W, self.d_h, device, dtype, sinks=self.sinks)

    def cache_elements(self, context_len: int) -> int:
        return 2 * self.g * self.d_h * (self.sinks + self.W)
