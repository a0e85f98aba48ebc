"""Sliding-window softmax attention in plain torch: the materialised band mask, and the blocked
form that costs O(T W) (docs/design.md#sliding-window-attention).

Contract (shared by every form, the Triton kernel included): q (B, H, T, d), k (B, G, L, d),
v (B, G, L, dv), L >= T, G dividing H (query head j reads KV head j // (H / G)). The queries are
the LAST T of the L keys (a prefix of P = L - T earlier keys, e.g. a ring cache, comes first):
query t sits at key index t + P and attends keys j with

    0 <= t + P - j <= W - 1          (itself and the W - 1 keys before it)
    or j < S and j <= t + P          (attention sinks: the first S keys, once reached, stay seen)

flash-attention's window_size = (W - 1, 0). S = `sinks` defaults to 0; scale to d ** -0.5.
"""
import torch
import torch.nn.functional as F


def band_mask(T: int, L: int, window: int, device=None, sinks: int = 0) -> torch.Tensor:
    """(T, L) bool: query t (key index t + L - T) sees key j iff 0 <= t + L - T - j < window,
    or j < sinks and j <= t + L - T."""
    col = torch.arange(L, device=device)
    lag = torch.arange(L - T, L, device=device)[:, None] - col[None, :]
    return (lag >= 0) & ((lag < window) | (col < sinks))


def window_attention_masked(q, k, v, window: int, scale: float | None = None, sinks: int = 0):
    """One T x L score matrix under the band mask: O(T L), the obviously correct form."""
    mask = band_mask(q.shape[2], k.shape[2], window, q.device, sinks)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def window_attention_blocked(q, k, v, window: int, scale: float | None = None,
                             block: int | None = None, sinks: int = 0):
    """Query blocks of n rows, each against only the W - 1 + n keys it can see: O(T (W + n)).

    Block i holds queries [i n, i n + n) and keys [i n + P - W + 1, i n + P + n) (zero-padded
    outside [0, L), never attended). All blocks run as ONE SDPA call: blocks are a batch dim
    and the H / G query heads of a KV head are rows of one block, so keys are not repeated.
    With sinks, every block also gets the first S keys in front, seen only where they are at
    least W behind the query (nearer ones are in the band already, and count once):
    O(T (W + n + S)).
    """
    B, H, T, d = q.shape
    G, L, dv = k.shape[1], k.shape[2], v.shape[-1]
    R, P = H // G, L - T
    window = min(window, L)  # a window longer than the keys sees them all
    n = min(T, block or max(window // 2, 32))
    nb = -(-T // n)
    span = window - 1 + n
    lo = P - window + 1  # key index of block 0's first column
    S = min(sinks, L)

    def blocks(x):  # (B, G, L, e) -> (B G, nb, S + span, e): the S sinks, then rows lo + i n ...
        band = F.pad(x[:, :, max(lo, 0):], (0, 0, max(-lo, 0), nb * n - T))
        band = band.unfold(2, span, n).transpose(-1, -2).reshape(B * G, nb, span, -1)
        if not S:
            return band
        return torch.cat([x[:, :, :S].reshape(B * G, 1, S, -1).expand(-1, nb, -1, -1), band], dim=2)

    q = F.pad(q, (0, 0, 0, nb * n - T)).view(B, G, R, nb, n, d)
    q = q.transpose(2, 3).reshape(B * G, nb, R * n, d)
    row, col = torch.arange(n, device=q.device)[:, None], torch.arange(span, device=q.device)
    lag = row + window - 1 - col  # query row r is column r + W - 1 of its block
    first = lo + n * torch.arange(nb, device=q.device)  # key index of each block's column 0
    mask = (lag >= 0) & (lag < window) & (first[:, None, None] + col >= 0)  # (nb, n, span)
    sink_lag = first[:, None, None] + row + window - 1 - torch.arange(S, device=q.device)
    mask = torch.cat([sink_lag >= window, mask], dim=-1)  # (nb, n, S + span)
    mask = mask[:, None].expand(nb, R, n, S + span).reshape(nb, R * n, S + span)
    o = F.scaled_dot_product_attention(q, blocks(k), blocks(v), attn_mask=mask[None], scale=scale)
    o = o.view(B, G, nb, R, n, dv).transpose(2, 3).reshape(B, H, nb * n, dv)  # (B, H, T+pad, dv)
    return o[:, :, :T]
