"""Invariant 1 (docs/design.md#invariants): token-by-token decode == parallel forward == prefill-then-decode."""
import zlib

import pytest
import torch

from models import build_model

from ..variants import ATTENTION, config

T = 23  # not a multiple of any chunk size or window used here


def decode_all(model, ids, prefill: int):
    cache = model.init_cache(ids.shape[0])
    out = [model(ids[:, :prefill], cache=cache)] if prefill else []
    out += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_decode_equals_forward(name):
    torch.manual_seed(zlib.crc32(name.encode()))
    model = build_model(config(name)).eval()
    ids = torch.randint(0, 37, (2, T))
    with torch.no_grad():
        full = model(ids)
        for prefill in (0, 1, 6, 13, T):
            logits, cache = decode_all(model, ids, prefill)
            assert cache.seq_len == T
            err = (logits - full).abs().max().item()
            assert err <= 1e-4, f"{name}: prefill={prefill} max |decode - forward| = {err:.2e}"
    assert full.std() > 0.1  # the comparison is between informative, non-constant logits


def test_chunked_prefill_equals_forward():
    """Prefill in several pieces (each longer than the window) equals one forward."""
    for name in ("tensor_cache", "swa", "mla", "tpa", "tpa_kvonly", "linear"):
        torch.manual_seed(1)
        model = build_model(config(name)).eval()
        ids = torch.randint(0, 37, (1, 40))
        with torch.no_grad():
            cache = model.init_cache(1)
            pieces = [model(ids[:, a:b], cache=cache) for a, b in ((0, 9), (9, 10), (10, 27), (27, 40))]
            err = (torch.cat(pieces, 1) - model(ids)).abs().max().item()
        assert err <= 1e-4, f"{name}: {err:.2e}"


def test_chunk_mean_gap_is_measured():
    """The chunk_mean ablation trains on a different function than exact decode computes.

    Same weights: decode (always the exact per-token write) vs the chunk_mean training forward.
    The gap is zero at C = 1 and clearly non-zero for C > 1.
    """
    gaps = {}
    for C in (1, 2, 8):
        torch.manual_seed(0)
        att = dict(ATTENTION["tensor_cache"], chunk_size=C, write="chunk_mean")
        model = build_model(config("tensor_cache", attention=att)).eval()
        ids = torch.randint(0, 37, (2, 40))
        with torch.no_grad():
            decoded, _ = decode_all(model, ids, prefill=0)
            gaps[C] = (model(ids) - decoded).abs().max().item()
    assert gaps[1] <= 1e-4, gaps
    assert gaps[2] > 1e-3 and gaps[8] > 1e-3, gaps
    assert gaps[8] > gaps[2], gaps


def test_mla_absorbed_decode_equals_naive():
    torch.manual_seed(3)
    naive = build_model(config("mla", attention=dict(ATTENTION["mla"], absorb=False))).eval()
    absorbed = build_model(config("mla")).eval()
    absorbed.load_state_dict(naive.state_dict())
    ids = torch.randint(0, 37, (2, 19))
    with torch.no_grad():
        a, _ = decode_all(absorbed, ids, prefill=4)
        n, _ = decode_all(naive, ids, prefill=4)
    assert (a - n).abs().max().item() <= 1e-4


def test_tpa_cache_holds_only_factors():
    cfg = config("tpa")
    model = build_model(cfg).eval()
    with torch.no_grad():
        _, cache = decode_all(model, torch.randint(0, 37, (2, 9)), prefill=3)
    h, d = cfg.n_heads, cfg.d_head
    shapes = {n: tuple(t.shape) for n, t in cache.layers[0].tensors().items()}
    assert shapes == {"a_k": (2, 9, 2, h), "b_k": (2, 9, 2, d), "a_v": (2, 9, 2, h), "b_v": (2, 9, 2, d)}


def test_greedy_generate_matches_argmax_of_forward():
    torch.manual_seed(5)
    model = build_model(config("tensor_cache")).eval()
    prompt = torch.randint(0, 37, (2, 7))
    out = model.generate(prompt, max_new_tokens=12)
    assert out.shape == (2, 19)
    with torch.no_grad():  # each generated token is the argmax of a full forward over its prefix
        logits = model(out[:, :-1])
    assert torch.equal(logits[:, 6:].argmax(-1), out[:, 7:])


def test_tpa_kvonly_has_a_plain_query_and_caches_only_k_v_factors():
    cfg = config("tpa_kvonly")
    model = build_model(cfg).eval()
    attn = model.blocks[0].attn
    assert attn.q_proj is not None and set(attn.a_proj) == set(attn.b_proj) == {"k", "v"}
    with torch.no_grad():
        _, cache = decode_all(model, torch.randint(0, 37, (2, 9)), prefill=3)
    h, d = cfg.n_heads, cfg.d_head
    shapes = {n: tuple(t.shape) for n, t in cache.layers[0].tensors().items()}
    assert shapes == {"a_k": (2, 9, 2, h), "b_k": (2, 9, 2, d), "a_v": (2, 9, 1, h), "b_v": (2, 9, 1, d)}
