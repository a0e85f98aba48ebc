import numpy as np

from pipeline import tokenizer


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
