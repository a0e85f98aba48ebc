"""TPA decode from factors equals softmax attention over the materialised q, k, v."""
import math

import pytest
import torch

from kernels.tpa_decode import tpa_decode, tpa_decode_triton
from kernels.tpa_decode.reference import tpa_decode_reference

from ..helpers import needs_triton, rel_err


def make_factors(B=2, L=37, h=4, d=16, Rq=6, Rk=2, Rv=3, dtype=torch.float64, seed=0,
                 device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Rq, h), (B, Rq, d), (B, L, Rk, h), (B, L, Rk, d), (B, L, Rv, h), (B, L, Rv, d)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


def materialised_attention(a_q, b_q, a_k, b_k, a_v, b_v):
    """Independent form, fp64: Q = 1/Rq sum_r a_q (x) b_q, K and V likewise, softmax attention."""
    a_q, b_q, a_k, b_k, a_v, b_v = (x.double() for x in (a_q, b_q, a_k, b_k, a_v, b_v))
    Q = torch.einsum("brh,brd->bhd", a_q, b_q) / a_q.shape[1]  # (B, h, d)
    K = torch.einsum("blsh,blsd->blhd", a_k, b_k) / a_k.shape[2]  # (B, L, h, d)
    V = torch.einsum("blsh,blsd->blhd", a_v, b_v) / a_v.shape[2]
    p = torch.softmax(torch.einsum("bhd,blhd->bhl", Q, K) / math.sqrt(Q.shape[-1]), dim=-1)
    return torch.einsum("bhl,blhd->bhd", p, V)


@needs_triton
@pytest.mark.parametrize("B,L,h,d,Rq,Rk,Rv", [(2, 37, 4, 16, 6, 2, 3), (1, 1, 3, 8, 1, 1, 1),
                                              (3, 50, 8, 32, 12, 1, 2)])
def test_reference_equals_materialised_attention(B, L, h, d, Rq, Rk, Rv):
    factors = make_factors(B, L, h, d, Rq, Rk, Rv, seed=L)
    assert rel_err(tpa_decode_reference(*factors), materialised_attention(*factors)) <= 1e-12


def test_dispatcher_on_cpu_uses_reference():
    factors = make_factors(dtype=torch.float32)
    assert tpa_decode(*factors).dtype == torch.float32
    assert rel_err(tpa_decode(*factors), materialised_attention(*factors)) <= 1e-5


@pytest.mark.parametrize("B,L,h,d,Rq,Rk,Rv", [(2, 37, 4, 16, 6, 2, 3), (1, 16, 20, 24, 1, 1, 1),
                                              (1, 5, 2, 16, 17, 3, 2)])
def test_triton_equals_reference(B, L, h, d, Rq, Rk, Rv):
    # L = 37 with split 16: three splits, the last ragged; h = 20, d = 24, Rq = 17 are masked pads.
    factors = make_factors(B, L, h, d, Rq, Rk, Rv, dtype=torch.float32, seed=L + h)
    o = tpa_decode_triton(*factors, split_size=16)
    assert rel_err(o, materialised_attention(*factors)) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                       (torch.bfloat16, 3e-2)])
def test_triton_on_gpu_low_precision(dtype, tol):
    factors = make_factors(2, 4099, 16, 64, 16, 2, 2, dtype=dtype, device="cuda")
    assert rel_err(tpa_decode(*factors), materialised_attention(*factors)) <= tol
