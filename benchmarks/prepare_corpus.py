"""Prepare throughput on a generated local corpus: our streaming pass beside `datasets` + a fast
tokenizer (the peer), both byte-level (default) or both with the same BPE (`--tokenizer bpe`),
both writing token ids to disk.

    .venv/bin/python benchmarks/prepare_corpus.py                      # 1 GB of JSONL (the issue's size)
    .venv/bin/python benchmarks/prepare_corpus.py --mb 50 --format txt # 50 MB of books, one .txt each
    .venv/bin/python benchmarks/prepare_corpus.py --mb 50 --tokenizer bpe  # a BPE of 8192 ids, both sides

The corpus is generated once (stretches of the plays in random order, 2-40 KB documents; a
seed) under runs/bench/prepare_corpus/<format>-<mb>MB and reused. Ours: `pipeline.prepare.corpus.
write_splits` (read, check UTF-8 / JSON / field, tokenise, write text/<split>.bin as uint8
memmaps, 1 validation + 1 held-out document). Peer: `datasets.load_dataset` (json / text) then
`Dataset.map` (batched, its default 1000 rows a batch) with a byte-level `tokenizers` tokenizer
built here (ids = ByT5's, byte + 3; nothing downloaded) wrapped as `PreTrainedTokenizerFast`
(input ids only, no attention mask), `num_proc` = the same workers, writing its Arrow cache
(int32 ids). Each runs in a fresh process; MB/s = corpus bytes / the process's
own time (imports excluded); CPU seconds and peak memory (PSS summed over the process and its
workers, shared pages once) of the whole process. Prints one JSON object per measurement.

`--tokenizer bpe`: one byte-level BPE of 8192 ids (`pipeline.core.tokenizer.train_bpe` on the first
10 MB of documents of the corpus it is first run on: the same documents for any JSONL size from
10 MB, the generator being seeded), saved under runs/bench/prepare_corpus/tokenizer-bpe-8192 and
reused at every size and format; its training time is printed apart and counted in neither side.
Ours: what prepare does with `data.tokenizer: {path: <that folder>}`: `write_splits`, then
`pipeline.core.tokens.prepare_tokenizer` (load it with `tokenizer.load_local`, save it with the data,
`write_tokens`: uint16 ids of every split, byte counts of validation and held-out). Peer: the
same as above with that folder loaded as `PreTrainedTokenizerFast`. Check: the peer's ids for
our validation document (one document, one block) equal the ids we wrote for it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "runs" / "bench" / "prepare_corpus"
BPE_VOCAB = 8192
BPE_TRAIN_BYTES = 10 * 10**6  # the slice of the corpus the BPE is trained on
BPE_DIR = BENCH / f"tokenizer-bpe-{BPE_VOCAB}"
SAMPLE = BENCH / "sample-ours.json"  # our validation document and its ids, for the peer's check


def generate(fmt: str, mb: int, seed: int = 0) -> Path:
    """A corpus of about `mb` MB: JSONL files of ~64 MB, or one .txt file per ~0.5 MB book."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from pipeline.core.plays import list_plays, read_play

    root = BENCH / f"{fmt}-{mb}MB"
    if (root / "DONE").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    text = b"\n\n".join(read_play(p) for p in list_plays()).decode()
    rng = np.random.default_rng(seed)
    target, written, index, out, parts = mb * 10**6, 0, 0, None, 0
    while written < target:
        if fmt == "jsonl":
            if out is None or out.tell() > 64 * 10**6:
                if out is not None:
                    out.close()
                out, parts = open(root / f"part-{parts:04d}.jsonl", "w", encoding="utf-8"), parts + 1
            pieces, size = [], 0
            while size < int(rng.integers(2000, 40000)):
                a = int(rng.integers(0, len(text) - 4000))
                pieces.append(text[a : a + 4000])
                size += 4000
            line = json.dumps({"id": f"doc{index}", "text": "".join(pieces)}) + "\n"
            out.write(line)
            written += len(line)
        else:
            pieces, size = [], 0
            while size < int(rng.integers(200_000, 800_000)):
                a = int(rng.integers(0, len(text) - 50_000))
                pieces.append(text[a : a + 50_000])
                size += 50_000
            (root / f"{index:06d}.txt").write_text("".join(pieces), encoding="utf-8")
            written += size
        index += 1
    if out is not None:
        out.close()
    (root / "DONE").write_text(f"{written} bytes, {index} documents\n")
    return root


def _corpus_texts(corpus_dir: Path, fmt: str, limit: int):
    """The corpus's documents in order, until `limit` bytes of text have been given."""
    given = 0
    for path in sorted(corpus_dir.glob(f"*.{fmt}")):
        with open(path, encoding="utf-8") as f:
            for text in (json.loads(line)["text"] for line in f) if fmt == "jsonl" else [f.read()]:
                if given >= limit:
                    return
                given += len(text.encode("utf-8"))
                yield text


def bpe_tokenizer(corpus_dir: Path, fmt: str) -> dict:
    """Train the benchmark's BPE once (BPE_DIR; reused after) and say how long that took."""
    info_file = BPE_DIR / "TRAINED.json"
    if info_file.exists():
        return json.loads(info_file.read_text()) | {"reused": True}
    sys.path.insert(0, str(REPO))
    from pipeline.core.tokenizer import train_bpe

    shutil.rmtree(BPE_DIR, ignore_errors=True)
    t0 = time.perf_counter()
    tok = train_bpe(_corpus_texts(corpus_dir, fmt, BPE_TRAIN_BYTES), BPE_VOCAB)
    seconds = time.perf_counter() - t0
    tok.save_pretrained(str(BPE_DIR))
    info = {"bench": "prepare_corpus", "side": "BPE training (in neither side)", "vocab_size": len(tok),
            "trained_on": f"first {BPE_TRAIN_BYTES // 10**6} MB of {corpus_dir.name}", "seconds": round(seconds, 1),
            "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 1)}
    info_file.write_text(json.dumps(info) + "\n")
    return info | {"reused": False}


def _byte_tokenizer():
    """A byte-level fast tokenizer with ByT5's ids (byte b -> b + 3), built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-in for each byte, which the ByteLevel pre-tokenizer emits
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], n = chr(256 + n), n + 1
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {chars[b]: b + 3 for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def run_ours(corpus_dir: str, fmt: str, out: str, workers: int, tokenizer: str) -> dict:
    sys.path.insert(0, str(REPO))
    import numpy as np

    from pipeline.core.params import DataConfig
    from pipeline.core.tokens import prepare_tokenizer
    from pipeline.prepare import corpus
    from pipeline.prepare.corpus import write_splits

    if workers > 1:
        corpus.IN_PROCESS_BYTES = 0  # the worker pool a large corpus gets, at any size

    tok = {} if tokenizer == "bytes" else {"tokenizer": {"path": tokenizer}}
    cfg = DataConfig(corpus={"format": fmt, "path": corpus_dir}, validation_docs=1, heldout_docs=1, **tok)
    t0 = time.perf_counter()
    info = write_splits(cfg, Path(out), workers=workers)
    if tokenizer == "bytes":
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "documents": sum(info["documents"].values())}
    tokens = prepare_tokenizer(cfg, Path(out), workers)  # as prepare does after write_splits
    seconds = time.perf_counter() - t0
    text = (Path(out) / "text" / "validation.bin").read_text(encoding="utf-8")
    ids = np.fromfile(Path(out) / "tokens" / "validation.bin", dtype=tokens["dtype"])
    SAMPLE.write_text(json.dumps({"text": text, "ids": ids.tolist()}))
    return {"seconds": seconds, "text_seconds": info["seconds"], "documents": sum(info["documents"].values()),
            "tokens": sum(tokens["tokens"].values())}


def run_peer(corpus_dir: str, fmt: str, out: str, workers: int, tokenizer: str) -> dict:
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=out, HF_HOME=out)
    import datasets

    datasets.disable_progress_bars()
    if tokenizer == "bytes":
        tok = _byte_tokenizer()
    else:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(tokenizer, local_files_only=True)
    files = sorted(str(p) for p in Path(corpus_dir).glob(f"*.{fmt}"))
    t0 = time.perf_counter()
    if fmt == "jsonl":
        ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=out)
    else:
        ds = datasets.load_dataset("text", data_files=files, split="train", cache_dir=out, sample_by="document")
    ids = ds.map(lambda batch: tok(batch["text"], return_attention_mask=False), batched=True,
                 num_proc=workers if workers > 1 else None, remove_columns=ds.column_names)
    seconds = time.perf_counter() - t0
    if tokenizer != "bytes":
        return {"seconds": seconds, "documents": len(ids), **_bpe_check(ds, ids)}
    first = ds[0]["text"].encode()
    same = ids[0]["input_ids"] == [b + 3 for b in first]  # the peer's ids are ours
    return {"seconds": seconds, "documents": len(ids), "same_ids_as_ours": same}


def _bpe_check(ds, ids) -> dict:
    """The peer's tokens, and whether its ids for our validation document are the ones we wrote."""
    import pyarrow.compute as pc

    sample = json.loads(SAMPLE.read_text())
    row = pc.index(ds.data.table.column("text"), sample["text"]).as_py()  # -1: not in the corpus
    same = row >= 0 and ids[row]["input_ids"] == sample["ids"]
    tokens = pc.sum(pc.list_value_length(ids.data.table.column("input_ids"))).as_py()
    return {"tokens": tokens, "same_ids_as_ours": same, "checked_tokens": len(sample["ids"])}


def measure(which: str, corpus_dir: Path, fmt: str, workers: int, tokenizer: str = "bytes") -> dict:
    """Run one side in a fresh process. Memory: the largest sum of PSS over it and its workers
    (shared pages counted once), sampled every 0.1 s, and the largest single RSS; CPU: user + system
    seconds of the process and its workers (less sensitive than wall time to a loaded machine)."""
    import resource

    import psutil

    out = BENCH / f"out-{which}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result_file = out.parent / f"result-{which}.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, __file__, "_child", which, str(corpus_dir), fmt, str(out), str(workers),
                             str(result_file), tokenizer], env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    peak, ps, workers_seen = 0, psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total, children = 0, ps.children(recursive=True)
        workers_seen = max(workers_seen, len(children))
        for p in [ps, *children]:
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                pass
        peak = max(peak, total)
        time.sleep(0.1)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed (exit {proc.returncode})")
    r = json.loads(result_file.read_text())
    size = sum(p.stat().st_size for p in corpus_dir.iterdir() if p.name != "DONE")
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    named = "bytes" if tokenizer == "bytes" else f"bpe-{BPE_VOCAB}"
    extra = {k: round(r[k], 2) if k == "text_seconds" else r[k]
             for k in ("text_seconds", "tokens", "same_ids_as_ours", "checked_tokens") if k in r}
    return {"bench": "prepare_corpus", "side": which, "tokenizer": named, "format": fmt,
            "corpus_mb": round(size / 1e6, 1),
            "workers": workers, "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 1),
            "seconds": round(r["seconds"], 2), "mb_per_s": round(size / 1e6 / r["seconds"], 1),
            "cpu_s_whole_process": round(cpu, 1), "peak_pss_mb": round(peak / 2**20, 1),
            "max_single_rss_mb": round(after.ru_maxrss / 1024, 1), "documents": r["documents"],
            "written_mb": round(written / 1e6, 1), "child_processes_seen": workers_seen, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1000, help="corpus size in MB (default 1000)")
    parser.add_argument("--format", choices=["jsonl", "txt"], default="jsonl")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-peer", action="store_true", help="ours only")
    parser.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bytes",
                        help=f"bytes (default) or one BPE of {BPE_VOCAB} ids on both sides")
    args = parser.parse_args()
    corpus_dir = generate(args.format, args.mb)
    tokenizer = "bytes"
    if args.tokenizer == "bpe":
        print(json.dumps(bpe_tokenizer(corpus_dir, args.format)), flush=True)
        tokenizer = str(BPE_DIR)
        SAMPLE.unlink(missing_ok=True)
    for which in ["ours"] + ([] if args.no_peer else ["peer"]):
        print(json.dumps(measure(which, corpus_dir, args.format, args.workers, tokenizer)), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        which, corpus_dir, fmt, out, workers, result_file, tokenizer = sys.argv[2:9]
        run = run_ours if which == "ours" else run_peer
        Path(result_file).write_text(json.dumps(run(corpus_dir, fmt, out, int(workers), tokenizer)))
    else:
        main()
