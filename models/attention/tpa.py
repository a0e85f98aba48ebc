"""Tensor Product Attention, T6 (docs/design.md#tpa).

Q_t = (1/R_q) sum_r a^q_r(x_t) (outer) b^q_r(x_t), a in R^h, b in R^{d_h}; likewise K (R_k) and
V (R_v). RoPE rotates the b^q, b^k factors only. TPA-KVonly (`rank_q: None`) projects the
query plainly, q = RoPE(x W_q), and factorises k and v alone; its decode writes q as h rank-one
factors e_j (outer) q_j (R_q = h), so the same factor decode serves both. The cache holds the factors a^k, b^k (rotated),
a^v, b^v: (R_k + R_v) * (h + d_h) elements per token per layer; decode scores straight from them.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.tpa_decode import tpa_decode

from ..cache import AppendCache
from ..rope import apply_rope, rope_cos_sin
from .base import attend, merge_heads


def factor_projections(d_model: int, h: int, d_h: int, ranks: dict[str, int]):
    """The bias-free maps x -> a_r(x) (R h wide) and x -> b_r(x) (R d_h wide) of each factorised
    name ("q", "k", "v"): two ModuleDicts, a_proj and b_proj."""
    a_proj = nn.ModuleDict({n: nn.Linear(d_model, r * h, bias=False) for n, r in ranks.items()})
    b_proj = nn.ModuleDict({n: nn.Linear(d_model, r * d_h, bias=False) for n, r in ranks.items()})
    return a_proj, b_proj


def plain_query_factors(h: int, batch: int, T: int, dtype, device):
    """TPA-KVonly's plain query as factors: a_q = h e_j (B, T, h, h), so that
    (1/h) sum_j a_q,j (outer) q_j is q itself with b_q row j = head j's query (R_q = h)."""
    return torch.eye(h, dtype=dtype, device=device).mul(h).expand(batch, T, -1, -1)


class TensorProductAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.h, self.d_h, self.rope_base = cfg.n_heads, cfg.d_head, cfg.rope_base
        self.ranks = {"k": a.rank_k, "v": a.rank_v} | ({"q": a.rank_q} if a.rank_q else {})
        self.q_proj = None if a.rank_q else nn.Linear(cfg.d_model, self.h * self.d_h, bias=False)
        self.a_proj, self.b_proj = factor_projections(cfg.d_model, self.h, self.d_h, self.ranks)
        self.o_proj = nn.Linear(self.h * self.d_h, cfg.d_model, bias=False)

    def factors(self, x, name: str, cos=None, sin=None):
        """a (B, T, R, h), b (B, T, R, d_h); b rotated when cos/sin are given."""
        B, T, _ = x.shape
        R = self.ranks[name]
        a = self.a_proj[name](x).view(B, T, R, self.h)
        b = self.b_proj[name](x).view(B, T, R, self.d_h)
        if cos is not None:
            b = apply_rope(b, cos[:, None], sin[:, None])
        return a, b

    def materialise(self, a, b):
        """(1/R) sum_r a_r (outer) b_r: (B, T, R, h), (B, T, R, d) -> (B, h, T, d).

        Broadcast and sum, not einsum: einsum's bmm over B*T tiny (h x R)(R x d) products costs
        ~1.4x more, forward + backward, at the study's ranks (2-4)."""
        return (a[..., None] * b[..., None, :]).sum(2).transpose(1, 2) / a.shape[2]

    def forward(self, x, pos: int, cache: AppendCache | None = None):
        T = x.shape[1]
        q_pos = torch.arange(pos, pos + T, device=x.device)
        cos, sin = rope_cos_sin(q_pos, self.d_h, self.rope_base, x.dtype)
        if self.q_proj is None:
            a_q, b_q = self.factors(x, "q", cos, sin)
        else:  # KV-only: b_q row j is head j's rotated query, (B, T, h, d_h)
            a_q, b_q = None, apply_rope(self.q_proj(x).view(*x.shape[:2], self.h, self.d_h),
                                        cos[:, None], sin[:, None])
        a_k, b_k = self.factors(x, "k", cos, sin)
        a_v, b_v = self.factors(x, "v")
        if cache is not None:
            a_k, b_k, a_v, b_v = cache.update(a_k, b_k, a_v, b_v)
        if cache is not None and T == 1:  # decode from the factors alone
            if a_q is None:  # the plain query as h rank-one factors e_j (outer) q_j (R_q = h)
                a_q = plain_query_factors(self.h, x.shape[0], 1, x.dtype, x.device)
            o = tpa_decode(a_q[:, 0], b_q[:, 0], a_k, b_k, a_v, b_v)[:, :, None]  # (B, h, 1, d_h)
        else:
            q = self.materialise(a_q, b_q) if a_q is not None else b_q.transpose(1, 2)
            o = attend(q, self.materialise(a_k, b_k), self.materialise(a_v, b_v))
        return self.o_proj(merge_heads(o))

    def init_cache(self, batch_size, device, dtype) -> AppendCache:
        return AppendCache(1, "a_k", "b_k", "a_v", "b_v")  # factors only, (B, T, R, h | d_h)

    def cache_elements(self, context_len: int) -> int:
        return (self.ranks["k"] + self.ranks["v"]) * (self.h + self.d_h) * context_len
