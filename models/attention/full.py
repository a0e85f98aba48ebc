"""MHA / GQA / MQA: softmax attention with `n_kv_heads = g` (docs/design.md#full-attention-mha-gqa-mqa).

Cache per token per layer: k and v for g heads, 2 * g * d_h elements. Under an inference-time
cache policy (`PolicyCache`: window KV, StreamingLLM) at most sinks + W pairs, read one query at
a time with the RoPE positions the policy gives.
"""
from __future__ import annotations

import torch
from torch import nn

from ..cache import AppendCache, PolicyCache
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

    def rotate(self, x, positions) -> torch.Tensor:
        """RoPE of x (..., T, d_h) at the T integer `positions`."""
        cos, sin = rope_cos_sin(torch.as_tensor(positions, device=x.device), self.d_h, self.rope_base, x.dtype)
        return apply_rope(x, cos, sin)

    def forward(self, x, pos: int, cache: AppendCache | PolicyCache | None = None):
        T = x.shape[1]
        q = split_heads(self.q_proj(x), self.h)  # (B, h, T, d_h)
        k = split_heads(self.k_proj(x), self.g)  # (B, g, T, d_h)
        v = split_heads(self.v_proj(x), self.g)
        if isinstance(cache, PolicyCache):
            o = torch.cat([self._attend_policy(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1],
                                               pos + t, cache) for t in range(T)], dim=2)
            return self.o_proj(merge_heads(o))
        positions = range(pos, pos + T)
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        if cache is not None:
            k, v = cache.update(k, v)
        o = attend(q, k, v)
        return self.o_proj(merge_heads(o))

    def _attend_policy(self, q, k, v, position: int, cache: PolicyCache):
        """One token: its pair joins the policy's cache, then softmax over what the cache holds,
        every key rotated at the position the policy assigns it (the query likewise)."""
        keys, values, key_positions, q_position = cache.append(k, v, position)
        return attend(self.rotate(q, [q_position]), self.rotate(keys, key_positions), values)

    def init_cache(self, batch_size, device, dtype, policy=None) -> AppendCache | PolicyCache:
        if policy is not None:
            return PolicyCache(policy)
        return AppendCache(2, "k", "v")  # (B, g, T, d_h) each, grown along T

    def cache_elements(self, context_len: int) -> int:
        return 2 * self.g * self.d_h * context_len
