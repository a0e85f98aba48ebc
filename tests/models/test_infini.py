"""Infini-attention (docs/design.md#infini-attention): the layer against a float64 loop written
here from the equations, decode equals forward, and the bytes its cache holds at every T."""
import math

import pytest
import torch

from models import build_model
from models.attention.infini import EPS

from ..helpers import rel_err
from ..variants import config
from .test_learning import N_PAIRS, N_VALUES, answer_loss, recall_batch

ROPE_BASE = 10000.0


def infini_config(segment, update="linear", n_kv_heads=None, **overrides):
    att = {"kind": "infini", "segment": segment, "update": update, "n_kv_heads": n_kv_heads}
    return config("mha", attention=att, **overrides)


def rotate(x, positions):
    """RoPE, rotate-half form, re-derived: pairs (i, i + d/2) turn by position * base^(-2i/d)."""
    d = x.shape[-1]
    angle = positions[:, None].double() * ROPE_BASE ** (-torch.arange(0, d, 2).double() / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def s(x):
    return torch.where(x > 0, x + 1, torch.exp(x))  # ELU(x) + 1


def written(M, z, ks, vs, update):
    """M, z after one segment's pairs (B, N, d), summed token by token from the M, z before."""
    M_new, z_new = M.clone(), z.clone()
    for i in range(ks.shape[1]):
        sk, v = s(ks[:, i]), vs[:, i]
        if update == "delta":
            v = v - torch.einsum("bd,bde->be", sk, M) / ((sk * z).sum(-1, keepdim=True) + EPS)
        M_new += sk[:, :, None] * v[:, None, :]
        z_new += sk
    return M_new, z_new


def infini_loop(q, k, v, beta, N, update):
    """Per query head and per token: softmax over its segment so far, plus the memory of the
    segments before it (one memory per query head, fed by that head's KV head)."""
    B, h, T, d = q.shape
    rep = h // k.shape[1]
    pos = torch.arange(T)
    qr, kr = rotate(q, pos), rotate(k, pos)
    out = torch.zeros_like(q)
    for head in range(h):
        kv = head // rep
        M, z = q.new_zeros(B, d, d), q.new_zeros(B, d)
        gate = torch.sigmoid(beta[head])
        for t in range(T):
            start = t - t % N
            if t == start and t > 0:  # the segment start - N .. start - 1 just ended
                M, z = written(M, z, k[:, kv, start - N:start], v[:, kv, start - N:start], update)
            scores = torch.stack([(qr[:, head, t] * kr[:, kv, i]).sum(-1) / math.sqrt(d)
                                  for i in range(start, t + 1)], -1)
            local = torch.einsum("bi,bid->bd", scores.softmax(-1), v[:, kv, start:t + 1])
            sq = s(q[:, head, t])
            mem = torch.einsum("bd,bde->be", sq, M) / ((sq * z).sum(-1, keepdim=True) + EPS)
            out[:, head, t] = gate * mem + (1 - gate) * local
    return out


def layer_and_reference(N, update, g, T, seed):
    """The first layer of a fresh model (float64, random beta) on random inputs, and the loop
    on that layer's own projections."""
    torch.manual_seed(seed)
    cfg = infini_config(N, update, g)
    attn = build_model(cfg).blocks[0].attn.double()
    with torch.no_grad():
        attn.beta.normal_(0.0, 1.5)
    x = torch.randn(2, T, cfg.d_model, dtype=torch.float64)
    heads = lambda y, n: y.view(2, T, n, -1).transpose(1, 2)  # noqa: E731
    q = heads(x @ attn.q_proj.weight.T, cfg.n_heads)
    k = heads(x @ attn.k_proj.weight.T, g or cfg.n_heads)
    v = heads(x @ attn.v_proj.weight.T, g or cfg.n_heads)
    with torch.no_grad():
        want = infini_loop(q, k, v, attn.beta, N, update)
        want = want.transpose(1, 2).reshape(2, T, -1) @ attn.o_proj.weight.T
    return attn, x, want


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("N, g, T", [(4, None, 11), (4, 2, 11), (3, 1, 12), (1, None, 5),
                                     (16, None, 9)])
def test_forward_equals_the_loop(update, N, g, T):
    attn, x, want = layer_and_reference(N, update, g, T, seed=N * 100 + T + (g or 0))
    with torch.no_grad():
        got = attn(x, 0)
    assert rel_err(got, want) <= 1e-10, rel_err(got, want)


def test_the_memory_and_its_update_rule_matter():
    """The loop's outputs are not all local attention: the memory, and which rule wrote it,
    change them (so the comparison above sees both)."""
    _, _, linear = layer_and_reference(4, "linear", None, 11, seed=7)
    _, _, delta = layer_and_reference(4, "delta", None, 11, seed=7)
    assert torch.equal(linear[:, :8], delta[:, :8])  # memory written once, read from t = 4 ...
    assert rel_err(linear[:, 8:], delta[:, 8:]) > 1e-2  # ... the two rules differ from t = 8
    attn, x, _ = layer_and_reference(4, "linear", None, 11, seed=7)
    with torch.no_grad():
        attn.beta.fill_(-1e4)  # gate closed: local attention only
        local = attn(x, 0)
    assert rel_err(local[:, 4:], linear[:, 4:]) > 1e-2


def test_first_segment_has_no_nan_and_gradients_are_finite():
    """M = 0, z = 0 read as 0 / eps = 0; the gradients of every parameter are finite."""
    torch.manual_seed(0)
    model = build_model(infini_config(4, "delta", 2))
    ids = torch.randint(0, 37, (2, 11))
    logits = model(ids)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].attn.beta.grad.abs().min() > 0  # every head's gate is trained
    attn = model.blocks[0].attn
    q = torch.randn(2, 4, 3, 8)
    read = attn.read(q, torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8))
    assert torch.equal(read, torch.zeros_like(read))


def decode(model, ids, pieces):
    """Logits of the tokens fed through one cache in pieces of the given lengths."""
    cache = model.init_cache(ids.shape[0])
    out, start = [], 0
    for n in pieces:
        out.append(model(ids[:, start:start + n], cache=cache))
        start += n
    assert start == ids.shape[1] == cache.seq_len
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("g", [None, 2])
def test_decode_equals_forward(update, g):
    """T = 2N + 3 one token at a time, after prefills that end inside or at a segment's end,
    and in pieces that straddle segments."""
    N, T = 4, 11
    torch.manual_seed(3)
    model = build_model(infini_config(N, update, g)).eval()
    ids = torch.randint(0, 37, (2, T))
    with torch.no_grad():
        full = model(ids)
        for prefill in (0, 1, 3, 4, 5, 8, T):
            err = (decode(model, ids, [prefill] * bool(prefill) + [1] * (T - prefill)) - full)
            assert err.abs().max().item() <= 1e-4, (prefill, err.abs().max().item())
        for pieces in ([2, 7, 2], [5, 5, 1], [3, 1, 1, 6]):
            err = (decode(model, ids, pieces) - full).abs().max().item()
            assert err <= 1e-4, (pieces, err)
    assert full.std() > 0.1


@pytest.mark.parametrize("g", [None, 1])
def test_cache_bytes_at_every_length(g):
    """After each T = 1 .. 3N + 1 (one token at a time): measured bytes == the formula with the
    open segment's fill, g (d_h^2 + d_h) + 2 g d_h (T mod N) per layer, <= its maximum (fill N)."""
    N, B = 4, 2
    cfg = infini_config(N, "delta", g)
    model = build_model(cfg).eval()
    h, d, L, f32 = cfg.n_heads, cfg.d_head, cfg.n_layers, 4
    kv = g or h
    bound = (kv * (d * d + d) + 2 * kv * d * N) * L * B * f32
    assert bound <= (h * (d * d + d) + 2 * kv * d * N) * L * B * f32  # the spec's bound
    cache = model.init_cache(B)
    with torch.no_grad():
        for T in range(1, 3 * N + 2):
            model(torch.randint(0, 37, (B, 1)), cache=cache)
            fill = T % N
            want = (kv * (d * d + d) + 2 * kv * d * fill) * L * B * f32
            assert cache.nbytes() == model.cache_nbytes(T, batch_size=B) == want, T
            assert cache.nbytes() <= bound
            for layer in cache.layers:  # what nbytes counts is all the pair buffer holds
                assert layer.k.shape[2] == layer.v.shape[2] == fill
                assert layer.k.untyped_storage().nbytes() == layer.k.numel() * f32


def test_bounded_by_the_segment():
    """Same bytes at T = 67 and T = 4099 (same fill, 3): the memory does not grow with T."""
    model = build_model(infini_config(8)).eval()
    sizes = []
    with torch.no_grad():
        for T in (67, 4099):
            cache = model.init_cache(1)
            model(torch.randint(0, 37, (1, T)), cache=cache)
            sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] == model.cache_nbytes(4099)


def test_memory_alone_learns_recall():
    """The recall task of test_learning with N = 8: the pairs fill segment 0 and the questions
    sit in segment 1, so only the memory can answer (local attention never sees the pairs)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(config("mha", d_model=32, n_heads=2, init_std=0.02,
                               attention={"kind": "infini", "segment": 8}))
    assert 2 * N_PAIRS == 8
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    eval_ids, eval_pos = recall_batch(256, torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = answer_loss(model, eval_ids, eval_pos).item()
    for _ in range(500):
        ids, pos = recall_batch(32, gen)
        loss = answer_loss(model, ids, pos)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = answer_loss(model, eval_ids, eval_pos).item()
    assert before > 3.0 and after < math.log(N_VALUES) - 0.5, f"{before:.2f} -> {after:.2f}"
