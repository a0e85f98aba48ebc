import hashlib

import pytest

from pipeline.core import data, plays, tokenizer
from pipeline.core.params import DataConfig, MQARConfig
from pipeline.prepare.prepare import prepare


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = DataConfig(mqar=MQARConfig(seq_len=64, num_pairs=3, num_train=64, num_eval=8,
                                     train_gaps=(2, 50), eval_gaps={"near": (2, 12), "far": (30, 50)}))
    prepare(cfg, tmp_path / "a")
    prepare(cfg, tmp_path / "b")
    prepare(cfg.model_copy(update={"seed": cfg.seed + 1}), tmp_path / "c")
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and len(a) >= 10
    assert a["mqar/train.tokens.npy"] != c["mqar/train.tokens.npy"]
    assert a["text/train.bin"] == c["text/train.bin"]  # the split depends on plays, not the seed


def test_split_by_whole_plays():
    cfg = DataConfig()
    splits = data.split_plays(cfg)
    assert len(plays.list_plays()) == 42
    assert splits["validation"] == ["julius_caesar", "twelfth_night"]
    assert not set(splits["train"]) & set(splits["validation"] + splits["heldout"])
    assert len(splits["train"]) == 42 - 4
    assert b"HAMLET" in plays.split_bytes(["hamlet"])[:200]


@pytest.mark.parametrize("pair_tokens", [1, 2])
def test_mqar_gaps_and_answers(pair_tokens):
    cfg = MQARConfig(seq_len=64, num_pairs=4, pair_tokens=pair_tokens, num_keys=8, num_values=8,
                     num_fillers=16, train_gaps=(2, 40), eval_gaps={"far": (20, 40)})
    out = data.make_mqar(cfg, 32, (20, 40), seed=3)
    tokens, mask, gaps = out["tokens"], out["answer_mask"], out["gaps"]
    assert tokens.shape == (32, 64) and gaps.min() >= 20 and gaps.max() <= 40
    alpha = data._alphabets(cfg)
    q0 = 64 - 2 * 4
    for row in range(32):
        assert mask[row].nonzero()[0].tolist() == [q0 + 1, q0 + 3, q0 + 5, q0 + 7]
        for j in range(4):
            key, value = tokens[row, q0 + 2 * j], tokens[row, q0 + 2 * j + 1]
            p = q0 + 2 * j - gaps[row, j]
            if pair_tokens == 2:  # the stored pair `k v` sits exactly `gap` before its query
                assert (tokens[row, p], tokens[row, p + 1]) == (key, value)
            else:
                k = key - alpha["keys"][0]
                v = value - alpha["values"][0]
                assert tokens[row, p] == alpha["pairs"][k * cfg.num_values + v]
            assert key in alpha["keys"] and value in alpha["values"]


def test_batches_are_pure_functions_of_seed_and_step(tiny_data):
    d = data.TrainingData(tiny_data)
    x1, y1 = d.lm_batch(0, 5, 3, 16)
    x2, y2 = d.lm_batch(0, 5, 3, 16)
    x3, _ = d.lm_batch(0, 6, 3, 16)
    assert (x1 == x2).all() and (y1 == y2).all() and not (x1 == x3).all()
    assert (x1[:, 1:] == y1[:, :-1]).all() and x1.min() >= tokenizer.BYTE_OFFSET
    xm, ym = d.mqar_batch("train", 0, 5, 4)
    assert ((ym != -100).sum(1) == 2).all()  # two queries per sequence are scored


def test_retrieval_evidence_distance():
    cfg = DataConfig().retrieval.model_copy(update={"context_lengths": [512], "distances": [0.2, 0.8],
                                                    "episodes_per_cell": 2})
    haystack = plays.split_bytes(["macbeth"])
    eps = data.make_retrieval(cfg, haystack, seed=1)
    assert len(eps) == 3 * 2 * 2
    for e in eps:
        assert abs(len(e["prompt"]) - 512) <= 1
        assert e["answer"] in e["prompt"]
        prompt, needle_end = e["prompt"], e["prompt"].index(e["answer"]) + len(e["answer"])
        assert e["distance"] >= len(prompt) - needle_end - 64  # measured from the needle's end
        assert abs(e["distance"] - e["distance_frac"] * 512) <= 80, e["id"]
