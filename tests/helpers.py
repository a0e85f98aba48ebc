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


def with_grads(fn, inputs, seed=1):
    """fn(*inputs) -> (o, final_state), then the backward of a fixed random linear functional of
    both (weights drawn in fp64, then cast, so every dtype sees the same ones). Returns o, the
    final state and every input's gradient (zeros where an input got none: a key never evicted)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, final = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    w_o = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)
    w_f = torch.randn(final.shape, generator=g, dtype=torch.float64).to(final)
    ((o * w_o).sum() + (final * w_f).sum()).backward()
    return [o.detach(), final.detach()] + [
        torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]
