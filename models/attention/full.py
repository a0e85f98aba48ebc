"""MHA / GQA / MQA: softmax attention with `n_kv_heads = g` (docs/design.md#full-attention-mha-gqa-mqa).

Cache per token per layer: k and v for g heads, 2 * g * d_h elements.
"""
from __future__ import annotations

import torch
from torch import nn

from ..cache import AppendCache
from ..rope import apply_rope, rope_cos_sin
from .base import attend, merge_heads, split_heads


class FullAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.h, self.g, self.d_h, self.rope_base = cfg.n_heads, a.n_kv_heads, cfg.d_head, cfg.rope_base
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d_h, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.g * self.d_h, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.g * self.d_h, bias=False)
        self.o_proj = nn.Linear(self.h * self.d_h, cfg.d_model, bias=False)

    def forward(self, x, pos: int, cache: AppendCache | None = None):
        T = x.shape[1]
        q_pos = torch.arange(pos, pos + T, device=x.device)
        cos, sin = rope_cos_sin(q_pos, self.d_h, self.rope_base, x.dtype)
        q = apply_rope(split_heads(self.q_proj(x), self.h), cos, sin)  # (B, h, T, d_h)
        k = apply_rope(split_heads(self.k_proj(x), self.g), cos, sin)  # (B, g, T, d_h)
        v = split_heads(self.v_proj(x), self.g)
        if cache is not None:
            k, v = cache.update(k, v)
        o = attend(q, k, v)
        return self.o_proj(merge_heads(o))

    def init_cache(self, batch_size, device, dtype) -> AppendCache:
        return AppendCache(2, "k", "v")  # (B, g, T, d_h) each, grown along T

    def cache_elements(self, context_len: int) -> int:
        return 2 * self.g * self.d_h * context_len
