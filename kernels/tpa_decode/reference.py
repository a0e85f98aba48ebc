"""TPA (T6) decode straight from the cached factors (docs/design.md#tpa); K and V never materialised.

For head j and cached position i:
    s_j(i) = 1/(Rq Rk sqrt(d)) sum_{r,s} a^q_{r,j} a^k_{s,j}(i) <b^q_r, b^k_s(i)>
    p_j    = softmax_i s_j
    o_j    = 1/Rv sum_s (sum_i p_j(i) a^v_{s,j}(i)) b^v_s(i)
Shapes: a_q (B,Rq,h), b_q (B,Rq,d), a_k (B,L,Rk,h), b_k (B,L,Rk,d), a_v (B,L,Rv,h),
b_v (B,L,Rv,d) -> o (B,h,d). b_q and b_k arrive already rotated (RoPE on the b factors).
"""
import math

import torch


def tpa_decode_reference(a_q, b_q, a_k, b_k, a_v, b_v):
    Rq, d = b_q.shape[1], b_q.shape[2]
    Rk, Rv = a_k.shape[2], a_v.shape[2]
    dtype = torch.promote_types(b_q.dtype, torch.float32)  # softmax in fp32 at least
    a_q, b_q, a_k, b_k, a_v, b_v = (x.to(dtype) for x in (a_q, b_q, a_k, b_k, a_v, b_v))
    inner = torch.einsum("brd,blsd->blrs", b_q, b_k)  # <b^q_r, b^k_s(i)>, shared by all heads
    scores = torch.einsum("brj,blrs,blsj->bjl", a_q, inner, a_k) / (Rq * Rk * math.sqrt(d))
    p = torch.softmax(scores, dim=-1)  # (B, h, L)
    return torch.einsum("bjl,blsj,blsd->bjd", p, a_v, b_v) / Rv
