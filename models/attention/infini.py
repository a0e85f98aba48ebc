"""Infini-attention (docs/design.md#infini-attention; Munkhdalai, Faruqui, Gopal 2024).

The sequence is cut into segments of N tokens. Per head, with s(x) = ELU(x) + 1:

    A_local = causal softmax attention inside the current segment only (RoPE)
    A_mem   = s(Q) M / (s(Q) z + eps)            M, z: written by the segments before this one
    o       = sigmoid(beta_h) A_mem + (1 - sigmoid(beta_h)) A_local

and at each segment's end its pairs are written into the memory:

    linear: M += s(K)^T V
    delta:  M += s(K)^T (V - s(K) M / (s(K) z + eps))
    both:   z += sum_t s(K_t)

M = 0 and z = 0 at the start, so the first segment reads A_mem = 0 / eps = 0 (no 0/0). The
memory sees the un-rotated q and k (positions matter inside a segment only). Heads that share
a KV head would hold identical memories, so there is one memory per KV head.
State per layer: g (d_h^2 + d_h) + 2 g d_h n elements, n = T mod N pairs of the open segment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import SegmentCache
from ..rope import apply_rope, rope_cos_sin
from .base import attend, merge_heads, split_heads

EPS = 1e-6  # far below s(q) z once anything is written (every entry of s(.) and z is > 0)


def s(x: torch.Tensor) -> torch.Tensor:
    """ELU + 1: a positive feature map, so s(q) z > 0 once a segment is written."""
    return F.elu(x) + 1


class InfiniAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.h, self.g, self.d_h, self.N = cfg.n_heads, a.n_kv_heads, cfg.d_head, a.segment
        self.update, self.rope_base = a.update, cfg.rope_base
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d_h, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.g * self.d_h, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.g * self.d_h, bias=False)
        self.o_proj = nn.Linear(self.h * self.d_h, cfg.d_model, bias=False)
        self.beta = nn.Parameter(torch.zeros(self.h))  # memory and local start at weight 1/2

    def read(self, q, M, z):
        """A_mem (B, h, n, d_h): the h/g query heads of a KV head read its memory."""
        B, _, n, d = q.shape
        sq = s(q).view(B, self.g, self.h // self.g, n, d)
        A = (sq @ M[:, :, None]) / (sq @ z[:, :, None, :, None] + EPS)  # (B, g, h/g, n, d)
        return A.view(B, self.h, n, d)

    def write(self, M, z, k, v):
        """The memory after one complete segment's pairs k, v (B, g, N, d_h)."""
        sk = s(k)
        if self.update == "delta":
            v = v - (sk @ M) / (sk @ z[..., None] + EPS)
        return M + sk.transpose(-1, -2) @ v, z + sk.sum(dim=2)

    def forward(self, x, pos: int, cache: SegmentCache | None = None):
        B, T, _ = x.shape
        q = split_heads(self.q_proj(x), self.h)  # (B, h, T, d_h)
        k = split_heads(self.k_proj(x), self.g)  # (B, g, T, d_h)
        v = split_heads(self.v_proj(x), self.g)
        state = cache if cache is not None else self.init_cache(B, x.device, x.dtype)
        M, z = state.M, state.z
        f = state.k.shape[2]  # pairs of the open segment seen before: positions pos-f .. pos-1
        k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)  # from its start
        cos, sin = rope_cos_sin(torch.arange(pos - f, pos + T, device=x.device), self.d_h,
                                self.rope_base, x.dtype)
        q_rot, k_rot = apply_rope(q, cos[f:], sin[f:]), apply_rope(k, cos, sin)
        # segments of [open; new] end at every N-th pair; the queries are the last T of them
        sizes = [piece.shape[2] for piece in k.split(self.N, dim=2)]
        q_sizes = [sizes[0] - f] + sizes[1:]
        gate = torch.sigmoid(self.beta)[None, :, None, None]
        out = []
        for q_j, qr_j, k_j, kr_j, v_j in zip(q.split(q_sizes, 2), q_rot.split(q_sizes, 2),
                                             k.split(self.N, 2), k_rot.split(self.N, 2),
                                             v.split(self.N, 2)):
            A_local = attend(qr_j, kr_j, v_j)  # causal, inside the segment only
            A_mem = self.read(q_j, M, z)  # segments before this one only
            out.append(gate * A_mem + (1 - gate) * A_local)
            if k_j.shape[2] == self.N:  # the segment is complete: write it, then forget it
                M, z = self.write(M, z, k_j, v_j)
        if cache is not None:
            n = k.shape[2] % self.N  # pairs of the segment left open
            cache.update(M, z, k[:, :, k.shape[2] - n:], v[:, :, k.shape[2] - n:])
        return self.o_proj(merge_heads(torch.cat(out, dim=2)))

    def init_cache(self, batch_size, device, dtype) -> SegmentCache:
        return SegmentCache(batch_size, self.g, self.d_h, device, dtype)

    def cache_elements(self, context_len: int) -> int:
        return self.g * (self.d_h ** 2 + self.d_h) + 2 * self.g * self.d_h * (context_len % self.N)
