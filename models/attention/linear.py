"""Decayed linear attention (docs/design.md#decayed-linear-attention): S_t = lam S_{t-1} + eta k_t^T v_t, o_t = q_t S_t.

Keys are L2-normalised (as in the Tensor Cache L2) so the state stays bounded.
State per layer: h * d_h * d_h elements, constant in T.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kernels.l2_scan import evicted_scan

from ..cache import StateCache
from .base import DecayWriteRate, merge_heads, split_heads


class DecayedLinearAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.d_h, self.C = cfg.n_heads, cfg.d_head, cfg.attention.chunk_size
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d_h, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.h * self.d_h, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.h * self.d_h, bias=False)
        self.o_proj = nn.Linear(self.h * self.d_h, cfg.d_model, bias=False)
        self.memory = DecayWriteRate(self.h)

    def forward(self, x, pos: int, cache: StateCache | None = None):
        q = split_heads(self.q_proj(x), self.h)  # (B, h, T, d_h)
        k = F.normalize(split_heads(self.k_proj(x), self.h), dim=-1)
        v = split_heads(self.v_proj(x), self.h)
        lam, eta = self.memory()
        o, S = evicted_scan(q, k, v, lam, eta, window=0, chunk_size=self.C,
                            initial_state=cache.state if cache is not None else None,
                            output_final_state=cache is not None)
        if cache is not None:
            cache.write_(S)
        return self.o_proj(merge_heads(o))

    def init_cache(self, batch_size, device, dtype) -> StateCache:
        return StateCache((batch_size, self.h, self.d_h, self.d_h), device, dtype)

    def cache_elements(self, context_len: int) -> int:
        return self.h * self.d_h * self.d_h
