"""The evaluate stage's quality measures against direct computations on a random model."""
import json
import math

import numpy as np
import pytest
import torch

from models import ModelConfig, build_model
from pipeline.core import tokenizer
from pipeline.core.tokens import TokenStream
from pipeline.evaluate.quality import _split, bits_by_distance, heldout_bits


def _stream(root, ids: np.ndarray, nbytes: np.ndarray | None) -> TokenStream:
    """A prepared held-out split: bytes (`nbytes` None) or token ids with their byte counts."""
    (root / "text").mkdir()
    (root / "tokens").mkdir()
    if nbytes is None:
        info = {"name": "bytes"}
        ids.astype(np.uint8).tofile(root / "text" / "heldout.bin")
    else:
        info = {"name": "bpe", "dtype": "uint16"}
        ids.astype(np.uint16).tofile(root / "tokens" / "heldout.bin")
        nbytes.astype(np.uint16).tofile(root / "tokens" / "heldout.nbytes")
    (root / "manifest.json").write_text(json.dumps({"tokenizer": info}))
    return TokenStream(root, "heldout")


@pytest.mark.parametrize("tokens", [False, True], ids=["bytes", "tokens"])
def test_heldout_bits_and_their_split_by_distance(tmp_path, tokens):
    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = build_model(ModelConfig(d_model=16, n_layers=1, n_heads=2, init_std=0.5, vocab_size=300)).eval()
    raw = rng.integers(32, 127, size=2000)
    ids = raw if tokens else raw + tokenizer.BYTE_OFFSET  # what the model reads
    nbytes = rng.integers(1, 6, size=2000) if tokens else np.ones(2000, dtype=np.int64)
    text = _stream(tmp_path, raw, nbytes if tokens else None)
    bits, covered = heldout_bits(model, text, 40, 3)
    assert bits.shape == covered.shape == (3, 40)
    starts = np.linspace(0, len(raw) - 41, 3).astype(int)
    window = torch.from_numpy(ids[starts[1] : starts[1] + 41].astype(np.int64))  # the second window, by hand
    with torch.no_grad():
        logp = torch.log_softmax(model(window[None, :-1])[0].double(), -1)
    expected = [-logp[t, window[t + 1]].item() / math.log(2) for t in range(40)]
    np.testing.assert_allclose(bits[1], expected, rtol=1e-5)
    np.testing.assert_array_equal(covered[1], nbytes[starts[1] + 1 : starts[1] + 41])  # bytes of each target
    split = bits_by_distance(bits, covered, 8)
    for part, cols in (("lt_W", slice(0, 8)), ("ge_W", slice(8, 40)), ("ge_4W", slice(32, 40))):
        assert math.isclose(split[part], bits[:, cols].sum() / covered[:, cols].sum(), rel_tol=1e-6)
    assert bits_by_distance(bits, covered, 16)["ge_4W"] is None  # 4W = 64 > 40 positions
    with pytest.raises(ValueError, match="eval.context_lengths: 2000 tokens, but the held-out split holds 2,000"):
        heldout_bits(model, text, 2000, 1)


def test_mqar_split_uses_the_shortest_and_the_longest_reach():
    rng = np.random.default_rng()
    hit, gap = rng.random(500) < 0.5, rng.integers(2, 80, 500)
    out = _split(hit, gap, (10, 30))
    assert out["acc_inside_window"] == hit[gap <= 10].mean() and out["n_inside_window"] == (gap <= 10).sum()
    assert out["acc_beyond_window"] == hit[gap > 30].mean() and out["n_beyond_window"] == (gap > 30).sum()
    assert out["acc"] == hit.mean() and out["n"] == 500


@pytest.mark.parametrize("write", ["exact", "delta"])
def test_a_tensor_cache_with_l2_off_is_its_window_alone(write):
    """`l2_off`: every gate at -inf, so the Tensor Cache computes what SWA of its window does with
    the same q, k, v, o and MLP weights (an independent module); the gates come back after."""
    from pipeline.evaluate.quality import l2_off

    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, init_std=0.1)
    tc = build_model(ModelConfig(**base, attention={"kind": "tensor_cache", "window": 5, "chunk_size": 4,
                                                    "write": write, "gate_init": 2.0})).double()
    swa = build_model(ModelConfig(**base, attention={"kind": "swa", "window": 5})).double()
    missing, unexpected = swa.load_state_dict(tc.state_dict(), strict=False)
    assert not missing and all(k.endswith(("attn.gate", "decay_logit", "write_rate_raw")) for k in unexpected)
    ids = torch.randint(0, 61, (2, 29))
    gates = [b.attn.gate.detach().clone() for b in tc.blocks]
    with torch.no_grad():
        on = tc(ids)
        with l2_off(tc):
            off = tc(ids)
        want = swa(ids)
    assert float((off - want).abs().max()) < 1e-10 * float(want.abs().max())
    assert float((on - want).abs().max()) > 1e-3 * float(want.abs().max())  # L2 was carrying something
    assert all(torch.equal(b.attn.gate, g) for b, g in zip(tc.blocks, gates))


def test_distance_within_the_trained_length_and_extrapolation_apart(tmp_path):
    """bits per byte by distance are read in windows of the trained length; the tokens past it, in
    the longest windows, are their own number; the capacity keeps each beyond-window answer."""
    from types import SimpleNamespace

    from pipeline.core.params import DataConfig, EvalConfig
    from pipeline.evaluate.quality import measure, mqar_accuracy

    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(1 << 30)))
    mqar = DataConfig(mqar=dict(seq_len=64, num_pairs=2, pair_tokens=1, alphabet="own", num_keys=24, num_values=4,
                                num_fillers=8, num_queries=4, train_gaps=(2, 40), eval_gaps={"near": (2, 6),
                                "far": (16, 40)})).mqar
    model = build_model(ModelConfig(d_model=16, n_layers=1, n_heads=2, init_std=0.5, vocab_size=mqar.end_id)).eval()
    raw = rng.integers(32, 127, size=3000)
    text = _stream(tmp_path, raw, None)
    cfg = EvalConfig(context_lengths=[32, 96], bpb_tokens=192, mqar_pairs=[2], mqar_examples=6,
                     capacity_pairs=[2, 8, 16])
    job = SimpleNamespace(eval=cfg, mqar=mqar, reach=(6, 12), min_window=4, trained_len=32)
    out = measure(model, text, job)
    bits, covered = heldout_bits(model, text, 32, 6)  # windows of the trained length
    dist = out["bpb_by_distance"]
    assert (dist["context"], dist["window"], dist["longest"]) == (32, 4, 96)
    for part, cols in (("lt_W", slice(0, 4)), ("ge_W", slice(4, 32)), ("ge_4W", slice(16, 32))):
        assert math.isclose(dist[part], bits[:, cols].sum() / covered[:, cols].sum(), rel_tol=1e-6)
    long_bits, long_covered = heldout_bits(model, text, 96, 2)
    assert math.isclose(dist["past_trained"], long_bits[:, 32:].sum() / long_covered[:, 32:].sum(), rel_tol=1e-6)
    for p in (2, 8, 16):
        r = mqar_accuracy(model, mqar, p, (16, 40), 6, cfg.seed + 1, (6, 12), decode=False)
        beyond = [h for h, g in zip(r["hits"], r["gaps"]) if g > 12]
        cap = out["capacity"][str(p)]
        assert cap["hits_beyond_window"] == beyond and len(beyond) == 6 * min(p, 4)
        assert cap["acc_beyond_window"] == pytest.approx(np.mean(beyond))
