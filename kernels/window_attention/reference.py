"""Sliding-window softmax attention in plain torch: the materialised band mask, and the blocked
form that costs O(T W) (docs/design.md#sliding-window-attention).

Contract (shared by every form, the Triton kernel included): q (B, H, T, d), k (B, G, L, d),
v (B, G, L, dv), L >= T, G dividing H (query head j reads KV head j // (H / G)). The queries are
the LAST T of the L keys (a prefix of P = L - T earlier keys, e.g. a ring cache, comes first):
query t sits at key index t + P and attends keys j with

    0 <= t + P - j <= W - 1          (itself and the W - 1 keys before it)

flash-attention's window_size = (W - 1, 0). scale defaults to d ** -0.5.
"""
import torch
import torch.nn.functional as F


def band_mask(T: int, L: int, window: int, device=None) -> torch.Tensor:
    """(T, L) bool: query t (key index t + L - T) sees key j iff 0 <= t + L - T - j < window."""
    lag = torch.arange(L - T, L, device=device)[:, None] - torch.arange(L, device=device)[None, :]
    return (lag >= 0) & (lag < window)


def window_attention_masked(q, k, v, window: int, scale: float | None = None):
    """One T x L score matrix under the band mask: O(T L), the obviously correct form."""
    mask = band_mask(q.shape[2], k.shape[2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def window_attention_blocked(q, k, v, window: int, scale: float | None = None,
                             block: int | None = None):
    """Query blocks of n rows, each against only the W - 1 + n keys it can see: O(T (W + n)).

    Block i holds queries [i n, i n + n) and keys [i n + P - W + 1, i n + P + n) (zero-padded
    outside [0, L), never attended). All blocks run as ONE SDPA call: blocks are a batch dim
    and the H / G query heads of a KV head are rows of one block, so keys are not repeated.
    """
    B, H, T, d = q.shape
    G, L, dv = k.shape[1], k.shape[2], v.shape[-1]
    R, P = H // G, L - T
    window = min(window, L)  # a window longer than the keys sees them all
    n = min(T, block or max(window // 2, 32))
    nb = -(-T // n)
    span = window - 1 + n
    lo = P - window + 1  # key index of block 0's first column

    def blocks(x):  # (B, G, L, e) -> (B G, nb, span, e): block i = key rows lo + i n ...
        x = F.pad(x[:, :, max(lo, 0):], (0, 0, max(-lo, 0), nb * n - T))
        return x.unfold(2, span, n).transpose(-1, -2).reshape(B * G, nb, span, -1)

    q = F.pad(q, (0, 0, 0, nb * n - T)).view(B, G, R, nb, n, d)
    q = q.transpose(2, 3).reshape(B * G, nb, R * n, d)
    row, col = torch.arange(n, device=q.device)[:, None], torch.arange(span, device=q.device)
    lag = row + window - 1 - col  # query row r is column r + W - 1 of its block
    first = lo + n * torch.arange(nb, device=q.device)  # key index of each block's column 0
    mask = (lag >= 0) & (lag < window) & (first[:, None, None] + col >= 0)  # (nb, n, span)
    mask = mask[:, None].expand(nb, R, n, span).reshape(nb, R * n, span)
    o = F.scaled_dot_product_attention(q, blocks(k), blocks(v), attn_mask=mask[None], scale=scale)
    o = o.view(B, G, nb, R, n, dv).transpose(2, 3).reshape(B, H, nb * n, dv)  # (B, H, T+pad, dv)
    return o[:, :, :T]
