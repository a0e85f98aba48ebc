"""Pieces every attention variant shares: causal (or windowed) softmax attention over a cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.window_attention import band_mask, window_attention


def attend(q, k, v, window: int | None = None, scale: float | None = None, sinks: int = 0):
    """softmax(q k^T * scale + mask) v where the queries are the LAST T of the L keys (a cache
    prefix comes first): query t sees every key up to its own, or only the `window` most recent
    and the first `sinks` keys (attention sinks; with a window only).

    q: (B, H, T, d); k: (B, G, L, d); v: (B, G, L, dv) with G dividing H: query head j reads
    KV head j // (H / G) (as `repeat_kv`). The caller drops keys that must never be seen (e.g.
    empty ring-buffer slots) before the call.
    """
    if window is not None:  # O(T W): no T x L score matrix (kernels/window_attention)
        return window_attention(q, k, v, window, scale, sinks)
    B, H, T, d = q.shape
    G, L = k.shape[1], k.shape[2]
    if T == 1 and G != H:
        # decode: the H/G query heads of a KV head become rows of one head (the cache is read in
        # place; on CPU this is several times faster than enable_gqa at long contexts)
        o = F.scaled_dot_product_attention(q.reshape(B, G, H // G, d), k, v, scale=scale)
        return o.reshape(B, H, 1, v.shape[-1])
    if T == L:  # no prefix: the plain causal mask, which SDPA's kernels never materialise
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=G != H)
    # after a cache prefix: one query sees every key; more see a band as wide as the keys
    causal = None if T == 1 else band_mask(T, L, L, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale, enable_gqa=G != H)


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
    """Learned per-head decay lam_h = sigmoid(theta_h) and write rate eta_h, softplus(.) > 0 by
    default, or sigmoid(.) in (0, 1) for the delta write (it keeps lam I - eta k^T k bounded).

    Decays start spread over [0.9, 0.995] so heads begin with memories of ~10 to ~200 tokens.
    """

    def __init__(self, n_heads: int, write_rate: str = "softplus"):
        super().__init__()
        if write_rate not in ("softplus", "sigmoid"):
            raise ValueError(f"write_rate must be 'softplus' or 'sigmoid', got {write_rate!r}")
        lam0 = torch.linspace(0.9, 0.995, n_heads)
        self.decay_logit = nn.Parameter(torch.log(lam0) - torch.log1p(-lam0))
        self.bounded = write_rate == "sigmoid"
        # softplus -> 1.0; sigmoid -> 0.5 (half of each evicted value's prediction error written)
        raw0 = 0.0 if self.bounded else 0.5413
        self.write_rate_raw = nn.Parameter(torch.full((n_heads,), raw0))

    def forward(self):
        rate = torch.sigmoid if self.bounded else F.softplus
        return torch.sigmoid(self.decay_logit), rate(self.write_rate_raw)
