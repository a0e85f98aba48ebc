"""What the model reads of the prepared text: token ids, and how many bytes of text each covers.

`data/text/<split>.bin` always holds the split's UTF-8 text (the retrieval haystacks are cut from
it). With the byte tokenizer that file is also the token stream: id = byte + 3, one byte per
token. With another tokenizer (`data.tokenizer`), prepare saves it to `data/tokenizer/` and
tokenises every split into `data/tokens/<split>.bin` (uint16 ids; uint32 past 65,536 ids), with
`data/tokens/<split>.nbytes` (uint16) beside the validation and held-out ones: the UTF-8 bytes of
text each token covers, taken from the tokenizer's offsets (a token's bytes run from the previous
token's end to its own). They add up to the split's bytes exactly, so bits per byte -- bits summed
over the predicted tokens, divided by the bytes they cover -- compares across tokenizers.

The text is tokenised a block at a time (about 16 KiB, cut after a line end: `_cut`), blocks in batches
of about 1 MiB per core that `tokenizers` spreads over the cores: memory stays bounded whatever
the corpus.
"""
from __future__ import annotations

import codecs
import json
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.core import tokenizer

SPLITS = ("train", "validation", "heldout")
WITH_NBYTES = ("validation", "heldout")  # the splits bits per byte is measured on
BLOCK_BYTES = 1 << 14  # encoding many short strings costs ~20% less CPU than a few long ones (BENCHMARKS.md)
BATCH_BYTES = 1 << 20  # text in flight per core


def blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """A UTF-8 text file a block at a time, each block ending after a line end where there is one."""
    decoder, carry = codecs.getincrementaldecoder("utf-8")(), ""
    with open(path, "rb") as f:
        while True:
            data = f.read(block_bytes)
            text = carry + decoder.decode(data, final=not data)
            if not data:
                if text:
                    yield text
                return
            cut = _cut(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]


_QUIET_CUT = re.compile(r"(?<=\S)\n(?=\S)")  # a line end alone between two words: no pre-token spans it


def _cut(text: str) -> int:
    """Where a block ends: after the last line end that sits alone between two non-spaces (cutting
    there tokenises as the whole text would), else after the last line end, else the last space."""
    last = None
    for last in _QUIET_CUT.finditer(text):
        pass
    if last is not None:
        return last.end()
    return text.rfind("\n") + 1 or text.rfind(" ") + 1 or len(text)


def _byte_ends(text: str, char_ends: np.ndarray) -> np.ndarray:
    """Character offsets into `text` -> byte offsets into its UTF-8 encoding."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)])[char_ends]


def token_bytes(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """The bytes of `text` each token covers: from the previous token's end to its own (the last
    token takes what is left, so the counts add up to the text's bytes)."""
    if not offsets:
        return np.zeros(0, dtype=np.int64)
    ends = np.maximum.accumulate(np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets)))
    ends = _byte_ends(text, ends)
    ends[-1] = len(text.encode("utf-8"))
    return np.diff(ends, prepend=0)


def _batches(items: Iterator[str], n: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def write_tokens(tok, text_dir: Path, out_dir: Path, workers: int) -> dict[str, int]:
    """Tokenise `text_dir/<split>.bin` into `out_dir/<split>.bin` (and `.nbytes`); {split: tokens}."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = ids_dtype(tokenizer.n_ids(tok))
    backend, counts = tok.backend_tokenizer, {}
    for split in SPLITS:
        path = text_dir / f"{split}.bin"
        counts[split] = 0
        with (open(out_dir / f"{split}.bin", "wb") as ids_out,
              open(out_dir / f"{split}.nbytes", "wb") if split in WITH_NBYTES else nullcontext() as bytes_out,
              tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"prepare: tokenising {split}",
                   mininterval=1.0, disable=None) as bar):
            for batch in _batches(blocks(path), workers * BATCH_BYTES // BLOCK_BYTES):
                for text, enc in zip(batch, backend.encode_batch(batch, add_special_tokens=False)):
                    ids_out.write(np.asarray(enc.ids, dtype=dtype).tobytes())
                    counts[split] += len(enc.ids)
                    if split in WITH_NBYTES:
                        n = token_bytes(text, enc.offsets)
                        if n.size and n.max() > np.iinfo(np.uint16).max:
                            raise ValueError(f"data.tokenizer: a token of {path} covers {n.max()} bytes, more "
                                             "than the byte counts' uint16 holds")
                        bytes_out.write(n.astype(np.uint16).tobytes())
                    bar.update(len(text.encode("utf-8")))
    return counts


def ids_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)


def prepare_tokenizer(cfg, out_dir: Path, workers: int) -> dict:
    """Save the study's tokenizer under `out_dir/tokenizer/` (a trained BPE: trained here on the
    training split) and tokenise every split into `out_dir/tokens/`; what the manifest records
    of it. Bytes: nothing to write."""
    for folder in ("tokenizer", "tokens"):  # another tokenizer's files: never listed as this one's
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    if cfg.tokenizer == "bytes":
        return {"name": "bytes", "vocab_size": tokenizer.VOCAB_SIZE}
    text_dir = out_dir / "text"
    if hasattr(cfg.tokenizer, "train"):
        train = cfg.tokenizer.train
        print(f"[prepare] training a byte-level BPE tokenizer ({train.vocab_size} ids) on the training split",
              flush=True)
        tok = tokenizer.train_bpe(blocks(text_dir / "train.bin"), train.vocab_size, train.min_frequency)
        name = "bpe"
    elif hasattr(cfg.tokenizer, "pretrained"):
        print(f"[prepare] the tokenizer of {cfg.tokenizer.pretrained}", flush=True)
        tok, name = tokenizer.load_pretrained(cfg.tokenizer.pretrained), "pretrained"
    else:
        tok, name = tokenizer.load_local(cfg.tokenizer.path), "local"
    tok.save_pretrained(str(out_dir / "tokenizer"))
    counts = write_tokens(tok, text_dir, out_dir / "tokens", workers)
    n = tokenizer.n_ids(tok)
    return {"name": name, "vocab_size": n, "dtype": ids_dtype(n).name, "tokens": counts}


class TokenStream:
    """One prepared split as token ids (`ids(a, b)`, int64) and the bytes each covers (`nbytes`),
    memory-mapped; the manifest says which tokenizer wrote it."""

    def __init__(self, data_dir: str | Path, split: str):
        data_dir = Path(data_dir)
        info = json.loads((data_dir / "manifest.json").read_text())["tokenizer"]
        self.tokenizer = info["name"]
        if self.tokenizer == "bytes":
            self._ids = np.memmap(data_dir / "text" / f"{split}.bin", dtype=np.uint8, mode="r")
            self._nbytes = None
        else:
            self._ids = np.memmap(data_dir / "tokens" / f"{split}.bin", dtype=np.dtype(info["dtype"]), mode="r")
            nbytes = data_dir / "tokens" / f"{split}.nbytes"
            self._nbytes = np.memmap(nbytes, dtype=np.uint16, mode="r") if split in WITH_NBYTES else None

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self, a: int, b: int) -> np.ndarray:
        rows = np.asarray(self._ids[a:b])
        return tokenizer.bytes_to_ids(rows) if self.tokenizer == "bytes" else rows.astype(np.int64)

    def nbytes(self, a: int, b: int) -> np.ndarray:
        if self._nbytes is None:
            if self.tokenizer != "bytes":
                raise ValueError("this split has no byte counts (only validation and held-out do)")
            return np.ones(max(0, min(b, len(self)) - a), dtype=np.int64)
        return np.asarray(self._nbytes[a:b]).astype(np.int64)
