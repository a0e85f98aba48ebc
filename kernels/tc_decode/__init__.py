"""Tensor Cache decode step (window attention + L2 write of the evicted pair + L2 read), fused.

    o = softmax(rope(q) rope(K_window)^T * scale) V_window + g * q (lam A + eta k_e^T v_e)

tc_decode(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate, gate, pos,
normalize_k, delta) -> o (B, h, d); `state` is updated in place, the ring is only read. delta=True
writes eta k_e^T (v_e - k_e A) instead (docs/design.md#the-delta-write). The Triton kernel is
forward only: kernels.dispatch sends steps that need gradients to the torch reference.
"""
from ..dispatch import use_triton
from .reference import tc_decode_reference

try:  # CPU-only machines may lack triton
    from .triton import tc_decode_triton
except ImportError:
    tc_decode_triton = None

__all__ = ["tc_decode", "tc_decode_reference", "tc_decode_triton"]


def tc_decode(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate, gate, pos: int,
              normalize_k: bool = True, delta: bool = False):
    if use_triton(tc_decode_triton, q, k_new, v_new, ring_k, ring_v, state, decay, write_rate, gate,
                  backward=False):
        return tc_decode_triton(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate,
                                gate, pos, normalize_k, delta=delta)
    return tc_decode_reference(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate,
                               gate, pos, normalize_k, delta=delta)
