"""Attention sinks (`sinks: n` on swa and tensor_cache; docs/design.md#attention-sinks).

Query t sees positions i < n and i in [t-W+1, t]; the Tensor Cache's L2 is written at step i + W
with the pair of token i only when i >= n. The reference is written out here from that sentence
(nothing imported from the code under test): one T x T masked softmax in float64 with RoPE
re-derived, and for L2 a per-token loop that skips the sinks.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from models import build_model

from ..variants import config

KINDS = {
    "swa": {"kind": "swa"},
    "tensor_cache": {"kind": "tensor_cache", "chunk_size": 4, "gate_init": 2.0},
    "tensor_cache_gqa": {"kind": "tensor_cache", "chunk_size": 3, "gate_init": 2.0,
                         "n_kv_heads": 2},
    "tensor_cache_delta": {"kind": "tensor_cache", "chunk_size": 4, "gate_init": 2.0,
                           "write": "delta"},
}
GRID = [(n, W) for n in (1, 4) for W in (1, 3, 8)]
T = 23  # not a multiple of any window, sink count or chunk size used here


def model_for(kind, n, W, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    model = build_model(config("swa", attention=dict(KINDS[kind], window=W, sinks=n)))
    with torch.no_grad():
        for block in model.blocks:  # decays well away from 0 and 1 so the L2 delay matters
            if hasattr(block.attn, "memory"):
                block.attn.memory.decay_logit.uniform_(-1.0, 2.0)
    return model.to(dtype).eval()


def rope(x, positions, base):
    """Rotate pairs (x_j, x_{j + d/2}) by angle pos * base^(-2j/d): the rotate-half layout."""
    d = x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.to(torch.float64)[:, None] * freq[None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)


def reference_layer(layer, x, W, n):
    """One layer on x (T, d_model), float64: sink + window softmax, then L2 token by token."""
    Tx = x.shape[0]
    h, g, d = layer.h, layer.g, layer.d_h
    q, k, v = (p(x).view(Tx, m, d).transpose(0, 1) for p, m in
               ((layer.q_proj, h), (layer.k_proj, g), (layer.v_proj, g)))
    k, v = k.repeat_interleave(h // g, 0), v.repeat_interleave(h // g, 0)  # (h, T, d)
    t, i = torch.arange(Tx)[:, None], torch.arange(Tx)[None, :]
    seen = (i <= t) & ((t - i < W) | (i < n))
    pos = torch.arange(Tx)
    scores = rope(q, pos, layer.rope_base) @ rope(k, pos, layer.rope_base).transpose(-1, -2)
    o = (scores / math.sqrt(d)).masked_fill(~seen, float("-inf")).softmax(-1) @ v
    if hasattr(layer, "memory"):
        lam, eta = (p.view(h, 1, 1) for p in layer.memory())
        kn = F.normalize(k, dim=-1)
        A = torch.zeros(h, d, d, dtype=torch.float64)
        o2 = torch.zeros_like(o)
        for step in range(Tx):
            e = step - W  # the token leaving the window now
            if e >= n:  # a sink never enters L2 (nor does a position before 0)
                ke, ve = kn[:, e, :, None], v[:, e, None, :]
                if layer.write == "delta":
                    ve = ve - ke.transpose(-1, -2) @ A
                A = lam * A + eta * ke @ ve
            else:
                A = lam * A
            o2[:, step] = (q[:, step, None] @ A)[:, 0]
        o = o + torch.sigmoid(layer.gate).view(h, 1, 1) * o2
    return layer.o_proj(o.transpose(0, 1).reshape(Tx, h * d))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("n, W", GRID + [(40, 3)])  # n > T: every earlier token is a sink
def test_layer_equals_reference(kind, n, W):
    layer = model_for(kind, n, W, seed=n * 10 + W, dtype=torch.float64).blocks[0].attn
    x = torch.randn(1, 29, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(W + n))
    with torch.no_grad():
        want = reference_layer(layer, x[0], W, n)
        got = layer(x, pos=0)[0]
        without_sinks = reference_layer(layer, x[0], W, 0)
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()
    assert (want - without_sinks).abs().max().item() > 1e-3  # the sinks change the function


def decode(model, ids, pieces):
    """Logits of feeding ids through one cache in (start, end) pieces, then token by token."""
    cache = model.init_cache(ids.shape[0])
    done = pieces[-1][1] if pieces else 0
    out = [model(ids[:, a:b], cache=cache) for a, b in pieces]
    out += [model(ids[:, s : s + 1], cache=cache) for s in range(done, ids.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ["swa", "tensor_cache", "tensor_cache_gqa"])
@pytest.mark.parametrize("n, W", GRID)
def test_decode_equals_forward(kind, n, W):
    model = model_for(kind, n, W, seed=100 + n * 10 + W)
    ids = torch.randint(0, 37, (2, T), generator=torch.Generator().manual_seed(n + W))
    with torch.no_grad():
        full = model(ids)
        # one token at a time; a prefill ending inside the sinks; pieces across the sink boundary
        for pieces in ([], [(0, 2)], [(0, 6)], [(0, 1), (1, 3), (3, 14)], [(0, T)]):
            err = (decode(model, ids, pieces) - full).abs().max().item()
            assert err <= 1e-4, f"{kind} n={n} W={W} pieces={pieces}: {err:.2e}"
    assert full.std() > 0.1


@pytest.mark.parametrize("kind", ["swa", "tensor_cache", "tensor_cache_delta"])
def test_zero_sinks_is_the_plain_variant(kind):
    """`sinks: 0` builds the same parameters, cache and outputs as leaving the field out."""
    att = dict(KINDS[kind], window=3)
    ids = torch.randint(0, 37, (2, T), generator=torch.Generator().manual_seed(3))
    outs = []
    for extra in ({}, {"sinks": 0}):
        torch.manual_seed(0)
        model = build_model(config("swa", attention={**att, **extra})).eval()
        with torch.no_grad():
            outs.append((model(ids), decode(model, ids, [(0, 5)]), model.init_cache(2)))
    (full0, dec0, cache0), (full1, dec1, cache1) = outs
    assert torch.equal(full0, full1) and torch.equal(dec0, dec1)
    assert cache0.layers[0].tensors().keys() == cache1.layers[0].tensors().keys()
    assert "sink_k" not in cache1.layers[0].tensors()
    layer = build_model(config("swa", attention={**att, "sinks": 0})).double().blocks[0].attn
    x = torch.randn(1, 17, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference_layer(layer, x[0], 3, 0)
        assert (layer(x, pos=0)[0] - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("kind", ["swa", "tensor_cache", "tensor_cache_gqa"])
@pytest.mark.parametrize("n, W", [(1, 1), (4, 3), (4, 8)])
def test_cache_bytes_equal_formula_and_stay_flat(kind, n, W):
    """2 g d_h (n + W) fp32 per layer (+ h d_h^2 for L2), batch 2, 2 layers, at every T."""
    model = model_for(kind, n, W, seed=0)
    h, d, layers, batch = 4, 8, 2, 2
    g = KINDS[kind].get("n_kv_heads", h)
    per_layer = 2 * g * d * (n + W) + (h * d * d if kind != "swa" else 0)
    want = per_layer * 4 * layers * batch
    cache = model.init_cache(batch)
    with torch.no_grad():
        model(torch.randint(0, 37, (batch, 2)), cache=cache)  # a prefill, then token by token
        for T_seen in range(3, 70):
            model(torch.randint(0, 37, (batch, 1)), cache=cache)
            if T_seen in (3, 7, 23, 69):
                assert cache.seq_len == T_seen
                assert cache.nbytes() == model.cache_nbytes(T_seen, batch_size=batch) == want
        model(torch.randint(0, 37, (batch, 500)), cache=cache)
    assert cache.nbytes() == model.cache_nbytes(569, batch_size=batch) == want
