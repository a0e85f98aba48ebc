import hashlib

import numpy as np
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


def _sha(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(str(arrays[k].dtype).encode())
        h.update(arrays[k].tobytes())
    return h.hexdigest()


# Computed by the generator as it was before `alphabet`, `train_pairs`, `num_queries` existed
# (commit 334609f): a params file that sets none of them prepares the same bytes, so its runs'
# data digests (and fingerprints) do not change.
BEFORE = {1: "2449f256e99c30c3b17f958773f15dac4c57819178c61d8813fd6ace76ad939d",
          2: "d2632930757421d4da8c2fd9bebbcfdb0632d03484302ab409b6b2bad9dabc3d"}


@pytest.mark.parametrize("pair_tokens", [1, 2])
def test_old_configs_prepare_the_bytes_they_did(pair_tokens):
    cfg = MQARConfig(seq_len=64, num_pairs=4, pair_tokens=pair_tokens, num_keys=8, num_values=8,
                     num_fillers=16, train_gaps=(2, 40), eval_gaps={"far": (20, 40)})
    assert _sha(data.make_mqar(cfg, 16, (20, 40), 3)) == BEFORE[pair_tokens]
    assert set(cfg.model_dump()) == {"seq_len", "num_pairs", "num_keys", "num_values", "num_fillers", "pair_tokens",
                                     "train_gaps", "eval_gaps", "num_train", "num_eval"}


def _own(**kw):
    """An MQAR block with ids of its own after the byte tokenizer's, resolved as params do."""
    mqar = dict(seq_len=128, num_pairs=4, pair_tokens=1, alphabet="own", num_keys=64, num_values=8,
                num_fillers=16, train_gaps=(2, 90), eval_gaps={"near": (2, 10), "far": (40, 90)}) | kw
    return DataConfig(mqar=mqar).mqar


@pytest.mark.parametrize("pair_tokens", [1, 2])
def test_own_alphabet_stores_many_pairs_each_queried_key_at_its_gap(pair_tokens):
    cfg = _own(pair_tokens=pair_tokens, num_keys=160, num_queries=16, num_fillers=8, seq_len=512,
               eval_gaps={"near": (2, 10), "far": (40, 200)})
    assert (cfg.first_id, cfg.end_id) == (tokenizer.VOCAB_SIZE, tokenizer.VOCAB_SIZE + cfg.n_ids)
    P, Q, L, rng = 150, 16, 512, np.random.default_rng()
    lo, hi = 40, 200
    out = data.make_mqar(cfg.model_copy(update={"num_pairs": P}), 8, (lo, hi), int(rng.integers(1 << 30)))
    tokens, mask, gaps = out["tokens"], out["answer_mask"], out["gaps"]
    alpha = data._alphabets(cfg)
    assert tokens.min() >= cfg.first_id and tokens.max() < cfg.end_id  # never a text id
    q0 = L - 2 * Q
    for row in range(8):
        assert mask[row].nonzero()[0].tolist() == [q0 + 2 * j + 1 for j in range(Q)]
        assert ((gaps[row] >= lo) & (gaps[row] <= hi)).all()
        body = tokens[row, :q0]
        if pair_tokens == 1:  # every stored pair: one pair token; its key and value read back from its id
            stored = body[np.isin(body, alpha["pairs"])] - alpha["pairs"][0]
            keys, values = stored // cfg.num_values, stored % cfg.num_values
        else:
            at = np.flatnonzero(np.isin(body, alpha["keys"]))
            keys, values = body[at] - alpha["keys"][0], body[at + 1] - alpha["values"][0]
        assert len(keys) == P and len(set(keys.tolist())) == P  # 150 distinct keys stored
        assert len(set(values.tolist())) <= cfg.num_values < P  # values repeat past the alphabet
        for j in range(Q):  # the stored pair of query j, `gap` before it: its key and its value
            key, value = tokens[row, q0 + 2 * j], tokens[row, q0 + 2 * j + 1]
            p = q0 + 2 * j - gaps[row, j]
            if pair_tokens == 2:
                assert (tokens[row, p], tokens[row, p + 1]) == (key, value)
            else:
                k, v = key - alpha["keys"][0], value - alpha["values"][0]
                assert tokens[row, p] == alpha["pairs"][k * cfg.num_values + v]
        # pairs nobody asks for lie at least the bucket's nearest gap before the first query
        queried = {q0 + 2 * j - gaps[row, j] for j in range(Q)}
        starts = np.flatnonzero(np.isin(body, alpha["pairs"] if pair_tokens == 1 else alpha["keys"]))
        assert all(p <= q0 - lo for p in set(starts.tolist()) - queried)


def test_a_mix_of_pair_counts_in_equal_shares():
    cfg = _own(train_pairs=[4, 8, 16])
    out = data.make_mqar(cfg, 30, tuple(cfg.train_gaps), 5, cfg.train_pairs)
    assert out["answer_mask"].sum(axis=1).tolist() == [4, 8, 16] * 10
    assert ((out["gaps"] >= 0).sum(axis=1) == out["answer_mask"].sum(axis=1)).all()  # -1 past a row's queries
    assert out["gaps"].shape == (30, 16) and out["tokens"].dtype == np.int16


def test_ids_past_int16_widen_the_array():
    cfg = _own(first_id=40_000)
    out = data.make_mqar(cfg, 4, (40, 90), 1)
    assert out["tokens"].dtype == np.int32 and out["tokens"].min() >= 40_000


def test_prepare_writes_the_mix_and_the_capacity_sets(tmp_path):
    cfg = DataConfig(mqar=dict(seq_len=96, num_pairs=2, pair_tokens=1, alphabet="own", num_keys=32, num_values=4,
                               num_fillers=8, train_pairs=[2, 4], num_queries=4, capacity_pairs=[2, 8, 24],
                               train_gaps=(2, 60), eval_gaps={"near": (2, 8), "far": (30, 60)},
                               num_train=20, num_eval=6))
    manifest = prepare(cfg, tmp_path)
    assert manifest["mqar_sets"] == ["capacity_p2", "capacity_p24", "capacity_p8", "eval_far", "eval_near", "train"]
    assert manifest["mqar_ids"] == [tokenizer.VOCAB_SIZE, tokenizer.VOCAB_SIZE + 32 + 4 + 32 * 4 + 8]
    d = data.TrainingData(tmp_path)
    assert d.mqar["train"][1].sum(axis=1).tolist() == [2, 4] * 10
    for p in (2, 8, 24):  # every query of a capacity set at the far bucket's gaps, min(p, num_queries) of them
        tokens, mask = d.mqar[f"capacity_p{p}"]
        gaps = np.load(tmp_path / "mqar" / f"capacity_p{p}.gaps.npy")
        assert (mask.sum(axis=1) == min(p, 4)).all() and gaps[gaps >= 0].min() >= 30 and gaps.max() <= 60
        alpha = data._alphabets(cfg.mqar)
        assert (np.isin(tokens, alpha["pairs"]).sum(axis=1) == p).all()


def test_vocab_alphabet_draws_from_the_tokenizers_ids_at_first_id():
    """alphabet vocab: keys, values and fillers are the run of the tokenizer's ids from first_id on."""
    first = int(np.random.default_rng().integers(300, 40_000))
    cfg = MQARConfig(seq_len=64, num_pairs=4, pair_tokens=2, num_keys=8, num_values=8, num_fillers=16,
                     alphabet="vocab", first_id=first, train_gaps=(2, 40), eval_gaps={"far": (20, 40)})
    tokens = data.make_mqar(cfg, 16, (20, 40), 3)["tokens"]
    assert tokens.min() >= first and tokens.max() < first + 32 == cfg.end_id
    assert set(np.unique(tokens)) >= set(range(first + 16, first + 32))  # the fillers, all of them
