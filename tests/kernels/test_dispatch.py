"""The one dispatch rule every kernel follows (kernels.dispatch.use_triton)."""
from dataclasses import dataclass

import torch

from kernels.dispatch import HALF, use_triton


@dataclass
class FakeTensor:  # what the rule reads of a tensor; no GPU needed to check it
    is_cuda: bool = True
    dtype: torch.dtype = torch.float32
    requires_grad: bool = False

    def is_floating_point(self):
        return self.dtype.is_floating_point


KERNEL = object()


def test_triton_only_for_cuda_tensors_with_a_kernel():
    assert use_triton(KERNEL, FakeTensor(), FakeTensor(), backward=True)
    assert not use_triton(None, FakeTensor(), backward=True)  # triton did not import
    assert not use_triton(KERNEL, FakeTensor(), FakeTensor(is_cuda=False), backward=True)
    assert not use_triton(KERNEL, torch.randn(3), backward=True)  # a real CPU tensor


def test_float64_and_unlisted_dtypes_stay_on_torch():
    assert not use_triton(KERNEL, FakeTensor(dtype=torch.float64), backward=True)
    assert not use_triton(KERNEL, FakeTensor(dtype=torch.float32), dtypes=HALF, backward=True)
    assert use_triton(KERNEL, FakeTensor(dtype=torch.bfloat16), dtypes=HALF, backward=True)
    assert use_triton(KERNEL, FakeTensor(), FakeTensor(dtype=torch.int64), backward=True)  # ids


def test_forward_only_kernels_never_run_when_gradients_are_needed():
    wants_grad = FakeTensor(requires_grad=True)
    assert not use_triton(KERNEL, FakeTensor(), wants_grad, backward=False)
    assert use_triton(KERNEL, FakeTensor(), wants_grad, backward=True)
    with torch.no_grad():
        assert use_triton(KERNEL, FakeTensor(), wants_grad, backward=False)
