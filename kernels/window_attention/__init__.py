"""Sliding-window attention at O(T W): one entry point, the fast path picked by device.

    o_t = softmax_j(q_t k_j^T * scale) v_j   over the W most recent keys j <= t (its own included)
                                             and the first `sinks` keys j <= t (attention sinks)

window_attention(q, k, v, window, scale=None, sinks=0) -> o (B, H, T, dv): q (B, H, T, d), k and
v (B, G, L, .) with L >= T, the queries being the last T keys (reference.py has the contract).
CUDA tensors in bf16 / fp16 go to the Triton kernel (forward and backward; when triton
imports, one head dim for q, k, v); everything else to the blocked torch form (one SDPA over
query blocks, each against its W - 1 + n keys). Both equal the masked T x L reference.
Why the split (benchmarks/gpu_kernels.py --tables window; H200, W 512, T 2k-32k, fwd + bwd):
in bf16 the kernel is 2.5-3x faster than SDPA per block and 1.3-1.5x faster than compiled
FlexAttention up to 8k (Flex is 1.17x faster at 32k); in fp32 its IEEE dots (no TF32:
exactness first) are 15-22x slower than SDPA per block.
"""
from ..dispatch import HALF, use_triton
from .reference import band_mask, window_attention_blocked, window_attention_masked

try:  # CPU-only machines may lack triton
    from .triton import window_attention_triton
except ImportError:
    window_attention_triton = None

__all__ = ["window_attention", "window_attention_blocked", "window_attention_masked",
           "window_attention_triton", "band_mask"]


def window_attention(q, k, v, window: int, scale: float | None = None, sinks: int = 0):
    if window < 1 or sinks < 0 or k.shape[2] < q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"need window >= 1, sinks >= 0, L >= T and G | H; got W={window}, "
                         f"sinks={sinks}, q {tuple(q.shape)}, k {tuple(k.shape)}")
    same_dim = q.shape[-1] == k.shape[-1] == v.shape[-1]  # the kernel's one head dim
    if same_dim and use_triton(window_attention_triton, q, k, v, dtypes=HALF, backward=True):
        return window_attention_triton(q, k, v, window, scale, sinks=sinks)
    return window_attention_blocked(q, k, v, window, scale, sinks=sinks)
