"""The tokenizers: bytes (the default), a local Hugging Face tokenizer, or a byte-level BPE trained
on the training split (`data.tokenizer`).

Bytes use the ByT5 layout (pad 0, eos 1, unk 2, byte b -> b + 3) and need no files: a split file
of UTF-8 text is its own token stream. The other two are a fast `tokenizers` tokenizer saved
with the prepared data (`data/tokenizer/`, loaded with `AutoTokenizer`, offline) and bundled with
every export; their ids are written to `data/tokens/` by `pipeline.core.tokens`. A trained BPE keeps
the bytes' special ids (`<pad>` 0, `</s>` 1, `<unk>` 2) and holds every single byte, so any text
round-trips.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET  # 259: the bytes' vocabulary, and the smallest any tokenizer may have
SPECIALS = ("<pad>", "</s>", "<unk>")  # a trained BPE's ids 0, 1, 2


def encode(text: str | bytes, add_eos: bool = False) -> np.ndarray:
    """Text (UTF-8) or raw bytes -> int64 byte token ids."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
    if add_eos:
        ids = np.append(ids, EOS_ID)
    return ids


def decode(ids) -> str:
    """Byte token ids -> text; special ids are dropped, decoding stops at the first eos."""
    out = bytearray()
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
        if i == EOS_ID:
            break
        if i >= BYTE_OFFSET:
            out.append(i - BYTE_OFFSET)
    return out.decode("utf-8", errors="replace")


def bytes_to_ids(data: np.ndarray) -> np.ndarray:
    """A uint8 byte array (e.g. a memory-mapped split) -> int64 token ids."""
    return data.astype(np.int64) + BYTE_OFFSET


class ByteTokenizer:
    """The corpus side of the text (prepare, `pipeline.prepare.corpus`): a document's text -> what a split
    file stores, its UTF-8 bytes (the model's byte ids are the stored values plus BYTE_OFFSET)."""

    name = "bytes"
    dtype = np.dtype(np.uint8)

    def encode_document(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=self.dtype)

    @property
    def separator(self) -> np.ndarray:
        """Stored between two documents of a split (a blank line)."""
        return self.encode_document("\n\n")


def corpus_tokenizer(name: str = "bytes") -> ByteTokenizer:
    if name != "bytes":
        raise ValueError(f"unknown tokenizer {name!r} (known: bytes)")
    return ByteTokenizer()


# --------------------------------------------------------------------------- the other two
class TokenizerError(ValueError):
    """A tokenizer that cannot be used; the message names `data.tokenizer` and the folder."""


def load_local(path: str | Path):
    """A Hugging Face tokenizer folder on this machine (`AutoTokenizer.from_pretrained`, offline,
    no remote code), checked: a fast tokenizer (prepare needs `tokenizers`' offsets) of at least
    VOCAB_SIZE ids (the synthetic recall tasks use ids 3..258)."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"data.tokenizer.path: {path} holds no tokenizer_config.json or tokenizer.json "
                             "(a folder written by save_pretrained)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 -- transformers raises many kinds for a bad folder
        raise TokenizerError(f"data.tokenizer.path: {path}: AutoTokenizer cannot load it ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return _usable(tok, f"data.tokenizer.path: {path}")


def load_pretrained(source: str):
    """A pretrained checkpoint's own tokenizer (`models.pretrained.load_tokenizer`: its folder's, or
    built from a GGUF file's metadata), checked as a local one is."""
    from models.pretrained import load_tokenizer

    try:
        tok = load_tokenizer(source)
    except (ValueError, OSError) as err:
        raise TokenizerError(f"data.tokenizer.pretrained: {err}") from None
    return _usable(tok, f"data.tokenizer.pretrained: {source}")


def _usable(tok, where: str):
    """`tok`, if prepare can use it: a fast tokenizer (prepare needs `tokenizers`' offsets) of at
    least VOCAB_SIZE ids (the synthetic recall tasks use ids 3..258), no truncation or padding."""
    if not tok.is_fast:
        raise TokenizerError(f"{where} holds a slow ({type(tok).__name__}) tokenizer; save its fast version "
                             "(tokenizer.json)")
    if n_ids(tok) < VOCAB_SIZE:
        raise TokenizerError(f"{where} has {n_ids(tok)} ids, fewer than the {VOCAB_SIZE} the recall tasks use")
    tok.backend_tokenizer.no_truncation()  # a saved max_length would cut every block of text silently
    tok.backend_tokenizer.no_padding()
    return tok


def n_ids(tok) -> int:
    """The ids a model needs for `tok`: one past the largest (ids may have gaps)."""
    return max(len(tok), max(tok.get_vocab().values()) + 1)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (GPT-2's pre-tokenisation, no added prefix space) trained on `texts`,
    wrapped as a transformers fast tokenizer: `<pad>` 0, `</s>` 1, `<unk>` 2, then the 256 bytes,
    then the merges, up to `vocab_size` ids (fewer when the text has fewer merges to make)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   unk_token=SPECIALS[2], model_max_length=1 << 30)


def prepared_dir(data_dir: str | Path) -> Path | None:
    """The folder of the tokenizer prepare saved with the data (`data/tokenizer/`), None for bytes:
    as the manifest says."""
    import json

    info = json.loads((Path(data_dir) / "manifest.json").read_text())["tokenizer"]
    return None if info["name"] == "bytes" else Path(data_dir) / "tokenizer"


def load_prepared(data_dir: str | Path):
    """The tokenizer prepare saved with the data, or None for bytes."""
    folder = prepared_dir(data_dir)
    return None if folder is None else load_local(folder)


def vocab_size(cfg) -> int:
    """How many ids the model's embedding needs for `data.tokenizer` (a DataConfig's field)."""
    if cfg == "bytes":
        return VOCAB_SIZE
    if hasattr(cfg, "train"):
        return cfg.train.vocab_size
    return cfg.n_ids  # counted when the config was validated (`LocalTokenizer`, `PretrainedTokenizer`)


def form_name(cfg) -> str:
    """What the manifest calls `data.tokenizer`'s form: bytes, bpe, local or pretrained."""
    if cfg == "bytes":
        return "bytes"
    return "bpe" if hasattr(cfg, "train") else "pretrained" if hasattr(cfg, "pretrained") else "local"
