"""Multi-head latent attention, DeepSeek-V2 style (docs/design.md#mla).

c_t = norm(W_dkv x_t) (d_c), k^C = W_uk c, v = W_uv c per head, one shared RoPE key
k^R = RoPE(W_kr x_t) (d_r); q = [q^C ; RoPE(q^R)]. Cache per token per layer: d_c + d_r.
Absorbed decode scores the latent directly: <q^C, W_uk c> = <W_uk^T q^C, c>, and applies W_uv
after the softmax-weighted sum of latents.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import AppendCache
from ..rope import apply_rope, rope_cos_sin
from .base import attend, merge_heads, split_heads


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.h, self.d_h, self.d_c, self.d_r = cfg.n_heads, cfg.d_head, a.kv_lora_rank, a.rope_dim
        self.absorb, self.rope_base = a.absorb, cfg.rope_base
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d_h, bias=False)
        self.q_rope_proj = nn.Linear(cfg.d_model, self.h * self.d_r, bias=False)
        self.kv_down = nn.Linear(cfg.d_model, self.d_c, bias=False)
        self.kv_norm = nn.RMSNorm(self.d_c, eps=cfg.norm_eps)
        self.k_up = nn.Linear(self.d_c, self.h * self.d_h, bias=False)  # W_uk
        self.v_up = nn.Linear(self.d_c, self.h * self.d_h, bias=False)  # W_uv
        self.k_rope_proj = nn.Linear(cfg.d_model, self.d_r, bias=False)
        self.o_proj = nn.Linear(self.h * self.d_h, cfg.d_model, bias=False)
        self.scale = 1.0 / math.sqrt(self.d_h + self.d_r)

    def forward(self, x, pos: int, cache: AppendCache | None = None):
        T = x.shape[1]
        q_pos = torch.arange(pos, pos + T, device=x.device)
        cos, sin = rope_cos_sin(q_pos, self.d_r, self.rope_base, x.dtype)
        c = self.kv_norm(self.kv_down(x))  # (B, T, d_c)
        k_r = apply_rope(self.k_rope_proj(x), cos, sin)  # (B, T, d_r)
        if cache is not None:
            c, k_r = cache.update(c, k_r)
        q_c = split_heads(self.q_proj(x), self.h)  # (B, h, T, d_h)
        q_r = apply_rope(split_heads(self.q_rope_proj(x), self.h), cos, sin)  # (B, h, T, d_r)
        if cache is not None and T == 1 and self.absorb:
            o = self._absorbed_decode(q_c, q_r, c, k_r)
        else:
            k_c = split_heads(self.k_up(c), self.h)
            v = split_heads(self.v_up(c), self.h)
            k = torch.cat([k_c, k_r[:, None].expand(-1, self.h, -1, -1)], dim=-1)
            # SDPA's fused kernels need v as wide as q and k (else it materialises T x T scores):
            # zero columns in v are zero columns in the output, dropped after
            v = F.pad(v, (0, self.d_r))
            o = attend(torch.cat([q_c, q_r], dim=-1), k, v, scale=self.scale)[..., :self.d_h]
        return self.o_proj(merge_heads(o))

    def _absorbed_decode(self, q_c, q_r, c, k_r):
        """One new query over every cached latent; K and V are never formed."""
        W_uk = self.k_up.weight.view(self.h, self.d_h, self.d_c)
        W_uv = self.v_up.weight.view(self.h, self.d_h, self.d_c)
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_c, W_uk)  # (B, h, 1, d_c)
        scores = (q_latent @ c[:, None].transpose(-1, -2) + q_r @ k_r[:, None].transpose(-1, -2))
        p = torch.softmax(scores * self.scale, dim=-1)  # (B, h, 1, L)
        return torch.einsum("bhtc,hdc->bhtd", p @ c[:, None], W_uv)

    def init_cache(self, batch_size, device, dtype) -> AppendCache:
        return AppendCache(1, "c", "k_r")  # latents (B, T, d_c) and the shared RoPE key (B, T, d_r)

    def cache_elements(self, context_len: int) -> int:
        return (self.d_c + self.d_r) * context_len
