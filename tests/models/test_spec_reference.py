"""SWA and Tensor Cache layers against docs/design.md written out as materialised float64 attention.

Decode-vs-forward cannot catch a window or a delay that is wrong the same way in both paths;
this builds the band mask, the eviction matrix M[t, i] = lam^(t-i-W) (t - i >= W) and RoPE
(re-derived here, not imported) straight from the spec and compares the layers' outputs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from models import build_model

from ..variants import config


def rope(x, positions, base):
    """Rotate pairs (x_j, x_{j + d/2}) by angle pos * base^(-2j/d): the rotate-half layout."""
    d = x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.to(torch.float64)[:, None] * freq[None, :]  # (T, d/2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)


def heads(x, n):  # (T, n*d) -> (n, T, d)
    return x.view(x.shape[0], n, -1).transpose(0, 1)


def spec_layer_output(layer, x, W, with_l2):
    T = x.shape[0]
    h, g, d = layer.h, layer.g, layer.d_h
    q, k, v = heads(layer.q_proj(x), h), heads(layer.k_proj(x), g), heads(layer.v_proj(x), g)
    k, v = k.repeat_interleave(h // g, 0), v.repeat_interleave(h // g, 0)
    pos = torch.arange(T)
    lag = pos[:, None] - pos[None, :]
    scores = rope(q, pos, layer.rope_base) @ rope(k, pos, layer.rope_base).transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~((lag >= 0) & (lag < W)), float("-inf"))  # i in [t-W+1, t]
    o = torch.softmax(scores, -1) @ v
    if with_l2:
        lam, eta = layer.memory()
        M = torch.where(lag >= W, lam.view(h, 1, 1) ** (lag - W).clamp(min=0), 0.0)  # (h, T, T)
        o2 = eta.view(h, 1, 1) * ((q @ F.normalize(k, dim=-1).transpose(-1, -2)) * M) @ v
        o = o + torch.sigmoid(layer.gate).view(h, 1, 1) * o2
    return layer.o_proj(o.transpose(0, 1).reshape(T, h * d))


@pytest.mark.parametrize("name, W", [("swa", 5), ("swa_w1", 1), ("tensor_cache", 5),
                                     ("tensor_cache_w1", 1), ("tensor_cache_gqa", 3)])
def test_layer_equals_spec(name, W):
    torch.manual_seed(7)
    layer = build_model(config(name)).double().blocks[0].attn
    with torch.no_grad():
        if hasattr(layer, "memory"):  # decays well away from 0 and 1 so M matters
            layer.memory.decay_logit.uniform_(-1.0, 2.0)
        x = torch.randn(1, 29, 32, dtype=torch.float64)
        want = spec_layer_output(layer, x[0], W, with_l2=name.startswith("tensor_cache"))
        got = layer(x, pos=0)[0]
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()
