"""One Tensor Cache decode step in plain torch (docs/design.md#tensor-cache, T = 1 at position `pos`).

    ring     = (k, v) at positions pos-W .. pos-1, un-rotated; slot 0 leaves the window now
    o1       = softmax_i(rope(q, pos) . rope(k_i, i) * scale) v_i   over i in (pos-W, pos], i >= 0
    A_pos    = lam A_{pos-1} + eta k_e^T v_e          (k_e, v_e = ring slot 0; k_e L2-normalised)
               or, with delta=True, lam A_{pos-1} + eta k_e^T (v_e - k_e A_{pos-1})
    o2       = q A_pos                                (q un-rotated)
    o        = o1 + g o2                              (g = sigmoid(gate), per head)

The ring is read, never written: shifting in the new pair is the caller's bookkeeping.
"""
import torch
import torch.nn.functional as F


def _rotate(x, cos, sin):  # models/rope.apply_rope's rotate-half form (kernels/ imports no models/)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def tc_decode_reference(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate, gate,
                        pos: int, normalize_k: bool = True, scale: float | None = None,
                        delta: bool = False):
    """q (B,h,d); k_new, v_new (B,g,d); ring_k, ring_v (B,g,W,d); state (B,h,d,d), updated in
    place; cos, sin (W+1, d) for positions pos-W .. pos; decay, write_rate, gate (h,) with gate
    already a probability -> o (B,h,d)."""
    B, h, d = q.shape
    g, W = ring_k.shape[1], ring_k.shape[2]
    n_rep = h // g
    scale = d ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation, float64 kept
    # L1: the W most recent positions pos-W+1 .. pos (ring slots 1.. plus the new pair)
    k = torch.cat([ring_k[:, :, 1:], k_new[:, :, None]], dim=2).repeat_interleave(n_rep, dim=1)
    v = torch.cat([ring_v[:, :, 1:], v_new[:, :, None]], dim=2).repeat_interleave(n_rep, dim=1)
    k_rot = _rotate(k, cos[1:], sin[1:])                                     # (B,h,W,d)
    q_rot = _rotate(q, cos[-1], sin[-1])                                     # (B,h,d)
    scores = torch.einsum("bhd,bhwd->bhw", q_rot.to(acc), k_rot.to(acc)) * scale
    positions = torch.arange(pos - W + 1, pos + 1, device=q.device)
    scores = scores.masked_fill(positions < 0, float("-inf"))
    o1 = torch.einsum("bhw,bhwd->bhd", scores.softmax(-1), v.to(acc))
    # L2: write the evicted pair, then read with the un-rotated query
    k_e = ring_k[:, :, 0].repeat_interleave(n_rep, dim=1).to(acc)
    v_e = ring_v[:, :, 0].repeat_interleave(n_rep, dim=1).to(acc)
    if normalize_k:
        k_e = F.normalize(k_e, dim=-1)
    A = state.to(acc)
    if delta:  # write the prediction error of the state before its decay
        v_e = v_e - torch.einsum("bhd,bhde->bhe", k_e, A)
    A = decay.to(acc)[None, :, None, None] * A \
        + write_rate.to(acc)[None, :, None, None] * k_e[..., :, None] * v_e[..., None, :]
    state.copy_(A)
    o2 = torch.einsum("bhd,bhde->bhe", q.to(acc), A)
    return (o1 + gate.to(acc)[None, :, None] * o2).to(q.dtype)
