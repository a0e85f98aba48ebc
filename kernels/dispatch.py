"""The one rule every kernel dispatcher follows: Triton or the torch reference.

Triton runs only when
- triton imported (CPU-only machines may lack it) and every tensor is on a CUDA device;
- the tensors' dtype is one the kernel is fast and exact enough in: never float64 (the kernels
  accumulate in fp32), and fp32 only where the kernel says so;
- no gradient is needed, unless the kernel has a backward.
Everything else takes the torch path, which is always correct, on any device.
"""
from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)
FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(kernel, *tensors: torch.Tensor, dtypes: tuple = FLOAT, backward: bool) -> bool:
    """Whether `kernel` (None when its library, triton or fla-core, is missing) should run on
    `tensors`."""
    if kernel is None or not all(t.is_cuda for t in tensors):
        return False
    if any(t.dtype not in dtypes for t in tensors if t.is_floating_point()):
        return False
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return backward or not needs_grad
