"""The one tokenizer used everywhere: bytes in the ByT5 layout (pad 0, eos 1, unk 2, byte b -> b + 3)."""
from __future__ import annotations

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET  # 259


def encode(text: str | bytes, add_eos: bool = False) -> np.ndarray:
    """Text (UTF-8) or raw bytes -> int64 token ids."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
    if add_eos:
        ids = np.append(ids, EOS_ID)
    return ids


def decode(ids) -> str:
    """Token ids -> text; special ids are dropped, decoding stops at the first eos."""
    out = bytearray()
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
        if i == EOS_ID:
            break
        if i >= BYTE_OFFSET:
            out.append(i - BYTE_OFFSET)
    return out.decode("utf-8", errors="replace")


def bytes_to_ids(data: np.ndarray) -> np.ndarray:
    """A uint8 byte array (e.g. a memory-mapped corpus) -> int64 token ids."""
    return data.astype(np.int64) + BYTE_OFFSET


class ByteTokenizer:
    """The corpus side of the tokenizer (prepare, `pipeline.corpus`): a document's text -> what a
    split file stores. Bytes are stored as themselves (uint8; the model's ids are the stored values
    plus BYTE_OFFSET, `bytes_to_ids`), so the split files stay readable text. Another tokenizer
    plugs in by offering the same three members, with its ids as the stored values."""

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
