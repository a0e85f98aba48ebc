import numpy as np

from pipeline.core import tokenizer


def test_byt5_layout():
    assert (tokenizer.PAD_ID, tokenizer.EOS_ID, tokenizer.UNK_ID, tokenizer.VOCAB_SIZE) == (0, 1, 2, 259)
    assert tokenizer.encode("A\n").tolist() == [65 + 3, 10 + 3]
    assert tokenizer.encode(b"\x00\xff", add_eos=True).tolist() == [3, 258, 1]


def test_roundtrip_and_specials():
    text = "To be, or not to be -- caf\u00e9"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode([0, 2, 75, 1, 76]) == "H"  # specials dropped, stops at eos
    raw = np.frombuffer(b"abc", dtype=np.uint8)
    assert tokenizer.bytes_to_ids(raw).tolist() == [100, 101, 102]


# --------------------------------------------------------------------------- other tokenizers
import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from pipeline.core import data, plays, tokens  # noqa: E402
from pipeline.core.params import DataConfig, MQARConfig, ParamsError, RetrievalConfig, parse_params  # noqa: E402
from pipeline.prepare.prepare import prepare  # noqa: E402

MQAR = MQARConfig(seq_len=32, num_pairs=2, pair_tokens=1, num_keys=4, num_values=4, num_fillers=8,
                  train_gaps=(2, 24), eval_gaps={"near": (2, 6), "far": (12, 24)}, num_train=16, num_eval=4)
RETRIEVAL = RetrievalConfig(tasks=["passkey"], context_lengths=[256], distances=[0.5], episodes_per_cell=1,
                            num_distractors=0)


def _random_text(rng, n: int) -> str:
    """Words of the plays and random code points (1- to 4-byte UTF-8), lines of random length."""
    text = plays.split_bytes(["macbeth"]).decode()
    parts = []
    while sum(map(len, parts)) < n:
        if rng.random() < 0.6:
            at = int(rng.integers(0, len(text) - 400))
            parts.append(text[at : at + int(rng.integers(20, 400))])
        else:
            points = rng.choice([rng.integers(0x20, 0x7F), rng.integers(0xA0, 0x7FF), rng.integers(0x800, 0xD7FF),
                                 rng.integers(0x10000, 0x1FFFF)], size=int(rng.integers(1, 60)))
            parts.append("".join(map(chr, points)) + ("\n" if rng.random() < 0.5 else " "))
    return "".join(parts)


def _corpus(root, rng, n_docs: int = 12) -> dict:
    root.mkdir(parents=True)
    for i in range(n_docs):
        (root / f"doc{i:02d}.txt").write_text(_random_text(rng, int(rng.integers(2000, 9000))), encoding="utf-8")
    return {"format": "txt", "path": str(root)}


def _prepare(root, corpus: dict, tok) -> dict:
    cfg = DataConfig(corpus=corpus, mqar=MQAR, retrieval=RETRIEVAL, validation_docs=2, heldout_docs=2, tokenizer=tok)
    return prepare(cfg, root / "data", workers=1)


def test_blocks_end_at_line_ends_and_join_to_the_file(tmp_path):
    rng = np.random.default_rng()
    text = _random_text(rng, 20_000) + "no line end at the end: \u00e9\U0001F600"
    (tmp_path / "t.bin").write_bytes(text.encode())
    pieces = list(tokens.blocks(tmp_path / "t.bin", block_bytes=int(rng.integers(7, 500))))
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.endswith("\n") or "\n" not in p for p in pieces[:-1])


def test_each_token_covers_its_bytes(tmp_path):
    rng = np.random.default_rng()
    tok = tokenizer.train_bpe([_random_text(rng, 30_000)], vocab_size=400)
    ascii_text = plays.split_bytes(["hamlet"]).decode()[: 5000]
    enc = tok.backend_tokenizer.encode(ascii_text, add_special_tokens=False)
    counts = tokens.token_bytes(ascii_text, enc.offsets)  # ASCII: a token's bytes are its text
    assert counts.tolist() == [len(tok.decode([i])) for i in enc.ids]
    text = _random_text(rng, 5000)
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    counts = tokens.token_bytes(text, enc.offsets)
    assert counts.sum() == len(text.encode()) and counts.min() >= 0
    ends = np.cumsum(counts)  # at every token that ends a character, the bytes so far decode to the text so far
    for i in range(len(enc.ids)):
        done = bytes(tok.decode(enc.ids[: i + 1]), "utf-8")
        if "\ufffd" not in done.decode():
            assert ends[i] == len(done)


def test_a_trained_bpe_round_trips_every_split_and_a_saved_one_tokenises_alike(tmp_path):
    rng = np.random.default_rng()
    corpus = _corpus(tmp_path / "corpus", rng)
    manifest = _prepare(tmp_path / "a", corpus, {"train": {"vocab_size": 600}})
    out = tmp_path / "a" / "data"
    assert manifest["tokenizer"]["name"] == "bpe" and manifest["tokenizer"]["dtype"] == "uint16"
    tok = tokenizer.load_prepared(out)
    assert [tok.convert_ids_to_tokens(i) for i in range(3)] == list(tokenizer.SPECIALS)
    for split in ("train", "validation", "heldout"):
        text = (out / "text" / f"{split}.bin").read_bytes()
        stream = tokens.TokenStream(out, split)
        ids = stream.ids(0, len(stream))
        assert len(ids) == manifest["tokenizer"]["tokens"][split] and len(ids) < len(text)
        assert tok.decode(ids.tolist()).encode() == text  # byte for byte
        if split != "train":
            assert stream.nbytes(0, len(stream)).sum() == len(text)
    # the same corpus again: the same bytes; the saved tokenizer as a local folder: the same ids
    _prepare(tmp_path / "b", corpus, {"train": {"vocab_size": 600}})
    digests = json.loads((out / "manifest.json").read_text())["files"]
    assert json.loads((tmp_path / "b" / "data" / "manifest.json").read_text())["files"] == digests
    shutil.copytree(out / "tokenizer", tmp_path / "saved")  # saved with a max_length: never applied
    saved = Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    saved.enable_truncation(8)
    saved.save(str(tmp_path / "saved" / "tokenizer.json"))
    local = _prepare(tmp_path / "c", corpus, {"path": str(tmp_path / "saved")})
    assert local["tokenizer"]["name"] == "local"
    again = json.loads((tmp_path / "c" / "data" / "manifest.json").read_text())["files"]
    assert {k: v for k, v in again.items() if k.startswith("tokens/")} == \
        {k: v for k, v in digests.items() if k.startswith("tokens/")}
    # validation windows: targets are the inputs shifted, and each window's byte counts are its text's
    x, y, nbytes = data.TrainingData(out).val_windows(6, 16)
    assert (x[:, 1:] == y[:, :-1]).all() and nbytes.shape == y.shape
    for row, counts in zip(y, nbytes):
        text = tok.decode(row.tolist())
        if "\ufffd" not in text:  # no character cut at the window's edges
            assert counts.sum() == len(text.encode())


def test_block_cuts_tokenise_as_the_whole_text(tmp_path, monkeypatch):
    """Prose cut into blocks (`tokens._cut`) gives the ids of the text tokenised whole."""
    text = plays.split_bytes(["macbeth", "hamlet"]).decode()
    tok = tokenizer.train_bpe([text], vocab_size=800)
    (tmp_path / "text").mkdir()
    for split in ("train", "validation", "heldout"):
        (tmp_path / "text" / f"{split}.bin").write_bytes(text.encode())
    monkeypatch.setattr(tokens, "BLOCK_BYTES", 3000)
    tokens.write_tokens(tok, tmp_path / "text", tmp_path / "tokens", workers=1)
    ids = np.fromfile(tmp_path / "tokens" / "heldout.bin", dtype=np.uint16)
    assert ids.tolist() == tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_prepared_data_must_fit_the_params(tmp_path):
    rng = np.random.default_rng()
    manifest = _prepare(tmp_path, _corpus(tmp_path / "corpus", rng, n_docs=6), {"train": {"vocab_size": 400}})
    cfg = lambda tok: DataConfig(mqar=MQAR, retrieval=RETRIEVAL, tokenizer=tok,  # noqa: E731
                                 corpus={"format": "txt", "path": str(tmp_path / "corpus")})
    bpe = cfg({"train": {"vocab_size": 400}})
    data.check_fits(manifest, bpe, 400, 32)
    with pytest.raises(data.DataMismatch,
                       match="data.tokenizer: data/ was prepared with the bpe tokenizer, params ask for bytes"):
        data.check_fits(manifest, cfg("bytes"), 400, 32)
    with pytest.raises(data.DataMismatch, match="model.vocab_size: 300, but data/ holds ids of a 400-id tokenizer"):
        data.check_fits(manifest, bpe, 300, 32)
    counts = manifest["tokenizer"]["tokens"]
    short = min(("train", "validation"), key=counts.get)  # the first to run out
    with pytest.raises(data.DataMismatch, match=f"train.seq_len: {counts[short]} tokens, but the {short} split "
                                                f"holds {counts[short]:,}"):
        data.check_fits(manifest, bpe, 400, counts[short])


def _params(**data_fields) -> dict:
    return {"data": {"mqar": MQAR.model_dump(), "retrieval": RETRIEVAL.model_dump(), **data_fields},
            "model": {"d_model": 16, "n_layers": 1, "n_heads": 2}, "variants": {"mha": {"kind": "mha"}},
            "train": {"steps": 10, "warmup_steps": 2, "seq_len": 32},
            "eval": {"context_lengths": [32], "mqar_pairs": [2]}}


def test_the_model_vocabulary_follows_the_tokenizer(tmp_path):
    assert parse_params(_params()).model_config_for("mha").vocab_size == 259
    trained = parse_params(_params(tokenizer={"train": {"vocab_size": 1000}}))
    assert trained.model_config_for("mha").vocab_size == 1000
    tok = tokenizer.train_bpe([plays.split_bytes(["macbeth"]).decode()], vocab_size=700)
    tok.save_pretrained(str(tmp_path / "tok"))
    local = parse_params(_params(tokenizer={"path": str(tmp_path / "tok")}))
    assert local.model_config_for("mha").vocab_size == len(tok) == 700


def _tiny_vocab(root) -> str:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(["<unk>", "a", "b"])}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(str(root / "tiny"))
    return str(root / "tiny")


@pytest.mark.parametrize("case, message", [
    ("words", "data.tokenizer: must be bytes, {path: <a tokenizer folder>}, {train: {vocab_size: N}} or "
              "{pretrained: <a checkpoint>}"),
    ("both", "data.tokenizer: must be bytes"),
    ("small_bpe", "data.tokenizer.train.vocab_size: Input should be greater than or equal to 260"),
    ("missing", "data.tokenizer.path: {root}/nowhere holds no tokenizer_config.json"),
    ("tiny", "data.tokenizer.path: {root}/tiny has 3 ids, fewer than the 259"),
    ("model_too_small", "model.vocab_size: 500 is smaller than the 1000 ids of data.tokenizer (BPE trained"),
])
def test_tokenizer_errors_name_the_field(tmp_path, case, message):
    raw = _params(tokenizer={
        "words": "gpt2", "both": {"path": "x", "train": {"vocab_size": 1000}},
        "small_bpe": {"train": {"vocab_size": 100}}, "missing": {"path": str(tmp_path / "nowhere")},
        "tiny": {"path": _tiny_vocab(tmp_path) if case == "tiny" else ""},
        "model_too_small": {"train": {"vocab_size": 1000}}}[case])
    if case == "model_too_small":
        raw["model"]["vocab_size"] = 500
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message.replace("{root}", str(tmp_path)) in str(err.value)
