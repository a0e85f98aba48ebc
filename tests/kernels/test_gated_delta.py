"""The delta write as flash-linear-attention's gated delta rule (kernels/l2_scan/gated_delta.py).

Our write A_t = lam A_{t-1} + eta k^T (v - k A_{t-1}) is fla's rule with alpha = lam,
beta = eta / lam, v scaled by lam and scale 1. Checked, forward and backward, on fresh random
inputs against our token loop (delta_scan_loop): through a gated-delta-rule loop written here
from fla's documented definition (float64, 1e-12) and through fla's own naive recurrence (it
computes in float32: 1e-5). Then the one dispatch rule: torch on CPUs, fla for CUDA half
precision, and on a GPU the fla path against the loop.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels.l2_scan as l2_scan
from kernels.l2_scan import (
    delta_kernel,
    delta_scan_chunked,
    delta_scan_fla,
    delta_scan_loop,
    evicted_scan,
    to_gated_delta_rule,
)

from ..helpers import assert_all_close, rel_err, with_grads
from .test_dispatch import FakeTensor

NAMES = ["o", "final_state", "dq", "dk", "dv", "ddecay", "dwrite_rate", "dinitial_state"]


def gated_delta_rule_loop(q, k, v, g, beta, scale, initial_state):
    """fla's documented rule, token by token, in its (B, T, H, D) layout:
    S_t = exp(g_t) S_{t-1};  S_t += beta_t k_t^T (v_t - k_t S_t);  o_t = scale q_t S_t."""
    S, outs = initial_state, []
    for t in range(q.shape[1]):
        S = g[:, t, :, None, None].exp() * S
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + beta[:, t, :, None, None] * k[:, t, :, :, None] * error[:, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1), S


def ours(window):
    return lambda q, k, v, lam, eta, h0: delta_scan_loop(q, k, v, lam, eta, window, h0, True)


def through_fla_rule(rule, window):
    """rule(**fla's arguments) mapped back to our layout: (B, T, H, Dv) -> (B, H, T, Dv)."""
    def scan(q, k, v, lam, eta, h0):
        o, final = rule(**to_gated_delta_rule(q, k, v, lam, eta, window, h0))
        return o.transpose(1, 2), final
    return scan


def make_inputs(B, H, T, Dk=8, Dv=6, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, H, T, Dk), F.normalize(rnd(B, H, T, Dk), dim=-1), rnd(B, H, T, Dv)
    decay = 0.5 + 0.45 * torch.rand(H, generator=g, dtype=torch.float64)
    write_rate = 0.05 + 0.9 * torch.rand(H, generator=g, dtype=torch.float64)  # sigmoid's range
    initial_state = 0.3 * rnd(B, H, Dk, Dv)
    rates = torch.promote_types(dtype, torch.float32)  # decay and write rate: fp32 parameters
    return [q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), decay.to(device, rates),
            write_rate.to(device, rates), initial_state.to(device, dtype)]


@pytest.mark.parametrize("B,H,T,W", [(2, 3, 29, 0), (1, 2, 37, 5), (2, 2, 9, 12)])
def test_mapping_equals_our_loop_float64(B, H, T, W):
    """fla's rule under the mapping is our write to 1e-12, every gradient included (W = 0, a
    delay, and W > T where only the initial state decays)."""
    inputs = make_inputs(B, H, T, seed=T + W)
    want = with_grads(ours(W), inputs)
    got = with_grads(through_fla_rule(gated_delta_rule_loop, W), inputs)
    assert_all_close(NAMES, got, want, 1e-12)
    written = ["dq", "dk", "dv", "ddecay", "dwrite_rate"] if W < T else ["dq", "ddecay"]
    assert all(want[NAMES.index(n)].abs().max() > 0 for n in written + ["dinitial_state"])


def test_mapping_breaks_without_the_lam_factors():
    """The lam scalings matter: beta = eta (no / lam) or unscaled v is another write."""
    q, k, v, lam, eta, h0 = make_inputs(1, 2, 30, seed=3)
    want, _ = delta_scan_loop(q, k, v, lam, eta, 4, h0)
    args = to_gated_delta_rule(q, k, v, lam, eta, 4, h0)
    for wrong in (dict(args, beta=args["beta"] * lam.view(1, 1, -1)),
                  dict(args, v=args["v"] / lam.view(1, 1, -1, 1))):
        assert rel_err(gated_delta_rule_loop(**wrong)[0].transpose(1, 2), want) > 1e-2


def test_fla_naive_recurrence_equals_our_loop():
    """fla's own per-token reference (naive_recurrent_gated_delta_rule, float32 inside) under the
    mapping, forward and backward, against our float64 loop on the same inputs."""
    naive = pytest.importorskip("fla.ops.gated_delta_rule").naive_recurrent_gated_delta_rule
    inputs = make_inputs(2, 2, 37, seed=11)
    want = with_grads(ours(5), inputs)
    got = with_grads(through_fla_rule(
        lambda **a: naive(**a, output_final_state=True), 5), inputs)
    assert got[0].dtype == torch.float32  # fla's reference computes in float32 whatever it gets
    assert_all_close(NAMES, got, want, 1e-5)


def test_dispatch_picks_torch_on_cpu(monkeypatch):
    """CPU tensors take the chunked torch form whatever their dtype, fla installed or not; CUDA
    (faked) bf16 / fp16 take fla when it is installed, fp32 and float64 stay on torch."""
    monkeypatch.setattr(l2_scan, "FLA_DELTA", delta_scan_fla)  # as if fla-core were installed
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for grad in (False, True):
            assert delta_kernel(torch.zeros(1, dtype=dtype, requires_grad=grad)) is delta_scan_chunked
    cuda = lambda dtype: FakeTensor(dtype=dtype, requires_grad=True)  # noqa: E731
    assert delta_kernel(cuda(torch.bfloat16)) is delta_scan_fla
    assert delta_kernel(cuda(torch.float16)) is delta_scan_fla
    assert delta_kernel(cuda(torch.float32)) is delta_scan_chunked
    assert delta_kernel(cuda(torch.float64)) is delta_scan_chunked
    monkeypatch.setattr(l2_scan, "FLA_DELTA", None)  # fla-core missing
    assert delta_kernel(cuda(torch.bfloat16)) is delta_scan_chunked
    # and the entry point on CPU returns the torch form's values, bit for bit
    q, k, v, lam, eta, h0 = make_inputs(2, 2, 23, dtype=torch.float32, seed=5)
    got = evicted_scan(q, k, v, lam, eta, 3, 8, mode="delta", initial_state=h0,
                       output_final_state=True)
    want = delta_scan_chunked(q, k, v, lam, eta, 3, 8, initial_state=h0, output_final_state=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert rel_err(got[0], delta_scan_loop(*(x.double() for x in (q, k, v, lam, eta)), 3,
                                           h0.double())[0]) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_fla_path_on_gpu(dtype, tol):
    """The CUDA dispatch in half precision (fla's chunk_gated_delta_rule when fla-core is
    installed) against our float64 loop on the same rounded inputs, with every gradient."""
    inputs = make_inputs(2, 4, 300, 32, 32, dtype=dtype, seed=0, device="cuda")  # gpu.yaml's d_head
    assert delta_kernel(inputs[0]) is (delta_scan_fla if l2_scan.FLA_DELTA else delta_scan_chunked)
    fast = lambda q, k, v, lam, eta, h0: evicted_scan(  # noqa: E731
        q, k, v, lam, eta, 37, 64, mode="delta", initial_state=h0, output_final_state=True)
    got = [x.double() for x in with_grads(fast, inputs)]
    want = with_grads(ours(37), [x.double() for x in inputs])
    assert_all_close(NAMES, got, want, tol)
