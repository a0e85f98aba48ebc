"""The fused Tensor Cache decode step against a float64 loop re-derived from docs/design.md#tensor-cache."""
import math

import pytest
import torch

from kernels.tc_decode import tc_decode, tc_decode_triton
from kernels.tc_decode.reference import tc_decode_reference
from models.rope import rope_cos_sin

from ..helpers import needs_triton, rel_err


def make_step(B=2, h=4, g=2, d=16, W=5, pos=9, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    ring_k, ring_v = r(B, g, W, d), r(B, g, W, d)
    empty = max(0, W - pos)  # slots at negative positions hold zeros, as in a fresh cache
    ring_k[:, :, :empty] = 0
    ring_v[:, :, :empty] = 0
    cos, sin = rope_cos_sin(torch.arange(pos - W, pos + 1), d, 10000.0, torch.float64)
    args = dict(q=r(B, h, d), k_new=r(B, g, d), v_new=r(B, g, d), ring_k=ring_k, ring_v=ring_v,
                state=r(B, h, d, d) * 0.3, cos=cos, sin=sin,
                decay=torch.rand(h, generator=gen, dtype=torch.float64) * 0.5 + 0.45,
                write_rate=torch.rand(h, generator=gen, dtype=torch.float64) + 0.1,
                gate=torch.rand(h, generator=gen, dtype=torch.float64))
    return {k: v.to(device, dtype) for k, v in args.items()}, pos


def loop_step(a, pos, normalize_k=True):
    """Per (batch, head) scalar-indexed loop in float64: the design's equations, nothing shared."""
    q, ring_k, ring_v = a["q"].double(), a["ring_k"].double(), a["ring_v"].double()
    B, h, d = q.shape
    g, W = ring_k.shape[1], ring_k.shape[2]
    half = d // 2
    freqs = [10000.0 ** (-2 * i / d) for i in range(half)]

    def rope(x, p):
        out = torch.empty_like(x)
        for i in range(half):
            c, s = math.cos(p * freqs[i]), math.sin(p * freqs[i])
            out[i] = x[i] * c - x[i + half] * s
            out[i + half] = x[i + half] * c + x[i] * s
        return out

    o = torch.zeros(B, h, d, dtype=torch.float64)
    new_state = torch.zeros(B, h, d, d, dtype=torch.float64)
    for b in range(B):
        for j in range(h):
            kv = j // (h // g)
            keys, values = [], []
            for p in range(pos - W + 1, pos + 1):  # the window (p > pos - W), real positions only
                if p < 0:
                    continue
                slot = p - (pos - W)
                k = a["k_new"][b, kv].double() if p == pos else ring_k[b, kv, slot]
                v = a["v_new"][b, kv].double() if p == pos else ring_v[b, kv, slot]
                keys.append(rope(k, p))
                values.append(v)
            qr = rope(q[b, j], pos)
            scores = torch.stack([qr @ k for k in keys]) / math.sqrt(d)
            w = torch.exp(scores - scores.max())
            o1 = sum(wi * v for wi, v in zip(w / w.sum(), values))
            k_e, v_e = ring_k[b, kv, 0], ring_v[b, kv, 0]  # position pos - W leaves now
            if normalize_k:
                k_e = k_e / max(k_e.norm().item(), 1e-12)
            A = a["decay"][j].double() * a["state"][b, j].double() \
                + a["write_rate"][j].double() * torch.outer(k_e, v_e)
            new_state[b, j] = A
            o[b, j] = o1 + a["gate"][j].double() * (q[b, j] @ A)
    return o, new_state


@pytest.mark.parametrize("B,h,g,d,W,pos,normalize", [
    (2, 4, 2, 16, 5, 9, True),     # GQA, full window
    (1, 3, 3, 8, 6, 2, True),      # early position: empty ring slots are masked
    (2, 2, 1, 8, 1, 4, False),     # W = 1: the window is the new token alone
    (1, 2, 2, 8, 4, 0, True),      # the very first token
])
def test_reference_equals_float64_loop(B, h, g, d, W, pos, normalize):
    a, pos = make_step(B, h, g, d, W, pos, seed=W + pos)
    want_o, want_state = loop_step(a, pos, normalize)
    o = tc_decode_reference(**a, pos=pos, normalize_k=normalize)
    assert rel_err(o, want_o) <= 1e-12 and rel_err(a["state"], want_state) <= 1e-12


def test_dispatcher_on_cpu_uses_reference():
    a, pos = make_step(dtype=torch.float32, seed=3)
    want_o, want_state = loop_step(a, pos)
    o = tc_decode(**a, pos=pos)
    assert o.dtype == torch.float32 and rel_err(o, want_o) <= 1e-5
    assert rel_err(a["state"], want_state) <= 1e-5


@needs_triton
@pytest.mark.parametrize("B,h,g,d,W,pos,normalize,block_w", [
    (2, 4, 2, 16, 37, 50, True, 16),   # three window tiles, the last ragged; GQA; batch 2
    (1, 3, 3, 24, 6, 2, True, 4),      # d = 24: padded to 32; early position: whole tile empty
    (2, 2, 1, 8, 1, 4, False, 64),     # W = 1, one head per KV head pair, no normalisation
    (1, 1, 1, 16, 8, 0, True, 8),      # one head, the very first token
])
def test_triton_equals_float64_loop(B, h, g, d, W, pos, normalize, block_w):
    a, pos = make_step(B, h, g, d, W, pos, dtype=torch.float32, seed=W * 7 + pos)
    want_o, want_state = loop_step(a, pos, normalize)
    o = tc_decode_triton(**a, pos=pos, normalize_k=normalize, block_w=block_w, block_i=8)
    assert rel_err(o, want_o) <= 1e-5, "output"
    assert rel_err(a["state"], want_state) <= 1e-5, "state written in place"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                       (torch.bfloat16, 3e-2)])
def test_triton_on_gpu_low_precision(dtype, tol):
    a, pos = make_step(4, 8, 2, 64, 512, 4000, dtype=dtype, device="cuda")
    ref = {k: v.double().cpu() for k, v in a.items()}
    want = tc_decode_reference(**ref, pos=pos)
    assert rel_err(tc_decode(**a, pos=pos).cpu(), want) <= tol
    assert rel_err(a["state"].cpu(), ref["state"]) <= tol
