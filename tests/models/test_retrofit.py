"""Retrofit maps (docs/design.md#retrofit-a-point-initialised-from-a-trained-one): what a child
initialised from a trained full-attention parent computes at step 0.

Fresh random parents in float64. The references are the float64 per-token loop of
test_cache_policy (kept positions, RoPE re-derived, a materialised softmax) run on the PARENT's
projections, and an L2 token loop written here from the Tensor Cache section; grouped keys are
pooled after projection, not through the map's weights.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models import CachePolicy, build_model
from models.retrofit import RetrofitError, check, child_state, initialise

from ..variants import config
from .test_cache_policy import reference_layer

T = 23  # longer than every window below, not a multiple of any


def parent(kind="mha", seed=0):
    torch.manual_seed(seed)
    return build_model(config(kind)).to(torch.float64).eval()


def child_of(par, attention, **widths):
    torch.manual_seed(99)  # any init: the map must overwrite all but the child's own parameters
    child = build_model(config("mha", attention=attention, **widths)).to(torch.float64).eval()
    initialise(child, par.state_dict(), par.config)
    return child


def window(W, sinks=0):
    """The kept positions of reference_layer: the first `sinks` and the last W, keys at their text
    positions (with sinks this is no inference-time policy: StreamingLLM re-rotates)."""
    return SimpleNamespace(policy="text positions", window=W, sinks=sinks)


@pytest.mark.parametrize("W", [1, 4, 9])
def test_mha_to_swa_is_the_window_policy_of_the_parent(W):
    """Whole model: the child's training forward equals the parent decoded under window KV."""
    par = parent(seed=W)
    child = child_of(par, {"kind": "swa", "window": W})
    ids = torch.randint(0, par.config.vocab_size, (2, T))
    cache = par.init_cache(2, policy=CachePolicy(policy="window", window=W))
    with torch.no_grad():
        policy = torch.cat([par(ids[:, t : t + 1], cache=cache) for t in range(T)], 1)
        torch.testing.assert_close(child(ids), policy, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(child(ids), par(ids), atol=1e-3)  # the window did cut


@pytest.mark.parametrize("sinks,W", [(1, 3), (4, 5)])
def test_mha_to_swa_with_sinks_is_the_parent_under_the_sink_and_window_mask(sinks, W):
    par = parent(seed=sinks)
    child = child_of(par, {"kind": "swa", "window": W, "sinks": sinks})
    x = torch.randn(2, T, par.config.d_model, dtype=torch.float64)
    with torch.no_grad():
        want = reference_layer(par.blocks[0].attn, x, window(W, sinks))
        torch.testing.assert_close(child.blocks[0].attn(x, 0), want, rtol=1e-10, atol=1e-10)


def l2_reference(layer, x, write):
    """sigmoid(gate_h) o2_t per head (B, T, h, d_h), float64, token by token: token i is written
    at step i + W (exact: A <- lam A + eta kn^T v; delta: A <- lam A + eta kn^T (v - kn A)), then
    o2_t = q_t A_t with the un-rotated query."""
    B, Tx, _ = x.shape
    h, g, d, W = layer.h, layer.g, layer.d_h, layer.W
    q = layer.q_proj(x).view(B, Tx, h, d)
    k = F.normalize(layer.k_proj(x).view(B, Tx, g, d), dim=-1)
    v = layer.v_proj(x).view(B, Tx, g, d)
    lam = torch.sigmoid(layer.memory.decay_logit)
    eta = (torch.sigmoid if write == "delta" else F.softplus)(layer.memory.write_rate_raw)
    out = torch.zeros(B, Tx, h, d, dtype=torch.float64)
    for j in range(h):
        m, A = j // (h // g), torch.zeros(B, d, d, dtype=torch.float64)
        for t in range(Tx):
            if t >= W:
                kn, vi = k[:, t - W, m], v[:, t - W, m]
                target = vi - (kn[:, None] @ A)[:, 0] if write == "delta" else vi
                A = lam[j] * A + eta[j] * kn[:, :, None] * target[:, None, :]
            out[:, t, j] = (q[:, t, j, None] @ A)[:, 0] * torch.sigmoid(layer.gate[j])
    return out


@pytest.mark.parametrize("write", ["exact", "delta", "chunk_mean"])
@pytest.mark.parametrize("g", [4, 2])
def test_mha_to_tensor_cache_is_the_window_policy_plus_the_gates_leak(write, g):
    """L1 is the parent's window policy; L2 starts empty, so the first W positions are the policy
    exactly, and after them the layer differs by exactly W_o sigmoid(gate) o2 (the leak of a gate
    at its initial value). With g < h the policy is that of the pooled parent."""
    W = 5
    par = parent(seed=g)
    child = child_of(par, {"kind": "tensor_cache", "window": W, "chunk_size": 4, "write": write,
                           "n_kv_heads": g})
    layer, x = child.blocks[0].attn, torch.randn(2, T, par.config.d_model, dtype=torch.float64)
    with torch.no_grad():
        policy = reference_layer(pooled(par.blocks[0].attn, g), x, window(W))
        got = layer(x, 0)
        torch.testing.assert_close(got[:, :W], policy[:, :W], rtol=1e-10, atol=1e-10)
        leak = got - policy
        assert leak[:, W:].abs().max() > 1e-3  # the gate is not closed: the leak is there
        if write != "chunk_mean":  # the ablation trains on a different L2 by design
            want = layer.o_proj(l2_reference(layer, x, write).reshape(2, T, -1))
            torch.testing.assert_close(leak, want, rtol=1e-9, atol=1e-10)


def test_a_tensor_cache_gate_started_shut_is_the_window_policy():
    par = parent(seed=5)
    child = child_of(par, {"kind": "tensor_cache", "window": 4, "gate_init": -60.0})
    ids = torch.randint(0, par.config.vocab_size, (2, T))
    cache = par.init_cache(2, policy=CachePolicy(policy="window", window=4))
    with torch.no_grad():
        policy = torch.cat([par(ids[:, t : t + 1], cache=cache) for t in range(T)], 1)
        torch.testing.assert_close(child(ids), policy, rtol=1e-10, atol=1e-10)


def test_mha_to_gqa_with_g_equal_to_h_is_the_parent():
    par = parent(seed=7)
    child = child_of(par, {"kind": "gqa", "n_kv_heads": par.config.n_heads})
    ids = torch.randint(0, par.config.vocab_size, (2, T))
    with torch.no_grad():
        assert torch.equal(child(ids), par(ids))


def pooled(layer, g):
    """The parent's layer with each group's keys and values averaged AFTER projection."""
    def pool(proj):
        return lambda x: proj(x).unflatten(-1, (g, layer.g // g, layer.d_h)).mean(-2).flatten(-2)
    return SimpleNamespace(h=layer.h, g=g, d_h=layer.d_h, rope_base=layer.rope_base, q_proj=layer.q_proj,
                           k_proj=pool(layer.k_proj), v_proj=pool(layer.v_proj), o_proj=layer.o_proj)


@pytest.mark.parametrize("kind,g", [("gqa", 2), ("mqa", 1)])
def test_mha_to_gqa_averages_each_groups_heads(kind, g):
    par = parent(seed=g)
    child = child_of(par, {"kind": kind, "n_kv_heads": g})
    x = torch.randn(2, T, par.config.d_model, dtype=torch.float64)
    with torch.no_grad():
        want = reference_layer(pooled(par.blocks[0].attn, g), x, window(T))  # every key kept: causal
        torch.testing.assert_close(child.blocks[0].attn(x, 0), want, rtol=1e-10, atol=1e-10)
        w_p, w_c = par.blocks[1].attn.k_proj.weight, child.blocks[1].attn.k_proj.weight
        d_h, per = par.config.d_head, par.config.n_heads // g
        for c in range(g):  # the weights, head by head
            heads = [w_p[m * d_h : (m + 1) * d_h] for m in range(c * per, (c + 1) * per)]
            assert torch.allclose(w_c[c * d_h : (c + 1) * d_h], sum(heads) / per, rtol=0, atol=1e-15)


def test_gqa_parent_pools_into_mqa():
    par = parent("gqa", seed=3)  # g_p = 2
    child = child_of(par, {"kind": "mqa"})
    x = torch.randn(1, T, par.config.d_model, dtype=torch.float64)
    with torch.no_grad():
        want = reference_layer(pooled(par.blocks[0].attn, 1), x, window(T))
        torch.testing.assert_close(child.blocks[0].attn(x, 0), want, rtol=1e-10, atol=1e-10)


def test_everything_else_is_copied():
    par = parent(seed=11)
    child = child_of(par, {"kind": "tensor_cache", "window": 3})
    state = child.state_dict()
    for name, tensor in par.state_dict().items():
        assert torch.equal(state[name], tensor), name
    fresh = build_model(config("mha", attention={"kind": "tensor_cache", "window": 3}))
    for name in ("blocks.0.attn.gate", "blocks.1.attn.memory.decay_logit", "blocks.0.attn.memory.write_rate_raw"):
        assert torch.equal(state[name], fresh.state_dict()[name].double()), name  # the initial values


@pytest.mark.parametrize("attention,match", [
    ({"kind": "mla", "kv_lora_rank": 8, "rope_dim": 4}, r"^kind: no map from mha to mla: its RoPE"),
    ({"kind": "tpa"}, r"^kind: no map from mha to tpa"),
    ({"kind": "linear"}, r"^kind: no map from mha to linear"),
    ({"kind": "infini", "segment": 4}, r"^kind: no map from mha to infini"),
])
def test_maps_that_do_not_exist_are_refused(attention, match):
    with pytest.raises(RetrofitError, match=match):
        check(config("mha"), config("mha", attention=attention))


def test_other_refusals_name_the_field():
    with pytest.raises(RetrofitError, match=r"^init_from: a retrofit starts from full attention .* not swa"):
        check(config("swa"), config("mha"))
    with pytest.raises(RetrofitError, match=r"^d_model: the parent has 32, the child 48"):
        check(config("mha"), config("swa", d_model=48))
    with pytest.raises(RetrofitError, match=r"^mlp_hidden: "):
        check(config("mha"), config("swa", mlp_hidden=40))
    with pytest.raises(RetrofitError, match=r"^n_kv_heads: 2 does not divide the parent's 1"):
        check(config("mqa"), config("gqa"))
    factored = config("tensor_cache")
    object.__setattr__(factored.attention, "factors", {"rank_k": 1})  # the field of a factored window
    with pytest.raises(RetrofitError, match=r"^factors: no map to a factored window"):
        check(config("mha"), factored)


def test_a_child_parameter_the_map_does_not_know_is_an_error():
    par = parent(seed=1)
    child = build_model(config("swa")).to(torch.float64)
    child.blocks[0].attn.extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RetrofitError, match=r"leaves \['blocks.0.attn.extra'\] unset"):
        initialise(child, par.state_dict(), par.config)
    assert set(child_state(par.state_dict(), par.config, config("swa"))) == set(par.state_dict())
