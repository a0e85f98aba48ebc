"""Local corpora (issue 16): every format, splits by whole document, determinism, the errors that
name the file, a tiny train + evaluate on a local corpus, and DVC watching the corpus."""
import gzip
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from pipeline.core import data, plays
from pipeline.core.params import DataConfig, MQARConfig, ParamsError, RetrievalConfig, load_params
from pipeline.prepare import corpus, readers
from pipeline.prepare.corpus import CorpusError
from pipeline.prepare.prepare import prepare
from tests.studies import REPO, run_stage, stage_env, write_params

SEP = b"\n\n"
MQAR = MQARConfig(seq_len=32, num_pairs=2, pair_tokens=1, num_keys=4, num_values=4, num_fillers=8,
                  train_gaps=(2, 24), eval_gaps={"near": (2, 6), "far": (12, 24)}, num_train=16, num_eval=4)
RETRIEVAL = RetrievalConfig(tasks=["passkey"], context_lengths=[256], distances=[0.5], episodes_per_cell=1,
                            num_distractors=0)


def _documents(n: int = 9, seed: int = 0) -> list[str]:
    """Real text (stretches of the plays) and random text (any code point, so multi-byte UTF-8)."""
    rng = np.random.default_rng(seed)
    text = plays.split_bytes(["hamlet", "macbeth"]).decode()
    docs = []
    for i in range(n):
        length = int(rng.integers(300, 2000))
        if i % 2 == 0:
            start = int(rng.integers(0, len(text) - length))
            docs.append(text[start : start + length])
        else:
            points = rng.integers(0x20, 0x2FFF, size=length)
            docs.append("".join(chr(c) for c in points if not 0xD800 <= c < 0xE000) + "\nend of a random one")
    return docs


def _write(fmt: str, root, docs: list[str]) -> dict:
    """The documents in one format under `root`, in corpus order; returns data.corpus."""
    root.mkdir(parents=True)
    if fmt == "txt":  # two folders: names are paths below `path`, sorted
        for i, doc in enumerate(docs):
            path = root / ("a" if i < 4 else "b") / f"doc{i:02d}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_text(doc, encoding="utf-8")
        return {"format": "txt", "path": str(root)}
    if fmt == "jsonl":  # a gzipped file, then a plain one with a blank line (skipped)
        lines = [json.dumps({"id": f"d{i}", "text": doc}) + "\n" for i, doc in enumerate(docs)]
        with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines[:3])
        (root / "b.jsonl").write_text("".join(lines[3:5]) + "\n" + "".join(lines[5:]), encoding="utf-8")
        return {"format": "jsonl", "path": str(root)}
    if fmt == "parquet":  # several row groups
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(docs))], "body": docs}),
                       root / "part-0.parquet", row_group_size=4)
        return {"format": "parquet", "path": str(root), "text_field": "body"}
    if fmt == "hf_dataset":
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "ds"))
        return {"format": "hf_dataset", "path": str(root / "ds")}
    raise ValueError(fmt)


def _cfg(corpus_block: dict, **data_fields) -> DataConfig:
    return DataConfig(corpus=corpus_block, mqar=MQAR, retrieval=RETRIEVAL,
                      **({"validation_docs": 2, "heldout_docs": 2} | data_fields))


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def _split(out, name) -> bytes:
    return (out / "text" / f"{name}.bin").read_bytes()


def test_the_built_in_plays_are_the_bytes_they_were(tmp_path):
    """The default corpus through the streaming pass: the split files and retrieval episodes of
    the default study (params.yaml's data block) are byte for byte those written before issue 16."""
    prepare(DataConfig(mqar=MQAR), tmp_path)
    digests = _digest(tmp_path)
    assert digests["text/train.bin"] == "d17b5b7f0b4d24c5f4a49554a9592d5bdfe4b4dc5772184ed91e29885f700c63"
    assert digests["text/validation.bin"] == "c5b4d57be85a1d5ecca697614f9adba7c782822316daef5e6339e4df4b750296"
    assert digests["text/heldout.bin"] == "d55e88f2e4b7cfdb8516732ec97863199f5d50d80dcbbc6b560d0ec1471b653c"
    assert _digest(tmp_path)["retrieval/episodes.jsonl"] == \
        "492046c6183ac23a5e2ea37910732933b37c8153a0691907d4fa2217ada7bc72"
    assert _split(tmp_path, "heldout") == plays.split_bytes(["hamlet", "macbeth"])


FORMATS = ["txt", "jsonl", "parquet", "hf_dataset"]


def test_every_format_splits_by_whole_documents_the_same_way(tmp_path):
    docs = _documents()
    text = [d.encode() for d in docs]
    splits = {}
    for fmt in FORMATS:
        out = tmp_path / f"out_{fmt}"
        manifest = prepare(_cfg(_write(fmt, tmp_path / fmt, docs)), out)
        assert manifest["documents"] == {"train": 5, "validation": 2, "heldout": 2}
        assert manifest["corpus"]["format"] == fmt and not (out / ".shards").exists()
        splits[fmt] = {s: _split(out, s) for s in data.SPLITS}
        if fmt == "txt":  # names: paths below `path`; the drawn documents in corpus order
            drawn = manifest["splits"]["validation"] + manifest["splits"]["heldout"]
            index = {name: int(name[-6:-4]) for name in drawn}
            assert all(name.startswith(("a/doc", "b/doc")) for name in index)
            held = {s: sorted(index[x] for x in manifest["splits"][s]) for s in ("validation", "heldout")}
            train = [i for i in range(len(docs)) if i not in held["validation"] + held["heldout"]]
            for s, ids in [("train", train)] + list(held.items()):
                assert splits[fmt][s] == SEP.join(text[i] for i in ids), s  # whole documents, never cut
        if fmt == "jsonl":
            assert set(manifest["splits"]["validation"]) <= {f"a.jsonl.gz:{i}" for i in (1, 2, 3)} | {
                f"b.jsonl:{i}" for i in (1, 2, 4, 5, 6, 7)}
    for fmt in FORMATS[1:]:  # the same documents in the same order: the same bytes, whatever the format
        assert splits[fmt] == splits["txt"], fmt
    # the retrieval haystacks come from the held-out documents
    out = tmp_path / "out_txt"
    episode = json.loads((out / "retrieval" / "episodes.jsonl").read_text().splitlines()[0])
    heldout = _split(out, "heldout").decode()
    prefix = episode["prompt"][:40]
    assert prefix in heldout and prefix not in _split(out, "train").decode()


def test_listed_documents_keep_the_listed_order(tmp_path):
    docs = _documents()
    block = _write("jsonl", tmp_path / "c", docs) | {"name_field": "id"}
    manifest = prepare(_cfg(block, validation_docs=["d6", "d1"], heldout_docs=["d3", "d8"]), tmp_path / "out")
    assert manifest["splits"] == {"validation": ["d6", "d1"], "heldout": ["d3", "d8"]}
    assert _split(tmp_path / "out", "validation") == docs[6].encode() + SEP + docs[1].encode()
    assert _split(tmp_path / "out", "heldout") == docs[3].encode() + SEP + docs[8].encode()
    assert _split(tmp_path / "out", "train") == SEP.join(docs[i].encode() for i in (0, 2, 4, 5, 7))


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    block = _write("txt", tmp_path / "c", _documents(12))
    a = prepare(_cfg(block, seed=1), tmp_path / "a")
    b = prepare(_cfg(block, seed=1), tmp_path / "b")
    c = prepare(_cfg(block, seed=2), tmp_path / "c_out")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") and a["splits"] == b["splits"]
    assert c["splits"] != a["splits"] and _split(tmp_path / "c_out", "heldout") != _split(tmp_path / "a", "heldout")
    assert len(_split(tmp_path / "a", "train")) + len(_split(tmp_path / "a", "validation")) + len(
        _split(tmp_path / "a", "heldout")) == len(_split(tmp_path / "c_out", "train")) + len(
        _split(tmp_path / "c_out", "validation")) + len(_split(tmp_path / "c_out", "heldout"))


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_worker_processes_write_what_one_process_writes(tmp_path, monkeypatch, fmt):
    block = _write(fmt, tmp_path / "c", _documents(14))
    one = prepare(_cfg(block), tmp_path / "one", workers=1)
    monkeypatch.setattr(corpus, "IN_PROCESS_BYTES", 0)  # a pool even for a tiny corpus
    monkeypatch.setattr(readers, "UNIT_BYTES", 2048)     # many units: byte ranges of one JSONL file
    many = prepare(_cfg(block), tmp_path / "many", workers=2)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "many") and one["splits"] == many["splits"]


def _bad_utf8(rng, n: int = 400) -> tuple[bytes, int]:
    """Random bytes (never all zeros) that are not UTF-8, and where the first bad byte is."""
    raw = rng.integers(1, 256, size=n, dtype=np.uint8).tobytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return raw, err.start
    raise AssertionError("random bytes decoded as UTF-8")


def _case(name: str, root) -> tuple[dict, dict, str]:
    """(corpus block, data fields, the message's expected start) of one broken corpus."""
    docs, rng = _documents(6), np.random.default_rng(5)
    if name == "missing path":
        return {"format": "txt", "path": str(root / "nope")}, {}, f"{root / 'nope'}: no such file or folder"
    if name == "glob matches nothing":
        _write("txt", root, docs)
        return {"format": "txt", "path": str(root), "glob": "*.md"}, {}, f"{root}: no file matches *.md"
    if name == "empty txt file":
        _write("txt", root, docs)
        (root / "a" / "doc00.txt").write_bytes(b"")
        return {"format": "txt", "path": str(root)}, {}, f"{root / 'a' / 'doc00.txt'}: empty file"
    if name == "empty jsonl file":
        root.mkdir()
        (root / "a.jsonl").write_text("\n\n")
        return {"format": "jsonl", "path": str(root)}, {}, f"{root / 'a.jsonl'}: empty file"
    if name == "wrong field, first line":
        _write("jsonl", root, docs)
        return {"format": "jsonl", "path": str(root), "text_field": "body"}, {}, \
            f"{root / 'a.jsonl.gz'}:1: no field 'body' (its fields: id, text)"
    if name == "wrong field, a later line":
        root.mkdir()
        lines = [json.dumps({"text": d}) for d in docs]
        lines[3] = json.dumps({"txt": docs[3]})
        (root / "a.jsonl").write_text("\n".join(lines) + "\n")
        return {"format": "jsonl", "path": str(root)}, {}, f"{root / 'a.jsonl'}:4: no field 'text' (its fields: txt)"
    if name == "undecodable txt":
        _write("txt", root, docs)
        raw, bad = _bad_utf8(rng)
        (root / "b" / "doc05.txt").write_bytes(docs[5].encode() + raw)
        return {"format": "txt", "path": str(root)}, {}, \
            f"{root / 'b' / 'doc05.txt'}: not UTF-8 (undecodable byte at offset {len(docs[5].encode()) + bad})"
    if name == "undecodable jsonl line":
        root.mkdir()
        raw, _ = _bad_utf8(rng)
        lines = [json.dumps({"text": d}).encode() for d in docs]
        lines[1] = b'{"text": "' + raw.replace(b'"', b"'").replace(b"\\", b"/").replace(b"\n", b" ") + b'"}'
        (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        return {"format": "jsonl", "path": str(root)}, {}, f"{root / 'a.jsonl'}:2: not UTF-8"
    if name == "not JSON":
        root.mkdir()
        lines = [json.dumps({"text": d}) for d in docs]
        lines[1] = docs[1].replace("\n", " ")
        (root / "a.jsonl").write_text("\n".join(lines) + "\n")
        return {"format": "jsonl", "path": str(root)}, {}, f"{root / 'a.jsonl'}:2: not JSON"
    if name == "parquet wrong column":
        _write("parquet", root, docs)
        return {"format": "parquet", "path": str(root)}, {}, \
            f"{root / 'part-0.parquet'}: no column 'text' (its columns: id, body)"
    if name == "undecodable parquet row":
        import pyarrow as pa
        import pyarrow.parquet as pq

        root.mkdir()
        raw, _ = _bad_utf8(rng)
        pq.write_table(pa.table({"text": pa.array([docs[0].encode(), raw] + [d.encode() for d in docs[2:]],
                                                  type=pa.binary())}), root / "p.parquet")
        return {"format": "parquet", "path": str(root)}, {}, f"{root / 'p.parquet'}: row 1: not UTF-8"
    if name == "dataset wrong column":
        _write("hf_dataset", root, docs)
        return {"format": "hf_dataset", "path": str(root / "ds"), "text_field": "body"}, {}, \
            f"{root / 'ds'}: no column 'body' (its columns: text)"
    if name == "not a saved dataset":
        _write("txt", root, docs)
        return {"format": "hf_dataset", "path": str(root)}, {}, f"{root}: not a dataset written by save_to_disk"
    if name == "unknown listed document":
        _write("txt", root, docs)
        return {"format": "txt", "path": str(root)}, {"validation_docs": ["a/doc01.txt"], "heldout_docs": ["nope"]}, \
            f"{root}: no document named 'nope'"
    if name == "nothing left to train on":
        _write("txt", root, docs)
        return {"format": "txt", "path": str(root)}, {"validation_docs": 3, "heldout_docs": 3}, \
            "data.validation_docs + data.heldout_docs: 3 + 3 documents leave none of the corpus's 6 to train on"
    if name == "held-out text too short":
        root.mkdir()
        for i, doc in enumerate(docs):
            (root / f"{i}.txt").write_text(doc if i else "A short one.")
        return {"format": "txt", "path": str(root)}, {"validation_docs": ["1.txt"], "heldout_docs": ["0.txt"]}, \
            "data.heldout_docs: the held-out documents hold 12 tokens, fewer than the 257"
    raise ValueError(name)


CASES = ["missing path", "glob matches nothing", "empty txt file", "empty jsonl file", "wrong field, first line",
         "wrong field, a later line", "undecodable txt", "undecodable jsonl line", "not JSON",
         "parquet wrong column", "undecodable parquet row", "dataset wrong column", "not a saved dataset",
         "unknown listed document", "nothing left to train on", "held-out text too short"]


@pytest.mark.parametrize("name", CASES)
def test_a_bad_corpus_is_named_before_anything_is_written(tmp_path, name):
    block, fields, message = _case(name, tmp_path / "c")
    with pytest.raises(CorpusError) as err:
        prepare(_cfg(block, **fields), tmp_path / "out")
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_the_stage_stops_with_one_line_and_exit_2(tmp_path):
    block, _, message = _case("wrong field, a later line", tmp_path / "c")
    _write_local_params(tmp_path, block)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("a previous prepare's file")
    result = run_stage(tmp_path, "prepare")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"params.yaml: {message}"), result.stderr
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["keep.txt"]  # nothing written


def _set(root, block: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[block] |= values
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _write_local_params(root, block: dict, **blocks) -> None:
    """The tiny project's params, its text from a local corpus; `blocks` replace whole blocks."""
    write_params(root)
    params = yaml.safe_load((root / "params.yaml").read_text()) | blocks
    for field in ("validation_plays", "heldout_plays"):
        params["data"].pop(field)
    params["data"] |= {"corpus": block, "validation_docs": 2, "heldout_docs": 2}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_prepare_train_evaluate_on_a_local_corpus_with_a_trained_bpe(tmp_path):
    """The whole path on a local corpus with a BPE tokenizer trained on its training split: the
    model's vocabulary follows the tokenizer, the export bundles it for lm-eval and generate()."""
    docs = _documents(10) + [d * 3 for d in _documents(4, seed=1)]
    block = _write("jsonl", tmp_path / "corpus", docs)
    _write_local_params(tmp_path, block, variants={"mha": {"kind": "mha"}},
                        eval={"context_lengths": [32, 64], "bpb_tokens": 128, "mqar_pairs": [2], "mqar_examples": 8,
                              "decode_lengths": [64], "decode_new_tokens": 4, "lm_eval_tasks": ["kvf_passkey_mc"],
                              "task_context_lengths": [256], "limit": 1})
    _set(tmp_path, "train", steps=10)
    _set(tmp_path, "data", tokenizer={"train": {"vocab_size": 400}})
    for stage in ("prepare", "train", "export", "evaluate"):  # export: lm-eval reads it
        result = run_stage(tmp_path, stage, timeout=400)
        assert result.returncode == 0, f"{stage}: " + result.stdout[-2000:] + result.stderr[-3000:]
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["corpus"] == {"format": "jsonl", "path": block["path"], "files": 2,
                                  "bytes": sum(p.stat().st_size for p in (tmp_path / "corpus").iterdir())}
    heldout = _split(tmp_path / "data", "heldout")  # two whole documents of the corpus
    assert any(heldout == docs[i].encode() + SEP + docs[j].encode() for i in range(14) for j in range(i + 1, 14))
    result = json.loads((tmp_path / "results" / "eval" / "mha.json").read_text())
    assert np.isfinite(result["bpb"]["64"]) and 0 < result["bpb"]["64"] < 9
    assert result["lm_eval"]["scores"]["kvf_passkey_mc"]  # the lm-eval task ran on this corpus
    # ... with its haystack the prepared held-out split (the plays' names are empty here)
    from pipeline.core.params import load_params
    from pipeline.evaluate.driver import task_metadata
    from pipeline.evaluate.tasks.utils import _haystack, _settings

    metadata = task_metadata(load_params(tmp_path / "params.yaml"), tmp_path / "data")
    assert metadata["heldout_plays"] == [] and _haystack(_settings(metadata)) == heldout
    # the tokenizer: trained, saved with the data, the model sized to it, bundled with the export
    assert manifest["tokenizer"]["name"] == "bpe" and 259 < manifest["tokenizer"]["vocab_size"] <= 400
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core import checkpoint
    from pipeline.core.tokenizer import load_prepared

    ours, meta = checkpoint.load_model(tmp_path / "checkpoints" / "mha")
    assert meta["model_config"]["vocab_size"] == 400
    export = tmp_path / "exports" / "mha"
    bundled = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    text = heldout.decode()
    ids = load_prepared(tmp_path / "data")(text, add_special_tokens=False).input_ids
    assert bundled(text, add_special_tokens=False).input_ids == ids and len(ids) < len(heldout)
    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    prompt = torch.tensor([ids[:40]])
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 40:]
    with torch.no_grad():  # our model's own greedy decode of the same prompt
        cache, x, expect = ours.init_cache(1), prompt, []
        for _ in range(6):
            logits = ours(x, cache=cache)[0, -1]
            logits[bundled.eos_token_id] = -float("inf")  # min_new_tokens holds eos back
            nxt = logits.argmax()
            expect.append(int(nxt))
            x = nxt.view(1, 1)
    assert out.tolist() == expect


def test_example_study_over_local_books_parses():
    params = load_params(REPO / "configs" / "pg19-local.yaml")
    assert params.data.corpus.format == "txt" and params.data.corpus.glob == "*.txt"
    assert (params.data.validation_docs, params.data.heldout_docs) == (50, 100)
    assert params.data.validation_plays == [] and params.data.tokenizer.train.vocab_size == 8192
    assert params.model_config_for("mha").vocab_size == 8192  # the model follows the tokenizer


@pytest.mark.parametrize("path", ["params.yaml", *sorted(p.relative_to(REPO).as_posix()
                                                          for p in (REPO / "configs").glob("*.yaml"))])
def test_every_study_names_what_dvc_watches(path):
    """dvc.yaml's prepare stage depends on ${data.corpus.path}: every params file must set it."""
    raw = yaml.safe_load((REPO / path).read_text())
    assert isinstance(raw["data"]["corpus"]["path"], str)
    load_params(REPO / path)


@pytest.mark.parametrize("block, message", [
    ({"format": "shakespeare", "path": "books"}, "data.corpus.path: the built-in plays need no path"),
    ({"format": "txt", "path": "books/*.txt"}, "data.corpus.path: 'books/*.txt' is a pattern"),
    ({"format": "shakespeare", "glob": "*.txt"}, "data.corpus.glob: only for local files"),
    ({"format": "csv", "path": "books"}, "data.corpus.format: Input should be"),
])
def test_corpus_params_errors_name_the_field(block, message):
    from pipeline.core.params import parse_params

    raw = yaml.safe_load((REPO / "configs" / "pg19-local.yaml").read_text())
    raw["data"]["corpus"] = block
    if block["format"] == "shakespeare":
        raw["data"] = {k: v for k, v in raw["data"].items() if not k.endswith("_docs")}
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert str(err.value).startswith(message), str(err.value)


def test_dvc_reruns_prepare_when_a_corpus_file_changes(tmp_path):
    """DVC itself, in a copy of the project: a changed corpus file re-runs prepare, a touched
    (unchanged) one does not; the default params resolve `${data.corpus.path}` too."""
    repo = tmp_path / "repo"
    for rel in ("dvc.yaml", "uv.lock", "stages/__init__.py", "stages/prepare.py", "pipeline/core/params",
                "pipeline/core/data.py", "pipeline/prepare/corpus.py", "pipeline/prepare/readers.py",
                "pipeline/core/tokenizer.py", "pipeline/core/tokens.py"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (REPO / rel).is_dir() else shutil.copy)(REPO / rel, repo / rel)
    _write("txt", repo / "corpus", _documents(6))
    _write_local_params(repo, {"format": "txt", "path": "corpus"})
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["mqar"] |= {"num_train": 16, "num_eval": 4}
    params["data"]["retrieval"] = RETRIEVAL.model_dump(mode="json")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = str(REPO / ".venv" / "bin" / "dvc") if (REPO / ".venv" / "bin" / "dvc").exists() else "dvc"
    env = stage_env()

    def run(*args):
        result = subprocess.run([dvc, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    run("init", "--no-scm", "--quiet")
    run("config", "--local", "core.site_cache_dir", str(repo / ".dvc" / "tmp" / "site_cache"))
    run("repro", "prepare")
    assert json.loads(run("status", "--json", "prepare")) == {}
    (repo / "corpus" / "a" / "doc01.txt").touch()  # same bytes: nothing to do
    assert json.loads(run("status", "--json", "prepare")) == {}
    with open(repo / "corpus" / "b" / "doc05.txt", "a", encoding="utf-8") as f:
        f.write("\nOne more line.\n")
    assert json.loads(run("status", "--json", "prepare")) == {
        "prepare": [{"changed deps": {"corpus": "modified"}}]}
    assert "Running stage 'prepare'" in run("repro", "--dry", "prepare")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")  # the built-in plays: the lock is watched
    assert "Running stage 'prepare'" in run("repro", "--dry", "prepare")
