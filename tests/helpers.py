"""What the tests share: one way to compare a computed tensor with its reference, and the mark
for tests of Triton kernels."""
import importlib.util

import pytest
import torch

# Triton ships Linux wheels only (the lock installs it there); on macOS the torch paths are tested.
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed (Linux only)")


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """max |got - want| over the reference's largest |entry| (or over `floor` when that is
    smaller: floor 1 makes it an absolute error for references that are exactly 0), in float64."""
    got, want = got.double(), want.double()
    return (got - want).abs().max().item() / max(want.abs().max().item(), floor)


def assert_all_close(names, got, want, tol: float, floor: float = 1e-30) -> None:
    """Each named pair has the same shape and rel_err <= tol; the message names the worst."""
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape, (name, tuple(a.shape), tuple(b.shape))
        assert rel_err(a, b, floor) <= tol, (name, rel_err(a, b, floor))
