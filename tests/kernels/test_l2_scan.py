"""The evicted-write scan: every fast form equals the per-token recurrence, forward and backward.

Independent references: the token loop (`evicted_scan_loop`) and, to check the loop itself,
the parallel form O = eta * ((Q K^T) * M) V + lam^(t+1) Q A_{-1}, M[t,i] = lam^(t-i-W) (t-i >= W).
"""
import pytest
import torch

from kernels.l2_scan import evicted_scan, evicted_scan_triton
from kernels.l2_scan.reference import chunk_mean_scan, chunk_mean_scan_loop, evicted_scan_chunked, evicted_scan_loop

from ..helpers import assert_all_close, needs_triton, rel_err, with_grads

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
# (B, H, T, W, C): ragged T, W = 0, W not a multiple of C, W > T, C = 1, one chunk only.
SHAPES = [(2, 3, 37, 5, 16), (1, 1, 37, 0, 8), (2, 2, 20, 25, 16), (1, 3, 64, 16, 16),
          (2, 2, 33, 3, 1), (1, 2, 5, 2, 64), (1, 2, 40, 21, 7)]
# The grid, W in {1, 3, 16} x C in {1, 4, 16}, at a ragged T.
SHAPES += [(2, 2, 23, W, C) for W in (1, 3, 16) for C in (1, 4, 16)]


def make_inputs(B, H, T, Dk=8, Dv=6, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    q, k, v = rnd(B, H, T, Dk), rnd(B, H, T, Dk), rnd(B, H, T, Dv)
    decay = (0.5 + 0.45 * torch.rand(H, generator=g, dtype=dtype)).to(device)
    write_rate = (0.5 + torch.rand(H, generator=g, dtype=dtype)).to(device)
    initial_state = rnd(B, H, Dk, Dv)
    return q, k, v, decay, write_rate, initial_state


def assert_scan_close(got, want, tol):
    names = ["o", "final_state", "dq", "dk", "dv", "ddecay", "dwrite_rate", "dinitial_state"]
    assert_all_close(names[:len(got)], got, want, tol)


def loop(window):
    return lambda q, k, v, lam, eta, h0: evicted_scan_loop(
        q, k, v, lam, eta, window, initial_state=h0, output_final_state=True)


def test_loop_matches_parallel_form():
    B, H, T, W = 2, 3, 30, 4
    q, k, v, lam, eta, h0 = make_inputs(B, H, T)
    t = torch.arange(T, dtype=torch.float64)
    lag = t[:, None] - t[None, :] - W
    M = torch.where(lag >= 0, lam.view(H, 1, 1) ** lag.clamp(min=0), 0.0)  # (H, T, T)
    o = eta.view(1, H, 1, 1) * ((q @ k.transpose(-1, -2)) * M) @ v
    o = o + (lam.view(1, H, 1, 1) ** (t.view(1, 1, T, 1) + 1)) * (q @ h0)
    assert rel_err(evicted_scan_loop(q, k, v, lam, eta, W, initial_state=h0)[0], o) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,T,W,C", SHAPES)
def test_chunked_equals_loop(B, H, T, W, C, dtype):
    inputs = make_inputs(B, H, T, dtype=dtype, seed=T + W + C)
    want = with_grads(loop(W), inputs)
    got = with_grads(lambda q, k, v, lam, eta, h0: evicted_scan_chunked(
        q, k, v, lam, eta, W, C, initial_state=h0, output_final_state=True), inputs)
    assert_scan_close(got, want, TOL[dtype])


def test_dispatcher_on_cpu_is_the_exact_scan():
    q, k, v, lam, eta, _ = make_inputs(2, 2, 29, dtype=torch.float32)
    o, final = evicted_scan(q, k, v, lam, eta, window=3, chunk_size=8)
    assert final is None
    assert rel_err(o, evicted_scan_loop(q, k, v, lam, eta, 3)[0]) <= 1e-5
    with pytest.raises(ValueError):
        evicted_scan(q, k, v, lam, eta, window=3, mode="mean")


@pytest.mark.parametrize("W,T1", [(0, 9), (5, 16), (5, 3), (12, 20)])
def test_prefill_then_decode_hand_off(W, T1):
    """Scan T1 tokens keeping A_{T1-1}, then decode token by token with the kept k, v (the
    ring buffer): outputs and final state equal one scan over all T tokens."""
    T, C = 27, 8
    q, k, v, lam, eta, _ = make_inputs(2, 3, T)
    o_all, final_all = evicted_scan(q, k, v, lam, eta, W, C, output_final_state=True)
    o_pre, A = evicted_scan(q[:, :, :T1], k[:, :, :T1], v[:, :, :T1], lam, eta, W, C,
                            output_final_state=True)
    outs = [o_pre]
    for t in range(T1, T):
        A = lam.view(1, -1, 1, 1) * A
        if t >= W:  # the pair evicted from the window at step t
            A = A + eta.view(1, -1, 1, 1) * k[:, :, t - W, :, None] * v[:, :, t - W, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], A)[:, :, None])
    assert rel_err(torch.cat(outs, dim=2), o_all) <= 1e-12
    assert rel_err(A, final_all) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,T,W,C", SHAPES)
def test_chunk_mean_equals_its_loop(B, H, T, W, C, dtype):
    inputs = make_inputs(B, H, T, dtype=dtype, seed=T * W + C)
    want = with_grads(lambda q, k, v, lam, eta, h0: chunk_mean_scan_loop(
        q, k, v, lam, eta, W, C, initial_state=h0, output_final_state=True), inputs)
    got = with_grads(lambda q, k, v, lam, eta, h0: evicted_scan(
        q, k, v, lam, eta, W, C, mode="chunk_mean", initial_state=h0, output_final_state=True),
        inputs)
    assert_scan_close(got, want, TOL[dtype])


def test_chunk_mean_loop_is_the_formula():
    """One head, C = 2, W = 1, T = 5: A is written at delayed positions 1 and 3 only."""
    q, k, v, lam, eta, _ = make_inputs(1, 1, 5, Dk=3, Dv=2)
    o, _ = chunk_mean_scan_loop(q, k, v, lam, eta, window=1, chunk_size=2)
    lam, eta = lam[0], eta[0]
    kk, vv, qq = k[0, 0], v[0, 0], q[0, 0]
    A1 = eta * torch.outer(kk[0] / 2, vv[0] / 2)  # delayed chunk (0, k_0): mean is k_0 / 2
    A3 = lam * A1 + eta * torch.outer((kk[1] + kk[2]) / 2, (vv[1] + vv[2]) / 2)
    want = torch.stack([torch.zeros(2, dtype=q.dtype), qq[1] @ A1, qq[2] @ A1,
                        qq[3] @ A3, qq[4] @ A3])
    assert rel_err(o[0, 0], want) <= 1e-12


def test_chunk_mean_is_exact_at_c1_and_differs_beyond():
    inputs = make_inputs(2, 2, 40, dtype=torch.float64)
    exact = with_grads(loop(3), inputs)
    mean_c1 = with_grads(lambda q, k, v, lam, eta, h0: chunk_mean_scan(
        q, k, v, lam, eta, 3, 1, initial_state=h0, output_final_state=True), inputs)
    assert_scan_close(mean_c1, exact, 1e-12)
    q, k, v, lam, eta, _ = inputs
    gaps = [rel_err(chunk_mean_scan(q, k, v, lam, eta, 3, C)[0], exact[0]) for C in (2, 8)]
    assert 1e-3 < gaps[0] and 1e-3 < gaps[1]


def triton_scan(window, chunk_size):
    return lambda q, k, v, lam, eta, h0: evicted_scan_triton(
        q, k, v, lam, eta, window, chunk_size, initial_state=h0, output_final_state=True)


# Interpreter-sized (B, H, T, W, C, Dk, Dv): ragged T, W = 0, W > T, W not a multiple of C,
# Dk < 16 (masked columns) and Dv = 40 (two fp32 Dv blocks of 32, the second part-masked,
# whose dq/dk partials are summed).
TRITON_SHAPES = [(2, 3, 37, 5, 16, 16, 16), (1, 1, 20, 0, 16, 16, 16), (2, 2, 20, 25, 16, 16, 16),
                 (1, 2, 40, 21, 16, 8, 16), (1, 2, 20, 3, 16, 16, 40)]


@needs_triton
@pytest.mark.parametrize("B,H,T,W,C,Dk,Dv", TRITON_SHAPES)
def test_triton_equals_loop(B, H, T, W, C, Dk, Dv):
    inputs = make_inputs(B, H, T, Dk, Dv, dtype=torch.float32, seed=T + W)
    want = with_grads(loop(W), inputs)
    assert_scan_close(with_grads(triton_scan(W, C), inputs), want, 1e-5)


@needs_triton
def test_triton_without_initial_or_final_state():
    inputs = make_inputs(2, 2, 30, 16, 16, dtype=torch.float32)[:5]
    leaves = [x.requires_grad_(True) for x in inputs]
    o, final = evicted_scan_triton(*leaves, window=4, chunk_size=16)
    assert final is None
    grads = torch.autograd.grad((o * o.detach().cos()).sum(), leaves)
    o_ref = evicted_scan_loop(*leaves, window=4)[0]
    grads_ref = torch.autograd.grad((o_ref * o_ref.detach().cos()).sum(), leaves)
    assert rel_err(o, o_ref) <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= 1e-5


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                       (torch.bfloat16, 3e-2)])
def test_triton_on_gpu_low_precision(dtype, tol):
    """The CUDA dispatch (Triton) in half precision vs fp64 on the same rounded inputs."""
    inputs = make_inputs(2, 4, 300, 64, 64, device="cuda")
    # q, k, v, initial_state in the test dtype; decay and write rate stay fp32 parameters.
    inputs = [x.float() if i in (3, 4) else x.to(dtype) for i, x in enumerate(inputs)]
    fast = lambda q, k, v, lam, eta, h0: evicted_scan(  # noqa: E731
        q, k, v, lam, eta, 37, 64, initial_state=h0, output_final_state=True)
    got = [x.double() for x in with_grads(fast, inputs)]
    want = with_grads(loop(37), [x.double() for x in inputs])
    assert_scan_close(got, want, tol)
