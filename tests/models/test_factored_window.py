"""Tensor Cache with a factored (TPA) window (`tensor_cache` with `factors`;
docs/design.md#a-factored-window).

The reference is written here from that section, nothing imported from the code under test: a
float64 loop over tokens that builds each token's factors from the layer's weights, materialises
q, k, v as (1/R) sum_s a_s (outer) b_s with RoPE (re-derived) on the b factors, takes its own
softmax over the window and the sinks, and runs its own L2 recurrence, exact or delta, on the
un-rotated, normalised pair leaving the window.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model

from ..helpers import rel_err
from ..variants import config

T = 23  # not a multiple of any window or chunk size used here
H, D, LAYERS = 4, 8, 2  # the test models' heads, head dim and depth (tests/variants.py)


def factored(W, rank_q, write="exact", sinks=0, rank_k=2, rank_v=1):
    return {"kind": "tensor_cache", "window": W, "chunk_size": 4, "gate_init": 2.0, "write": write,
            "sinks": sinks, "factors": {"rank_q": rank_q, "rank_k": rank_k, "rank_v": rank_v}}


def model_for(attention, seed, dtype=torch.float32, decay_logit=None):
    torch.manual_seed(seed)
    model = build_model(config("tensor_cache", attention=attention))
    with torch.no_grad():
        for block in model.blocks:  # decays well away from 0 and 1 so the L2 delay matters
            logit = block.attn.memory.decay_logit
            logit.uniform_(-1.0, 2.0) if decay_logit is None else logit.fill_(decay_logit)
    return model.to(dtype).eval()


def rope(x, position, base):
    """Rotate the pairs (x_m, x_{m + d/2}) of the last dim by angle position * base^(-2m/d)."""
    d = x.shape[-1]
    ang = position * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)


def factor_rows(layer, name, x_t):
    """One token's factors from the layer's weights: a (R, h), b (R, d_h), b un-rotated."""
    return (layer.a_proj[name].weight @ x_t).view(-1, layer.h), (layer.b_proj[name].weight @ x_t).view(-1, layer.d_h)


def product(layer, name, x_t, position=None):
    """(1/R) sum_s a_s (outer) b_s, (h, d_h); b rotated at `position` first when given."""
    a, b = factor_rows(layer, name, x_t)
    if position is not None:
        b = rope(b, position, layer.rope_base)
    return sum(torch.outer(a[s], b[s]) for s in range(a.shape[0])) / a.shape[0]


def query(layer, x_t, position=None):
    """q_t (h, d_h): from its factors, or the plain projection when rank_q is null."""
    if layer.q_proj is None:
        return product(layer, "q", x_t, position)
    q = (layer.q_proj.weight @ x_t).view(layer.h, layer.d_h)
    return q if position is None else rope(q, position, layer.rope_base)


def reference_layer(layer, x, W, n, write):
    """One layer on x (T, d_model) in float64, token by token: window + sink softmax on the
    rotated factors, then the pair of position t - W written to L2 (unless a sink), then read."""
    h, d = layer.h, layer.d_h
    k_rot = [product(layer, "k", x_i, i) for i, x_i in enumerate(x)]
    k = [product(layer, "k", x_i) for x_i in x]
    v = [product(layer, "v", x_i) for x_i in x]
    lam = torch.sigmoid(layer.memory.decay_logit)[:, None, None]
    raw = layer.memory.write_rate_raw
    eta = (torch.sigmoid(raw) if write == "delta" else F.softplus(raw))[:, None, None]
    A, rows = torch.zeros(h, d, d, dtype=torch.float64), []
    for t in range(x.shape[0]):
        seen = [i for i in range(t + 1) if t - i < W or i < n]
        q_rot = query(layer, x[t], t)
        p = torch.stack([(q_rot * k_rot[i]).sum(-1) for i in seen], -1).div(math.sqrt(d)).softmax(-1)
        o1 = sum(p[:, m, None] * v[i] for m, i in enumerate(seen))
        e = t - W  # the token leaving the window now
        if e >= n:
            kn = k[e] / k[e].norm(dim=-1, keepdim=True).clamp_min(1e-12)
            written = v[e] - (kn[:, None, :] @ A)[:, 0] if write == "delta" else v[e]
            A = lam * A + eta * kn[:, :, None] * written[:, None, :]
        else:
            A = lam * A
        o2 = (query(layer, x[t])[:, None, :] @ A)[:, 0]
        o = o1 + torch.sigmoid(layer.gate)[:, None] * o2
        rows.append(layer.o_proj.weight @ o.reshape(h * d))
    return torch.stack(rows)


def layer_decode(layer, x):
    """A layer's outputs fed x (1, T, d_model) one token at a time through its own cache."""
    cache = layer.init_cache(1, x.device, x.dtype)
    return torch.cat([layer(x[:, t : t + 1], pos=t, cache=cache) for t in range(x.shape[1])], dim=1)


@pytest.mark.parametrize("rank_q", [None, 3])
@pytest.mark.parametrize("write", ["exact", "delta"])
@pytest.mark.parametrize("W, n", [(1, 0), (3, 0), (8, 0), (3, 2)])
def test_layer_equals_reference(rank_q, write, W, n):
    """The training forward and the token-by-token decode both equal the loop (1e-10 relative)."""
    layer = model_for(factored(W, rank_q, write, sinks=n), seed=W + 10 * n, dtype=torch.float64).blocks[0].attn
    x = torch.randn(1, 29, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(W + n))
    with torch.no_grad():
        want = reference_layer(layer, x[0], W, n, write)
        forward, decoded = layer(x, pos=0)[0], layer_decode(layer, x)[0]
    assert rel_err(forward, want) <= 1e-10
    assert rel_err(decoded, want) <= 1e-10
    assert want.std() > 0.01  # informative, non-constant outputs (layer outputs are ~0.1)


def decode(model, ids, pieces):
    """Logits of feeding ids through one cache in (start, end) pieces, then token by token."""
    cache = model.init_cache(ids.shape[0])
    done = pieces[-1][1] if pieces else 0
    out = [model(ids[:, a:b], cache=cache) for a, b in pieces]
    out += [model(ids[:, s : s + 1], cache=cache) for s in range(done, ids.shape[1])]
    assert cache.seq_len == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("rank_q, write, n", [(None, "exact", 0), (3, "delta", 0), (2, "exact", 2)])
@pytest.mark.parametrize("W", [1, 3, 5, 8])
def test_decode_equals_forward(dtype, tol, rank_q, write, n, W):
    """Token by token, after a prefill (inside and past the window), and in pieces, T ragged."""
    model = model_for(factored(W, rank_q, write, sinks=n), seed=100 + W, dtype=dtype)
    ids = torch.randint(0, 37, (2, T), generator=torch.Generator().manual_seed(W))
    with torch.no_grad():
        full = model(ids)
        for pieces in ([], [(0, 1)], [(0, 6)], [(0, 13)], [(0, T)], [(0, 2), (2, 9), (9, 17)]):
            err = (decode(model, ids, pieces) - full).abs().max().item()
            assert err <= tol, f"rank_q={rank_q} {write} sinks={n} W={W} pieces={pieces}: {err:.2e}"
    assert full.std() > 0.1


@pytest.mark.parametrize("rank_q, rank_k, rank_v, W, n", [(None, 2, 1, 5, 0), (3, 1, 2, 1, 0), (None, 2, 2, 3, 4)])
def test_cache_holds_factors_and_its_bytes_are_the_formula(rank_q, rank_k, rank_v, W, n):
    """Ring rows [a_s | b_s] per rank (plus the sinks'), and A: (R_k + R_v)(h + d_h)(n + W) +
    h d_h^2 elements per layer at every T, fp32, batch 2, 2 layers, up to 4096 tokens."""
    model = model_for(factored(W, rank_q, sinks=n, rank_k=rank_k, rank_v=rank_v), seed=0)
    batch = 2
    want = ((rank_k + rank_v) * (H + D) * (n + W) + H * D * D) * 4 * LAYERS * batch
    shapes = {"k": (batch, rank_k, W, H + D), "v": (batch, rank_v, W, H + D), "A": (batch, H, D, D)}
    if n:
        shapes |= {"sink_k": (batch, rank_k, n, H + D), "sink_v": (batch, rank_v, n, H + D)}
    cache = model.init_cache(batch)
    with torch.no_grad():
        model(torch.randint(0, 37, (batch, 2)), cache=cache)  # a prefill, then token by token
        for seen in range(3, 70):
            model(torch.randint(0, 37, (batch, 1)), cache=cache)
            if seen in (3, 7, 23, 69):
                assert cache.nbytes() == model.cache_nbytes(seen, batch_size=batch) == want
        for _ in range(8):
            model(torch.randint(0, 37, (batch, 503)), cache=cache)
    assert cache.seq_len == 4093
    assert cache.nbytes() == model.cache_nbytes(4093, batch_size=batch) == want
    for layer in cache.layers:
        assert {name: tuple(t.shape) for name, t in layer.tensors().items()} == shapes


def test_ring_holds_the_last_window_of_factors_unrotated():
    """After a prefill and a few decode steps the ring's slots are the factors of the last W
    tokens, oldest first, as projected (b^k not rotated)."""
    W, R_k, R_v = 5, 2, 3
    layer = model_for(factored(W, 3, rank_k=R_k, rank_v=R_v), seed=3, dtype=torch.float64).blocks[0].attn
    x = torch.randn(1, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cache = layer.init_cache(1, x.device, x.dtype)
    with torch.no_grad():
        layer(x[:, :9], pos=0, cache=cache)
        for t in range(9, 13):
            layer(x[:, t : t + 1], pos=t, cache=cache)
        for slot, i in enumerate(range(13 - W, 13)):
            for name, ring, rank in (("k", cache.ring.k, R_k), ("v", cache.ring.v, R_v)):
                a, b = factor_rows(layer, name, x[0, i])
                for s in range(rank):
                    assert rel_err(ring[0, s, slot], torch.cat([a[s], b[s]])) <= 1e-12, (name, i, s)


@pytest.mark.parametrize("decoded", [False, True])
def test_a_token_long_evicted_reaches_the_output_through_l2(decoded):
    """Perturb token 0: with the gate shut (sigmoid = 0) outputs from t = W on do not move; with
    it open they still move at the last token, T - 1 - W steps after token 0 left the window."""
    W, steps = 4, 30
    layer = model_for(factored(W, None), seed=5, dtype=torch.float64, decay_logit=4.0).blocks[0].attn
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, steps, 32, dtype=torch.float64, generator=g)
    x_moved = x.clone()
    x_moved[0, 0] += torch.randn(32, dtype=torch.float64, generator=g)
    moved = {}
    for gate in (-1e4, 1e4):
        with torch.no_grad():
            layer.gate.fill_(gate)
            run = layer_decode if decoded else (lambda lay, inp: lay(inp, pos=0))
            moved[gate] = (run(layer, x_moved) - run(layer, x))[0].abs().amax(-1)
    assert moved[-1e4][:W].min() > 1e-3  # L1 still sees token 0
    assert moved[-1e4][W:].max() <= 1e-12  # ... and nothing else does
    assert moved[1e4][W:].min() > 1e-3  # L2 holds it, to the end
    assert moved[1e4][-1] > 1e-3


def test_projections_are_factors():
    """rank_q null keeps the plain query projection; rank_q set factorises it too; k and v are
    never plain projections."""
    shared = {"o_proj.weight", "memory.decay_logit", "memory.write_rate_raw", "gate"}
    for rank_q, factorised, plain in ((None, "kv", {"q_proj.weight"}), (3, "qkv", set())):
        attn = build_model(config("tensor_cache", attention=factored(5, rank_q))).blocks[0].attn
        want = shared | plain | {f"{p}_proj.{n}.weight" for p in "ab" for n in factorised}
        assert {name for name, _ in attn.named_parameters()} == want


def test_no_factors_is_the_plain_tensor_cache():
    """`factors: null` builds the Tensor Cache, and its config dumps without the field."""
    plain = {"kind": "tensor_cache", "window": 5, "chunk_size": 4, "gate_init": 2.0}
    ids = torch.randint(0, 37, (2, T), generator=torch.Generator().manual_seed(4))
    outs = []
    for extra in ({}, {"factors": None}):
        torch.manual_seed(0)
        cfg = config("tensor_cache", attention={**plain, **extra})
        assert "factors" not in cfg.model_dump()["attention"]
        assert "factors" not in cfg.model_dump_json()
        with torch.no_grad():
            outs.append(build_model(cfg).eval()(ids))
    assert torch.equal(*outs)
    cfg = config("tensor_cache", attention=factored(5, 3))
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    assert cfg.model_dump()["attention"]["factors"] == {"rank_q": 3, "rank_k": 2, "rank_v": 1}


def test_chunk_mean_trains_the_ablation_and_serves_the_exact_write():
    """As the plain Tensor Cache: at C = 1 the chunk_mean forward is the exact write decode
    serves; at C = 4 it is not."""
    ids = torch.randint(0, 37, (2, 40), generator=torch.Generator().manual_seed(6))
    gaps = {}
    for C in (1, 4):
        model = model_for({**factored(3, None, "chunk_mean"), "chunk_size": C}, seed=6)
        with torch.no_grad():
            gaps[C] = (decode(model, ids, []) - model(ids)).abs().max().item()
    assert gaps[1] <= 1e-4 and gaps[4] > 1e-3, gaps
