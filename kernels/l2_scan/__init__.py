"""Evicted-write (L2) scan of the Tensor Cache: one entry point, the fast path picked by device.

    A_t = lam * A_{t-1} + eta * k_{t-W}^T v_{t-W}  (write only when t >= W),   o_t = q_t A_t

initial_state is A_{-1} (decayed at every step: A_t holds lam^(t+1) A_{-1}); final_state is
A_{T-1}, so the next decode step is A_T = lam * A_{T-1} + eta * k_{T-W}^T v_{T-W}; it is
kept in the wider of (q, decay) dtypes (fp32 for bf16 activations with fp32 decay).
mode="chunk_mean" is the ablation of docs/design.md#the-chunk_mean-ablation (torch only);
mode="delta" is the delta write of docs/design.md#the-delta-write,
    A_t = lam * A_{t-1} + eta * k_{t-W}^T (v_{t-W} - k_{t-W} A_{t-1}),
run by flash-linear-attention's chunk_gated_delta_rule (gated_delta.py) for CUDA bf16 / fp16
activations when fla-core is installed, by the chunked torch form otherwise (delta_kernel).
See reference.py for the forms.
"""
import importlib.util

import torch

from ..dispatch import HALF, use_triton
from .gated_delta import delta_scan_fla, to_gated_delta_rule
from .reference import (chunk_mean_scan, delta_scan_chunked, delta_scan_loop, evicted_scan_chunked,
                        evicted_scan_loop)

try:  # CPU-only machines may lack triton; the torch path covers them.
    from .triton import evicted_scan_triton
except ImportError:
    evicted_scan_triton = None

# fla-core (Linux only) is imported on first use: importing it costs seconds and warns on CPUs.
FLA_DELTA = delta_scan_fla if importlib.util.find_spec("fla") is not None else None

__all__ = ["evicted_scan", "evicted_scan_loop", "evicted_scan_chunked", "chunk_mean_scan",
           "delta_scan_loop", "delta_scan_chunked", "delta_scan_fla", "delta_kernel",
           "to_gated_delta_rule", "evicted_scan_triton"]


def delta_kernel(q: torch.Tensor):
    """The delta write's training path for activations q: fla's chunk_gated_delta_rule for CUDA
    bf16 / fp16 (benchmarks/gpu_kernels.py --tables delta measures it against the torch form),
    the chunked torch form otherwise: on CPUs, in float64, and in fp32, where fla's dots run in
    TF32 and the torch form keeps fp32's 1e-5 (docs/design.md#the-delta-write)."""
    return delta_scan_fla if use_triton(FLA_DELTA, q, dtypes=HALF, backward=True) else delta_scan_chunked


def evicted_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                 write_rate: torch.Tensor, window: int, chunk_size: int = 64,
                 mode: str = "exact", initial_state: torch.Tensor | None = None,
                 output_final_state: bool = False):
    """q, k (B,H,T,Dk), v (B,H,T,Dv), decay and write_rate (H,), initial_state (B,H,Dk,Dv)
    -> (o (B,H,T,Dv), final_state (B,H,Dk,Dv) or None)."""
    if window < 0 or chunk_size < 1:
        raise ValueError(f"need window >= 0 and chunk_size >= 1, got {window}, {chunk_size}")
    args = (q, k, v, decay, write_rate, window, chunk_size)
    kwargs = dict(initial_state=initial_state, output_final_state=output_final_state)
    if mode == "chunk_mean":
        return chunk_mean_scan(*args, **kwargs)
    if mode == "delta":
        return delta_kernel(q)(*args, **kwargs)
    if mode != "exact":
        raise ValueError(f"mode must be 'exact', 'chunk_mean' or 'delta', got {mode!r}")
    if use_triton(evicted_scan_triton, q, k, v, decay, write_rate, backward=True):
        return evicted_scan_triton(*args, **kwargs)
    return evicted_scan_chunked(*args, **kwargs)
