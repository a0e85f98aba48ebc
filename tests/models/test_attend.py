"""attend(): its fast paths (SDPA is_causal without a prefix, the prefix mask, decode's grouped
heads, the O(T W) window) equal softmax under the explicit mask, forward and gradients."""
import pytest
import torch

from models.attention.base import attend
from tests.kernels.test_window_attention import assert_close, make, reference, with_grads


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("H,G,T,L", [(4, 4, 29, 29), (4, 2, 29, 29), (4, 1, 16, 16),
                                     (4, 2, 9, 30), (4, 4, 1, 30), (4, 2, 1, 30)])
def test_attend_causal_paths_equal_the_mask(H, G, T, L, dtype, tol):
    """is_causal (no prefix), the prefix mask and decode's grouped heads: all the causal band."""
    q, k, v, w = make(2, H, G, T, L, 8, dtype, seed=H + G + T)
    want = with_grads(lambda q, k, v: reference(q, k, v, L), q, k, v, w)
    assert_close(with_grads(attend, q, k, v, w), want, tol)
    want = with_grads(lambda q, k, v: reference(q, k, v, 3, scale=0.2), q, k, v, w)
    assert_close(with_grads(lambda q, k, v: attend(q, k, v, window=3, scale=0.2), q, k, v, w),
                 want, tol)
