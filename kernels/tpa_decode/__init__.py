"""TPA (T6) decode from cached factors: tpa_decode(a_q, b_q, a_k, b_k, a_v, b_v) -> o (B, h, d).

    s_j(i) = 1/(Rq Rk sqrt(d)) sum_{r,s} a^q_{r,j} a^k_{s,j}(i) <b^q_r, b^k_s(i)>
    p_j    = softmax_i s_j
    o_j    = 1/Rv sum_s (sum_i p_j(i) a^v_{s,j}(i)) b^v_s(i)

The Triton split-over-sequence kernel is forward only (kernels.dispatch has the rule).
"""
from ..dispatch import use_triton
from .reference import tpa_decode_reference

try:  # CPU-only machines may lack triton
    from .triton import tpa_decode_triton
except ImportError:
    tpa_decode_triton = None

__all__ = ["tpa_decode", "tpa_decode_reference", "tpa_decode_triton"]


def tpa_decode(a_q, b_q, a_k, b_k, a_v, b_v):
    """a_q (B,Rq,h), b_q (B,Rq,d), a_k (B,L,Rk,h), b_k (B,L,Rk,d), a_v (B,L,Rv,h),
    b_v (B,L,Rv,d) -> o (B,h,d)."""
    if use_triton(tpa_decode_triton, a_q, b_q, a_k, b_k, a_v, b_v, backward=False):
        return tpa_decode_triton(a_q, b_q, a_k, b_k, a_v, b_v)
    return tpa_decode_reference(a_q, b_q, a_k, b_k, a_v, b_v)
