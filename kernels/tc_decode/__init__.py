"""Tensor Cache decode step (window attention + L2 write of the evicted pair + L2 read), fused.

    o = softmax(rope(q) rope(K_window)^T * scale) V_window + g * q (lam A + eta k_e^T v_e)

tc_decode(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate, gate, pos,
normalize_k) -> o (B, h, d); `state` is updated in place, the ring is only read. CUDA tensors go
to the Triton kernel (when triton imports; forward only), others to the torch reference.
"""
import torch

from .reference import tc_decode_reference

try:  # CPU-only machines may lack triton
    from .triton import tc_decode_triton
except ImportError:
    tc_decode_triton = None

__all__ = ["tc_decode", "tc_decode_reference", "tc_decode_triton"]


def tc_decode(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate, gate, pos: int,
              normalize_k: bool = True):
    # the kernel has no backward: a step that needs gradients stays on the differentiable torch path
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k_new, v_new, decay, write_rate, gate))
    if q.is_cuda and q.dtype != torch.float64 and tc_decode_triton is not None and not needs_grad:
        return tc_decode_triton(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate,
                                gate, pos, normalize_k)
    return tc_decode_reference(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate,
                               gate, pos, normalize_k)
