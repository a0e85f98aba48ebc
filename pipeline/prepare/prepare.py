"""The prepare stage: the corpus, the tokenizer and the synthetic tasks written to `data/`, with a
manifest of every file's sha256 (what `pipeline.core.data.verify_prepared` checks)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.core.data import SPLITS, _sha256, heldout_text, make_mqar, make_retrieval
from pipeline.core.tokens import prepare_tokenizer
from pipeline.prepare.corpus import write_splits


def prepare(cfg, out_dir: Path, workers: int | None = None) -> dict:
    """Write every data file under `out_dir`; returns the manifest (also `manifest.json`).

    The corpus is read first, as a whole (`pipeline.prepare.corpus.write_splits`): an unreadable input
    stops here, naming the file, before anything is written. `workers`: processes reading the
    corpus (None: every core this process may use)."""
    out_dir = Path(out_dir)
    need = max(cfg.retrieval.context_lengths) + 1  # a haystack longer than any episode
    corpus = write_splits(cfg, out_dir, workers=workers, min_heldout=need)
    tok = prepare_tokenizer(cfg, out_dir, workers or len(os.sched_getaffinity(0)))
    (out_dir / "mqar").mkdir(parents=True, exist_ok=True)
    (out_dir / "retrieval").mkdir(parents=True, exist_ok=True)
    files = [out_dir / "text" / f"{split}.bin" for split in SPLITS]
    for folder in ("tokenizer", "tokens"):  # another tokenizer than bytes: its files and token ids
        files += sorted(p for p in (out_dir / folder).rglob("*") if p.is_file())
    m = cfg.mqar
    sets = {"train": (m.num_train, m.train_gaps)} | {
        f"eval_{name}": (m.num_eval, gaps) for name, gaps in m.eval_gaps.items()
    } | {f"capacity_p{p}": (m.num_eval, m.eval_gaps[m.farthest_bucket]) for p in m.capacity_pairs}
    counts = {"train": m.train_pairs} | {f"capacity_p{p}": [p] for p in m.capacity_pairs}
    for i, (name, (n, gaps)) in enumerate(sets.items()):
        arrays = make_mqar(m, n, tuple(gaps), cfg.seed + 1000 * i, counts.get(name))
        for key, arr in arrays.items():
            path = out_dir / "mqar" / f"{name}.{key}.npy"
            np.save(path, arr)
            files.append(path)
    episodes = make_retrieval(cfg.retrieval, heldout_text(out_dir), cfg.seed)
    path = out_dir / "retrieval" / "episodes.jsonl"
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in episodes))
    files.append(path)
    manifest = {
        "corpus": {k: corpus[k] for k in ("format", "files", "bytes")}
        | ({"path": str(cfg.corpus.path)} if cfg.corpus.format != "shakespeare" else {}),
        "documents": corpus["documents"],
        "tokenizer": tok,  # what the model reads: text/*.bin as bytes, or tokens/*.bin
        "splits": corpus["names"],  # the validation and held-out documents; train: all the others
        "files": {str(p.relative_to(out_dir)): _sha256(p) for p in files},
        "bytes": {s: (out_dir / "text" / f"{s}.bin").stat().st_size for s in SPLITS},
        "mqar_sets": sorted(sets),
        **({"mqar_ids": [m.first_id, m.end_id]} if m.alphabet == "own" else {}),  # the model's vocabulary covers them
        "retrieval_episodes": len(episodes),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest | {"corpus_seconds": corpus["seconds"]}

