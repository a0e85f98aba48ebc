"""Pieces every attention variant shares: masked softmax attention over absolute positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attend(q, k, v, q_pos, k_pos, window: int | None = None, scale: float | None = None):
    """softmax(q k^T * scale + mask) v, where query t sees key i iff i <= t (and i > t - window).

    q: (B, H, T, d); k: (B, G, L, d); v: (B, G, L, dv) with G dividing H: query head j reads
    KV head j // (H / G) (as `repeat_kv`). q_pos: (T,), k_pos: (L,) absolute positions. Keys at
    negative positions (empty ring-buffer slots) are never seen.
    """
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    B, H, T, d = q.shape
    G = k.shape[1]
    if G == H or T > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                              enable_gqa=G != H)
    # decode: the H/G query heads of a KV head become rows of one head (the cache is read in
    # place; on CPU this is several times faster than enable_gqa at long contexts)
    q = q.reshape(B, G, H // G, d)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.expand(H // G, -1), scale=scale)
    return o.reshape(B, H, 1, v.shape[-1])


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, g, L, d) -> (B, g * n_rep, L, d): each KV head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def split_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, n * d) -> (B, n, T, d)"""
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, n, T, d) -> (B, T, n * d)"""
    B, n, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, n * d)


class DecayWriteRate(nn.Module):
    """Learned per-head decay lam_h = sigmoid(theta_h) and write rate eta_h = softplus(.) > 0.

    Decays start spread over [0.9, 0.995] so heads begin with memories of ~10 to ~200 tokens.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        lam0 = torch.linspace(0.9, 0.995, n_heads)
        self.decay_logit = nn.Parameter(torch.log(lam0) - torch.log1p(-lam0))
        self.write_rate_raw = nn.Parameter(torch.full((n_heads,), 0.5413))  # softplus -> 1.0

    def forward(self):
        return torch.sigmoid(self.decay_logit), F.softplus(self.write_rate_raw)
