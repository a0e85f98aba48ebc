"""Window attention: every form equals a materialised float64 band-masked softmax, forward and
gradients of q, k, v (ragged T, W not dividing T, W = 1, W >= T, GQA, a cache prefix).

The reference is written out here from docs/design.md#sliding-window-attention (nothing imported from
the code under test): query t, at key index t + L - T, sees keys j with 0 <= t + L - T - j < W.
"""
import pytest
import torch

from kernels.window_attention import (
    window_attention,
    window_attention_blocked,
    window_attention_masked,
    window_attention_triton,
)

from ..helpers import assert_all_close

# (B, H, G, T, L, W, d): ragged T, W not dividing T, W = 1, W >= T, GQA and MQA, a cache prefix
# (L > T: the ring of W earlier pairs, a partly filled ring, one decode query), batch 2.
SHAPES = [
    (2, 4, 2, 37, 37, 5, 16),    # GQA, T ragged against W and every block size
    (1, 2, 2, 40, 40, 1, 8),     # W = 1: each query sees itself only
    (2, 3, 3, 10, 10, 16, 8),    # W >= T: plain causal
    (1, 4, 1, 33, 33, 8, 8),     # MQA
    (2, 2, 2, 13, 20, 7, 8),     # prefill after a full ring of W pairs
    (2, 4, 2, 11, 14, 5, 8),     # a ring only partly filled (its empty slots dropped)
    (1, 4, 2, 1, 6, 5, 8),       # one decode query
]


def reference(q, k, v, W, scale=None, sinks=0):
    """softmax over the band (and the first `sinks` keys at or before the query), in float64,
    keys repeated per query head."""
    q, k, v = q.double(), k.double(), v.double()
    H, G, T, L = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lag = (torch.arange(T)[:, None] + L - T) - torch.arange(L)[None, :]
    seen = (lag >= 0) & ((lag < W) | (torch.arange(L)[None, :] < sinks))
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    return scores.softmax(-1) @ v


def make(B, H, G, T, L, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g, dtype=torch.float64)).to(device, dtype)
            for s in ((B, H, T, d), (B, G, L, d), (B, G, L, d), (B, H, T, d))]


def with_grads(fn, q, k, v, w):
    """o and the gradients of q, k, v under the random functional sum(o * w)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    o = fn(*leaves)
    (o * w.to(o.dtype)).sum().backward()
    return [o.detach()] + [x.grad for x in leaves]


def assert_close(got, want, tol):
    # floor 1: W = 1 makes dq and dk exactly zero, which a computed form meets only to rounding
    assert_all_close(("o", "dq", "dk", "dv"), got, want, tol, floor=1.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("block", [None, 3, 16])
@pytest.mark.parametrize("B,H,G,T,L,W,d", SHAPES)
def test_blocked_equals_reference(B, H, G, T, L, W, d, block, dtype, tol):
    q, k, v, w = make(B, H, G, T, L, d, dtype, seed=T * W + L)
    want = with_grads(lambda q, k, v: reference(q, k, v, W), q, k, v, w)
    got = with_grads(lambda q, k, v: window_attention_blocked(q, k, v, W, block=block), q, k, v, w)
    assert_close(got, want, tol)


@pytest.mark.parametrize("B,H,G,T,L,W,d", SHAPES)
def test_masked_equals_reference(B, H, G, T, L, W, d):
    q, k, v, w = make(B, H, G, T, L, d, torch.float64, seed=T + W)
    want = with_grads(lambda q, k, v: reference(q, k, v, W, scale=0.3), q, k, v, w)
    got = with_grads(lambda q, k, v: window_attention_masked(q, k, v, W, scale=0.3), q, k, v, w)
    assert_close(got, want, 1e-12)


def test_dispatcher_on_cpu_is_the_blocked_form():
    q, k, v, _ = make(2, 4, 2, 37, 40, 16, torch.float32, seed=5)
    assert torch.equal(window_attention(q, k, v, 5), window_attention_blocked(q, k, v, 5))
    with pytest.raises(ValueError, match="window"):
        window_attention(q, k, v, 0)


# Small blocks so that tiles are ragged and a query block spans several key blocks.
TRITON_SHAPES = [
    (2, 4, 2, 37, 37, 5, 16),    # GQA, ragged T, W not dividing T
    (1, 2, 2, 40, 40, 1, 16),    # W = 1
    (1, 2, 2, 10, 10, 24, 16),   # W > T
    (2, 4, 2, 19, 26, 7, 24),    # prefix of W keys; d = 24 padded to 32
    (1, 2, 1, 1, 9, 8, 16),      # one decode query, MQA
    (1, 2, 2, 50, 50, 20, 16),   # W spans several key blocks
]


@pytest.mark.skipif(window_attention_triton is None, reason="triton not installed")
@pytest.mark.parametrize("B,H,G,T,L,W,d", TRITON_SHAPES)
def test_triton_equals_reference(B, H, G, T, L, W, d):
    q, k, v, w = make(B, H, G, T, L, d, torch.float32, seed=T + L + W)
    want = with_grads(lambda q, k, v: reference(q, k, v, W), q, k, v, w)
    got = with_grads(lambda q, k, v: window_attention_triton(q, k, v, W, block_m=16, block_n=16),
                     q, k, v, w)
    assert_close(got, want, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("fn", [window_attention, window_attention_triton])
def test_gpu_paths(fn, dtype, tol):
    """The dispatcher (Triton for bf16, SDPA per block for fp32) and the kernel itself."""
    q, k, v, w = make(2, 8, 2, 1000, 1100, 64, dtype, seed=0, device="cuda")
    want = with_grads(lambda q, k, v: reference(q, k, v, 100),
                      *(x.cpu().double() for x in (q, k, v, w)))
    got = with_grads(lambda q, k, v: fn(q, k, v, 100), q, k, v, w)
    assert_close([x.cpu() for x in got], want, tol)


# Attention sinks: (B, H, G, T, L, W, S, d). The first S keys stay seen beyond the band; sinks
# inside the band count once; S > L; a prefix (sinks then a ring, as a cache hands them over).
SINK_SHAPES = [
    (2, 4, 2, 37, 37, 5, 4, 16),   # GQA, training shape
    (1, 2, 2, 40, 40, 1, 1, 16),   # W = 1, one sink
    (1, 2, 2, 50, 50, 20, 40, 16), # sinks spanning several key blocks and the band
    (2, 2, 1, 13, 20, 3, 8, 16),   # a prefix: 8 sinks and partly the band, MQA
    (1, 4, 2, 1, 9, 3, 2, 16),     # one decode query
    (1, 2, 2, 10, 10, 24, 3, 16),  # W > T: the sinks add nothing
    (1, 2, 2, 6, 6, 2, 30, 16),    # S > L: plain causal
]


@pytest.mark.parametrize("B,H,G,T,L,W,S,d", SINK_SHAPES)
def test_sinks_equal_reference(B, H, G, T, L, W, S, d):
    q, k, v, w = make(B, H, G, T, L, d, torch.float64, seed=T + W + S)
    want = with_grads(lambda q, k, v: reference(q, k, v, W, sinks=S), q, k, v, w)
    for fn in (lambda q, k, v: window_attention_blocked(q, k, v, W, sinks=S),
               lambda q, k, v: window_attention_blocked(q, k, v, W, block=3, sinks=S),
               lambda q, k, v: window_attention_masked(q, k, v, W, sinks=S),
               lambda q, k, v: window_attention(q, k, v, W, sinks=S)):
        assert_close(with_grads(fn, q, k, v, w), want, 1e-12)
    if window_attention_triton is not None:  # TRITON_INTERPRET=1 on CPU
        q, k, v, w = (x.float() for x in (q, k, v, w))
        got = with_grads(lambda q, k, v: window_attention_triton(q, k, v, W, block_m=16,
                                                                 block_n=16, sinks=S), q, k, v, w)
        assert_close(got, want, 1e-5)


def test_zero_sinks_is_the_band():
    q, k, v, _ = make(2, 4, 2, 37, 40, 16, torch.float32, seed=9)
    assert torch.equal(window_attention_blocked(q, k, v, 5, sinks=0),
                       window_attention_blocked(q, k, v, 5))
