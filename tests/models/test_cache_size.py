"""Invariant 2 (docs/design.md#invariants): the bytes a cache holds equal the analytic formula;
bounded ones stay flat."""
import pytest
import torch

from models import build_model

from ..variants import ATTENTION, config

BOUNDED = {"swa", "swa_w1", "linear", "tensor_cache", "tensor_cache_w1", "tensor_cache_gqa",
           "tensor_cache_factored", "tensor_cache_factored_q"}


def prefill(model, T, batch=2, piece=512):
    cache = model.init_cache(batch)
    with torch.no_grad():
        for start in range(0, T, piece):
            model(torch.randint(0, 37, (batch, min(piece, T - start))), cache=cache)
    return cache


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_nbytes_matches_formula(name):
    model = build_model(config(name)).eval()
    for T in (1, 7, 23, 64):
        assert prefill(model, T).nbytes() == model.cache_nbytes(T, batch_size=2), (name, T)


def test_formulas_by_hand():
    """The analytic sizes written out from docs/design.md for the test shapes (fp32, 2 layers)."""
    h, d, L, f32 = 4, 8, 2, 4
    expected_per_token = {
        "mha": 2 * h * d, "gqa": 2 * 2 * d, "mqa": 2 * 1 * d,
        "mla": 12 + 4, "tpa": (2 + 2) * (h + d), "tpa_kvonly": (2 + 1) * (h + d),
    }
    for name, per_token in expected_per_token.items():
        assert build_model(config(name)).cache_nbytes(100) == 100 * per_token * L * f32, name
    assert build_model(config("swa")).cache_nbytes(100) == 2 * h * d * 5 * L * f32
    assert build_model(config("linear")).cache_nbytes(100) == h * d * d * L * f32
    assert build_model(config("tensor_cache")).cache_nbytes(100) == (2 * h * d * 5 + h * d * d) * L * f32
    # a factored window: (R_k + R_v)(h + d_h) per window token (ranks 2, 1; W 5) + L2
    assert build_model(config("tensor_cache_factored")).cache_nbytes(100) == \
        ((2 + 1) * (h + d) * 5 + h * d * d) * L * f32


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_bounded_state_is_flat(name):
    model = build_model(config(name)).eval()
    short, long = prefill(model, 64, batch=1), prefill(model, 4096, batch=1)
    assert short.nbytes() == long.nbytes() == model.cache_nbytes(4096)
    assert long.seq_len == 4096
