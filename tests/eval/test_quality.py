"""The evaluate stage's quality measures against direct computations on a random model."""
import math

import numpy as np
import torch

from models import ModelConfig, build_model
from pipeline import tokenizer
from pipeline.evaluation.quality import _split, bits_by_distance, heldout_bits


def test_heldout_bits_and_their_split_by_distance():
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    model = build_model(ModelConfig(d_model=16, n_layers=1, n_heads=2, init_std=0.5)).eval()
    text = np.random.default_rng().integers(32, 127, size=2000).astype(np.uint8)
    bits = heldout_bits(model, text, 40, 3)
    assert bits.shape == (3, 40)
    start = np.linspace(0, len(text) - 41, 3).astype(int)[1]  # the second window, by hand
    ids = torch.from_numpy(tokenizer.bytes_to_ids(text[start : start + 41]).astype(np.int64))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None, :-1])[0].double(), -1)
    expected = [-logp[t, ids[t + 1]].item() / math.log(2) for t in range(40)]
    np.testing.assert_allclose(bits[1], expected, rtol=1e-5)
    split = bits_by_distance(bits, 8)
    assert math.isclose(split["lt_W"], bits[:, :8].mean(), rel_tol=1e-6)
    assert math.isclose(split["ge_W"], bits[:, 8:].mean(), rel_tol=1e-6)
    assert math.isclose(split["ge_4W"], bits[:, 32:].mean(), rel_tol=1e-6)
    assert bits_by_distance(bits, 16)["ge_4W"] is None  # 4W = 64 > 40 positions


def test_mqar_split_uses_the_shortest_and_the_longest_reach():
    rng = np.random.default_rng()
    hit, gap = rng.random(500) < 0.5, rng.integers(2, 80, 500)
    out = _split(hit, gap, (10, 30))
    assert out["acc_inside_window"] == hit[gap <= 10].mean() and out["n_inside_window"] == (gap <= 10).sum()
    assert out["acc_beyond_window"] == hit[gap > 30].mean() and out["n_beyond_window"] == (gap > 30).sum()
    assert out["acc"] == hit.mean() and out["n"] == 500
