"""Inference-time cache policies on a full-attention model (SPEC "Inference-time cache policies").

Window KV keeps the last W pairs, each key rotated at its position in the text; StreamingLLM keeps
the first n and the last W, each key rotated at its index in the cache and the query at its own.
The reference is written out here from those sentences: a per-token loop in float64 that lists
the kept positions, re-derives RoPE and materialises the softmax (nothing imported from the
code under test but the layer's weights).
"""
import math
import zlib

import pytest
import torch

from models import CachePolicy, build_model

from ..variants import config

T = 23  # longer than every sinks + window below, and not a multiple of any of them
POLICIES = [CachePolicy(policy="window", window=1), CachePolicy(policy="window", window=5),
            CachePolicy(policy="streaming", sinks=1, window=3),
            CachePolicy(policy="streaming", sinks=4, window=6)]


def rope(x, position: int, base: float):
    """Rotate pairs (x_j, x_{j + d/2}) of x (..., d) by angle position * base^(-2j/d)."""
    d = x.shape[-1]
    ang = position * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)


def kept(t: int, policy: CachePolicy) -> list[int]:
    """Text positions in the cache when token t is read: the first n and the last W."""
    return sorted(set(range(min(policy.sinks, t + 1))) | set(range(max(0, t - policy.window + 1), t + 1)))


def reference_layer(layer, x, policy):
    """The attention layer on x (B, T, d_model), float64, one token at a time."""
    B, Tx, _ = x.shape
    h, g, d = layer.h, layer.g, layer.d_h
    q = layer.q_proj(x).view(B, Tx, h, d)
    k = layer.k_proj(x).view(B, Tx, g, d)
    v = layer.v_proj(x).view(B, Tx, g, d)
    out = torch.zeros(B, Tx, h, d, dtype=torch.float64)
    for t in range(Tx):
        held = kept(t, policy)
        if policy.policy == "streaming":
            key_pos, q_pos = list(range(len(held))), len(held) - 1
        else:
            key_pos, q_pos = held, t
        for head in range(h):
            j = head // (h // g)  # the KV head this query head reads
            qr = rope(q[:, t, head], q_pos, layer.rope_base)  # (B, d)
            kr = torch.stack([rope(k[:, s, j], p, layer.rope_base) for s, p in zip(held, key_pos)], 1)
            w = ((kr @ qr[:, :, None])[..., 0] / math.sqrt(d)).softmax(-1)  # (B, L)
            out[:, t, head] = (w[:, :, None] * v[:, held, j]).sum(1)
    return layer.o_proj(out.reshape(B, Tx, h * d))


def model_for(kind: str, seed: int, dtype=torch.float64):
    torch.manual_seed(seed)
    return build_model(config(kind)).to(dtype).eval()


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_policy_layer_equals_the_per_token_reference(kind, policy):
    """A prefill of 7 tokens then one token per call, against the float64 loop (1e-10)."""
    model = model_for(kind, seed=zlib.crc32(f"{kind} {policy.name}".encode()))
    layer = model.blocks[0].attn
    x = torch.randn(2, T, model.config.d_model, dtype=torch.float64)
    cache = model.init_cache(2, policy=policy).layers[0]
    with torch.no_grad():
        got = [layer(x[:, :7], 0, cache)] + [layer(x[:, t : t + 1], t, cache) for t in range(7, T)]
        got = torch.cat(got, 1)
        want = reference_layer(layer, x, policy)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_window_policy_is_the_same_weights_as_sliding_window_attention():
    """Window KV on an MHA checkpoint computes what SWA computes with those weights (SWA's
    training forward: the O(T W) band kernel), so the two are checked against each other."""
    for W in (1, 4, 9):
        mha = model_for("mha", seed=W, dtype=torch.float32)
        swa = build_model(config("swa", attention={"kind": "swa", "window": W})).eval()
        swa.load_state_dict(mha.state_dict())
        ids = torch.randint(0, mha.config.vocab_size, (3, T))
        cache = mha.init_cache(3, policy=CachePolicy(policy="window", window=W))
        with torch.no_grad():
            decoded = torch.cat([mha(ids[:, t : t + 1], cache=cache) for t in range(T)], 1)
            torch.testing.assert_close(decoded, swa(ids), rtol=1e-4, atol=1e-4)
            assert not torch.allclose(decoded, mha(ids), atol=1e-3)  # the cut changed the function


def test_a_policy_that_holds_everything_is_full_attention():
    mha = model_for("gqa", seed=3, dtype=torch.float32)
    ids = torch.randint(0, mha.config.vocab_size, (2, T))
    for policy in (CachePolicy(policy="window", window=T),
                   CachePolicy(policy="streaming", sinks=3, window=T - 3)):
        cache = mha.init_cache(2, policy=policy)
        with torch.no_grad():
            torch.testing.assert_close(mha(ids, cache=cache), mha(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", [POLICIES[1], POLICIES[3]], ids=lambda p: p.name)
def test_policy_bytes_are_measured_and_flat(policy):
    """The cache's own tensors equal 2 g d_h min(T, n + W) per layer, and stop growing."""
    model = model_for("gqa", seed=5, dtype=torch.float32)
    g, d_h, layers = model.config.attention.n_kv_heads, model.config.d_head, model.config.n_layers
    cache = model.init_cache(1, policy=policy)
    seen, measured = 0, {}
    with torch.no_grad():
        for length in (1, 3, policy.sinks + policy.window, 40, 200):
            model(torch.randint(0, model.config.vocab_size, (1, length - seen)), cache=cache)
            seen = length
            measured[length] = cache.nbytes()
            assert measured[length] == 4 * layers * 2 * g * d_h * min(length, policy.sinks + policy.window)
            assert measured[length] == model.cache_nbytes(length, policy=policy)
    assert measured[40] == measured[200]


def test_policies_apply_to_full_attention_only():
    with pytest.raises(ValueError, match="cache policy window4: applies to full attention .* not swa"):
        build_model(config("swa")).init_cache(1, policy=CachePolicy(policy="window", window=4))
    with pytest.raises(ValueError, match="the streaming policy needs at least 1"):
        CachePolicy(policy="streaming", window=4)
    with pytest.raises(ValueError, match="the window policy keeps none"):
        CachePolicy(policy="window", window=4, sinks=2)


def reference_model(model, ids, policy):
    """Whole-model logits with every layer the per-token loop above, and what each layer's cache
    must hold after the last token: its un-rotated k and v at the kept positions, and those."""
    x = model.embed(ids)
    held = kept(ids.shape[1] - 1, policy)
    cached = []
    for block in model.blocks:
        a, h = block.attn, block.attn_norm(x)
        k, v = (proj(h).view(*h.shape[:2], a.g, a.d_h).transpose(1, 2) for proj in (a.k_proj, a.v_proj))
        cached.append((k[:, :, held], v[:, :, held]))
        x = x + reference_layer(a, h, policy)
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x)), cached, held


def pieces(length: int, sizes=(2, 1, 7, 4)) -> list[tuple[int, int]]:
    """[0, length) cut into chunks of the given sizes, repeated (the last one shorter)."""
    cuts, i = [0], 0
    while cuts[-1] < length:
        cuts.append(min(length, cuts[-1] + sizes[i % len(sizes)]))
        i += 1
    return list(zip(cuts, cuts[1:]))


@pytest.mark.parametrize("prompt", [3, T])  # shorter than sinks + window (all but window1), longer
@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_parallel_prefill_then_decode_equals_the_per_token_reference(policy, kind, prompt):
    """A prompt prefilled in one chunk, in uneven chunks, or one token at a time, then 6 decode
    steps: every logit equals the float64 per-token loop (1e-10), and every layer's cache holds
    the pairs of the positions the policy keeps, as the loop computes them."""
    model = model_for(kind, seed=prompt + zlib.crc32(f"{kind} {policy.name}".encode()))
    ids = torch.randint(0, model.config.vocab_size, (2, prompt + 6))
    with torch.no_grad():
        want, cached, held = reference_model(model, ids, policy)
        for chunks in ([(0, prompt)], pieces(prompt), pieces(prompt, sizes=(1,))):
            cache = model.init_cache(2, policy=policy)
            got = [model(ids[:, a:b], cache=cache) for a, b in chunks]
            got += [model(ids[:, t : t + 1], cache=cache) for t in range(prompt, ids.shape[1])]
            torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-10, atol=1e-10)
            for layer, (k, v) in zip(cache.layers, cached, strict=True):
                assert layer.positions == held
                torch.testing.assert_close(layer.k, k, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(layer.v, v, rtol=1e-12, atol=1e-12)
    assert want.std() > 0.1
