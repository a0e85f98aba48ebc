"""Prepared data as every stage reads it: the synthetic recall tasks (MQAR, retrieval episodes),
the check of `data/` against its manifest, and the training batches.

The prepare stage (`pipeline.prepare`) writes `data/`: the corpus streamed into split files, then
these tasks. Everything here is a pure function of (config, seed) -- or (config, seed, step) for
training batches -- so prepare gives the same bytes for the same seed and a resumed run sees
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.core import tokenizer
from pipeline.core.plays import list_plays
from pipeline.core.tokens import TokenStream

SPLITS = ("train", "validation", "heldout")

# Token-level MQAR alphabets: disjoint runs of ids -- keys, values, then (layout `pair_tokens: 1`)
# one id per (key, value) pair, then the noise fillers -- among the byte ids (`alphabet: bytes`),
# or from `first_id` on: after the tokenizer's ids (`alphabet: own`) or among them (`alphabet: vocab`).
def _alphabets(cfg) -> dict[str, np.ndarray]:
    sizes = {"keys": cfg.num_keys, "values": cfg.num_values,
             "pairs": cfg.num_keys * cfg.num_values if cfg.pair_tokens == 1 else 0,
             "fillers": cfg.num_fillers}
    start = tokenizer.BYTE_OFFSET if cfg.alphabet == "bytes" else cfg.first_id
    ids, out, at = np.arange(start, start + sum(sizes.values())), {}, 0
    for name, size in sizes.items():
        out[name], at = ids[at : at + size], at + size
    return out


# --------------------------------------------------------------------------- text
def split_plays(cfg) -> dict[str, list[str]]:
    """The built-in corpus's splits: validation and held-out plays as listed, train the rest."""
    held = set(cfg.validation_plays) | set(cfg.heldout_plays)
    return {
        "train": [p for p in list_plays() if p not in held],
        "validation": list(cfg.validation_plays),
        "heldout": list(cfg.heldout_plays),
    }


# --------------------------------------------------------------------------- MQAR
def _place_pairs(rng, L: int, P: int, width: int, gaps: tuple[int, int]) -> list[int] | None:
    """Stored-pair positions p_j = q_j - gap_j, each `width` tokens, disjoint, before the queries."""
    q0 = L - 2 * P
    lo, hi = gaps
    free = np.ones(q0, dtype=bool)
    placed = []
    for j in rng.permutation(P):  # random order, so no query is always placed last
        cand = q0 + 2 * j - np.arange(lo, hi + 1)
        cand = cand[(cand >= 0) & (cand + width <= q0)]
        cand = cand[np.all([free[cand + w] for w in range(width)], axis=0)]
        if len(cand) == 0:
            return None
        p = int(cand[rng.integers(len(cand))])
        free[p : p + width] = False
        placed.append((int(j), p))
    return [p for _, p in sorted(placed)]


def _place_stored(rng, free: np.ndarray, count: int, width: int, last: int) -> list[int] | None:
    """Positions of `count` pairs that are stored but not queried: free, at or before `last`."""
    placed = []
    for _ in range(count):
        cand = np.arange(0, last + 1)
        cand = cand[np.all([free[cand + w] for w in range(width)], axis=0)]
        if len(cand) == 0:
            return None
        p = int(cand[rng.integers(len(cand))])
        free[p : p + width] = False
        placed.append(p)
    return placed


def make_mqar(cfg, n: int, gaps: tuple[int, int], seed: int,
              pair_counts: list[int] | None = None) -> dict[str, np.ndarray]:
    """`n` MQAR sequences of `cfg.seq_len` tokens.

    Filler noise with P stored pairs in it (P = `num_pairs`, or with `pair_counts` the counts in
    turn, equal shares: a training pool's mix), then Q = `cfg.queries(P)` queries `k v` filling
    the last `2 Q` positions (keys in a random order). A stored pair is `k v` (two tokens,
    zoology's layout, `pair_tokens: 2`) or one token naming the pair (`pair_tokens: 1`: recall
    without the induction-head circuit, which a tiny model on a CPU budget does not form). The
    pair of query j starts exactly `gap_j` positions before its query key, `gap_j` uniform in
    `gaps`; the P - Q pairs no query asks for lie at least `gaps[0]` before the first query. Keys
    are distinct; values too while P <= num_values, drawn independently past it. The model is
    scored on predicting each query's value (`answer_mask` marks them); `gaps` holds each query's
    gap, -1 past a row's queries.
    """
    alpha = _alphabets(cfg)
    L, width = cfg.seq_len, cfg.pair_tokens
    counts = [cfg.num_pairs] if pair_counts is None else list(pair_counts)
    rng = np.random.default_rng([seed, n, L, *counts, width])
    tokens = alpha["fillers"][rng.integers(0, cfg.num_fillers, size=(n, L))]
    answer = np.zeros((n, L), dtype=bool)
    all_gaps = np.full((n, max(cfg.queries(p) for p in counts)), -1, dtype=np.int16)
    for row in range(n):
        P = counts[row % len(counts)]
        Q = cfg.queries(P)
        q0 = L - 2 * Q  # first query position
        for _attempt in range(100):  # random placement can fragment a tight gap range: redraw
            placed = _place_pairs(rng, L, Q, width, gaps)
            if placed is not None and P > Q:
                free = np.ones(q0, dtype=bool)
                for p in placed:
                    free[p : p + width] = False
                stored = _place_stored(rng, free, P - Q, width, q0 - gaps[0])
                placed = None if stored is None else placed + stored
            if placed is not None:
                break
        else:
            raise ValueError(f"cannot place {P} pairs ({Q} queried) with gaps {gaps} in {L} tokens")
        k = rng.choice(cfg.num_keys, size=P, replace=False)
        v = rng.choice(cfg.num_values, size=P, replace=False) if P <= cfg.num_values else \
            rng.integers(0, cfg.num_values, size=P)
        for j, p in enumerate(placed):
            key, value = alpha["keys"][k[j]], alpha["values"][v[j]]
            if width == 2:
                tokens[row, p], tokens[row, p + 1] = key, value
            else:
                tokens[row, p] = alpha["pairs"][k[j] * cfg.num_values + v[j]]
            if j < Q:  # the first Q pairs are the queried ones
                qpos = q0 + 2 * j
                tokens[row, qpos], tokens[row, qpos + 1] = key, value
                answer[row, qpos + 1] = True
                all_gaps[row, j] = qpos - p
    dtype = np.int16 if tokens.max() < 2**15 else np.int32  # ids past int16 (a large tokenizer's): wider
    return {"tokens": tokens.astype(dtype), "answer_mask": answer, "gaps": all_gaps}


# --------------------------------------------------------------------------- text retrieval
_CITIES = ["Verona", "Padua", "Mantua", "Milan", "Venice", "Athens", "Rome", "Tyre", "Elsinore",
           "Messina", "Vienna", "Ephesus", "Illyria", "Navarre", "Sicilia", "Bohemia"]


def _digits(rng, k: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, size=k))


WORD_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no look-alikes (i, l, o, 0, 1)


def _hexword(rng, k: int) -> str:
    return "".join(WORD_ALPHABET[i] for i in rng.integers(0, len(WORD_ALPHABET), size=k))


def _episode(task: str, rng, n_distractors: int) -> tuple[str, list[str], str, str]:
    """(needle, distractor sentences, question, answer) for one episode."""
    if task == "passkey":
        key = _digits(rng, 5)
        return (f" The pass key is {key}. Remember it. {key} is the pass key. ", [],
                "\nWhat is the pass key? The pass key is ", key)
    if task == "kv_retrieval":
        names = [_hexword(rng, 6) for _ in range(n_distractors + 1)]
        vals = [_hexword(rng, 6) for _ in range(n_distractors + 1)]
        return (f" KEY {names[0]} = VAL {vals[0]}. ",
                [f" KEY {a} = VAL {b}. " for a, b in zip(names[1:], vals[1:])],
                f"\nWhat is the VAL of KEY {names[0]}? VAL ", vals[0])
    if task == "multi_needle":
        cities = rng.choice(_CITIES, size=n_distractors + 1, replace=False)
        nums = [_digits(rng, 4) for _ in cities]
        return (f" The special magic number for {cities[0]} is {nums[0]}. ",
                [f" The special magic number for {c} is {n}. " for c, n in zip(cities[1:], nums[1:])],
                f"\nWhat is the special magic number for {cities[0]}? It is ", nums[0])
    raise ValueError(f"unknown retrieval task {task!r}")


def make_retrieval(cfg, haystack, seed: int) -> list[dict]:
    """Text episodes: haystack from the held-out documents (bytes or a uint8 memmap of UTF-8 text),
    the evidence ending `distance * context_len` characters before the question (the question ends
    the prompt; bytes for ASCII text), distractors placed at random."""
    rng = np.random.default_rng([seed, 7])
    episodes = []
    for task in cfg.tasks:
        for length in cfg.context_lengths:
            for frac in cfg.distances:
                for rep in range(cfg.episodes_per_cell):
                    needle, distractors, question, answer = _episode(task, rng, cfg.num_distractors)
                    body_len = length - len(question)
                    filler_len = body_len - len(needle) - sum(len(d) for d in distractors)
                    if filler_len <= 0:
                        raise ValueError(f"context length {length} too short for task {task}")
                    start = int(rng.integers(0, len(haystack) - filler_len))
                    # the split is UTF-8; a character cut at either end of the slice is dropped
                    body = bytes(haystack[start : start + filler_len]).decode("utf-8", errors="ignore")
                    spans = []  # distractors first, at random places
                    for d in distractors:
                        at = int(rng.integers(0, len(body) + 1))
                        at = next((a for a, b in spans if a < at < b), at)  # not inside another
                        spans = [(a + len(d), b + len(d)) if a >= at else (a, b) for a, b in spans]
                        spans.append((at, at + len(d)))
                        body = body[:at] + d + body[at:]
                    # then the needle, ending `frac * body_len` bytes before the question
                    cut = max(0, len(body) - int(round(frac * body_len)))
                    cut = next((a for a, b in spans if a < cut < b), cut)
                    body = body[:cut] + needle + body[cut:]
                    evidence_end = cut + len(needle)
                    episodes.append({
                        "id": f"{task}-{length}-{frac}-{rep}",
                        "task": task,
                        "context_len": length,
                        "distance": len(body) - evidence_end + len(question),
                        "distance_frac": frac,
                        "prompt": body + question,
                        "answer": answer,
                    })
    return episodes


# --------------------------------------------------------------------------- prepare
class DataCorrupt(RuntimeError):
    """A prepared file whose bytes are not the ones `prepare` wrote (the message names it)."""


class DataMismatch(DataCorrupt):
    """Prepared data that does not fit the params (another tokenizer, too little text)."""


def check_fits(manifest: dict, cfg, vocab: int, seq_len: int) -> None:
    """Raise DataMismatch, naming the field, when `data/` (its verified manifest) cannot serve a
    study: prepared with another tokenizer than `cfg.tokenizer` (a DataConfig's), with ids beyond
    the model's `vocab` (the tokenizer's or the MQAR sets' own), or with a train or validation
    split shorter than `seq_len + 1` tokens."""
    tok, form = manifest["tokenizer"], cfg.tokenizer
    want = tokenizer.form_name(form)
    again = "; run prepare again (make repro, or dvc repro -f -s prepare)"
    if tok["name"] != want:
        raise DataMismatch(f"data.tokenizer: data/ was prepared with the {tok['name']} tokenizer, params ask for "
                           f"{want}{again}")
    if tok["vocab_size"] > vocab:
        raise DataMismatch(f"model.vocab_size: {vocab}, but data/ holds ids of a {tok['vocab_size']}-id tokenizer "
                           f"(data.tokenizer changed since prepare?){again}")
    mqar_end = (manifest.get("mqar_ids") or [0, 0])[1]  # MQAR ids of their own (`alphabet: own`)
    if mqar_end > vocab:
        raise DataMismatch(f"model.vocab_size: {vocab}, but data/'s MQAR sets use ids up to {mqar_end - 1} "
                           f"(data.mqar.alphabet own){again}")
    counts = tok.get("tokens") or manifest["bytes"]  # bytes: a token per byte
    for split, field in (("train", "the corpus"), ("validation", "data.validation_docs / validation_plays")):
        if counts[split] < seq_len + 1:
            raise DataMismatch(f"train.seq_len: {seq_len} tokens, but the {split} split holds {counts[split]:,}; "
                               f"give it more text ({field}) or shorten train.seq_len")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:  # streamed: a split file may be larger than memory
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_prepared(data_dir: Path) -> dict:
    """The manifest, after checking every prepared file against the sha256 it records."""
    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").exists():
        raise DataCorrupt(f"{data_dir / 'manifest.json'}: missing; run the prepare stage (make repro)")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for rel, sha in manifest["files"].items():
        path = data_dir / rel
        if not path.exists() or _sha256(path) != sha:
            raise DataCorrupt(f"{path}: missing or not the bytes prepare wrote (see {data_dir / 'manifest.json'}); "
                              f"prepare it again: make repro (or dvc repro -f -s prepare)")
    return manifest


def heldout_text(data_dir: str | Path) -> np.ndarray:
    """The prepared held-out split as UTF-8 bytes (a memmap): the evaluation text and the haystack
    of every retrieval task, whatever the corpus."""
    return np.memmap(Path(data_dir) / "text" / "heldout.bin", dtype=np.uint8, mode="r")


# --------------------------------------------------------------------------- training batches
class TrainingData:
    """The prepared files, memory-mapped, and the batch functions of (seed, step)."""

    def __init__(self, data_dir: str | Path):
        d = Path(data_dir)
        self.train_text, self.val_text = TokenStream(d, "train"), TokenStream(d, "validation")
        self.mqar = {}
        for path in sorted((d / "mqar").glob("*.tokens.npy")):
            name = path.name[: -len(".tokens.npy")]
            self.mqar[name] = (np.load(path), np.load(d / "mqar" / f"{name}.answer_mask.npy"))

    def lm_batch(self, seed: int, step: int, batch_size: int, seq_len: int):
        """(inputs, targets) int64 arrays (B, T) of training text at offsets drawn from (seed, step)."""
        rng = np.random.default_rng([seed, step, 0])
        starts = rng.integers(0, len(self.train_text) - seq_len - 1, size=batch_size)
        ids = np.stack([self.train_text.ids(s, s + seq_len + 1) for s in starts])
        return ids[:, :-1], ids[:, 1:]

    def mqar_batch(self, name: str, seed: int | None, step: int, batch_size: int):
        """(inputs, targets) with targets = -100 except at query values. seed None: rows in order."""
        tokens, mask = self.mqar[name]
        if seed is None:
            idx = np.arange(step * batch_size, min((step + 1) * batch_size, len(tokens)))
        else:
            idx = np.random.default_rng([seed, step, 1]).integers(0, len(tokens), size=batch_size)
        toks = tokens[idx].astype(np.int64)
        targets = np.where(mask[idx][:, 1:], toks[:, 1:], -100)
        return toks[:, :-1], targets

    def val_windows(self, n: int, seq_len: int):
        """`n` fixed validation windows, evenly spaced over the validation documents: (inputs,
        targets, the bytes of text each target covers)."""
        starts = np.linspace(0, len(self.val_text) - seq_len - 1, n).astype(np.int64)
        ids = np.stack([self.val_text.ids(s, s + seq_len + 1) for s in starts])
        nbytes = np.stack([self.val_text.nbytes(s + 1, s + seq_len + 1) for s in starts])
        return ids[:, :-1], ids[:, 1:], nbytes
