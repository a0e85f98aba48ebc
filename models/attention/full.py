"""MHA / GQA / MQA: softmax attention with `n_kv_heads = g` (docs/design.md#full-attention-mha-gqa-mqa).

Cache per token per layer: k and v for g heads, 2 * g * d_h elements. Under an inference-time
cache policy (`PolicyCache`: window KV, StreamingLLM) at most sinks + W pairs; a prefill of T
tokens reads them in one banded attention, each query with the keys and RoPE positions the
policy gives it one token at a time.
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
        positions = torch.as_tensor(positions, device=x.device)
        cos, sin = rope_cos_sin(positions, self.d_h, self.rope_base, x.dtype)
        return apply_rope(x, cos, sin)

    def forward(self, x, pos: int, cache: AppendCache | PolicyCache | None = None):
        T = x.shape[1]
        q = split_heads(self.q_proj(x), self.h)  # (B, h, T, d_h)
        k = split_heads(self.k_proj(x), self.g)  # (B, g, T, d_h)
        v = split_heads(self.v_proj(x), self.g)
        if isinstance(cache, PolicyCache):
            return self.o_proj(merge_heads(self._attend_policy(q, k, v, pos, cache)))
        positions = range(pos, pos + T)
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        if cache is not None:
            k, v = cache.update(k, v)
        o = attend(q, k, v)
        return self.o_proj(merge_heads(o))

    def _attend_policy(self, q, k, v, pos: int, cache: PolicyCache):
        """The T queries at text positions pos .. pos + T - 1 over what the cache held then their
        own pairs (keys before RoPE, rotated at their text positions), each seeing the first
        `sinks` keys and its `window` most recent: `attend`'s band over that concatenation, which
        holds the sinks, then the text's latest pairs without a gap (an index lag is a text lag)."""
        policy = cache.policy
        keys, values, key_positions = cache.update(k, v, pos)
        if q.shape[2] == 1:  # decode: the query sees exactly the pairs the cache keeps, rotated as
            held = cache.positions  # the policy says: at text positions, or (streaming) cache indices
            if policy.policy == "streaming":
                held, pos = range(len(held)), len(held) - 1
            return attend(self.rotate(q, [pos]), self.rotate(cache.k, held), cache.v)
        text = torch.arange(pos, pos + q.shape[2], device=q.device)
        k = self.rotate(keys, key_positions)
        if policy.policy == "window":  # keys and queries at their text positions
            return attend(self.rotate(q, text), k, values, window=policy.window)
        # StreamingLLM, one token at a time: query t joins min(t, K) held pairs (K = sinks + window)
        # and sits at cache index c_t = min(t, K - 1); a key j of its window (t - j < window) sits at
        # c_t - (t - j), so its RoPE distance is the text distance t - j, as at text positions; a
        # sink j < sinks sits at index j (its text position): distance c_t - j. Hence the query
        # rotated twice, [at c_t | at t], meets a sink as [k at j | 0] and any other key as
        # [0 | k at j]: one softmax over both, scaled by 1/sqrt(d_h) of one half.
        n, K = policy.sinks, policy.sinks + policy.window
        sink = (torch.arange(k.shape[2], device=k.device) < n)[:, None]  # (L, 1): the first n keys
        q = torch.cat([self.rotate(q, text.clamp(max=K - 1)), self.rotate(q, text)], dim=-1)
        k = torch.cat([k * sink, k * ~sink], dim=-1)  # (B, g, L, 2 d_h)
        return attend(q, k, values, window=policy.window, scale=self.d_h ** -0.5, sinks=n)

    def init_cache(self, batch_size, device, dtype, policy=None) -> AppendCache | PolicyCache:
        if policy is not None:
            return PolicyCache(policy)
        return AppendCache(2, "k", "v")  # (B, g, T, d_h) each, grown along T

    def cache_elements(self, context_len: int) -> int:
        return 2 * self.g * self.d_h * context_len
