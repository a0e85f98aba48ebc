"""Exports of tiny random-weight models, made once per test run for the export and evaluate tests."""
import os
from pathlib import Path

import pytest
import torch

from tests.variants import KINDS, config  # noqa: F401 -- KINDS: the kinds exported, one of each

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Tiny random-weight checkpoints of several kinds, each exported; (root, {kind: model})."""
    os.environ.setdefault("HF_HOME", str(REPO / "runs" / "hf_home"))
    from models import build_model
    from pipeline.core import checkpoint
    from pipeline.export.bundle import export_variant

    root = tmp_path_factory.mktemp("exports")
    models = {}
    for name in KINDS:
        cfg = config(name, vocab_size=259, tie_embeddings=name == "gqa")
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        checkpoint.save_final(root / "ckpt" / name, model, {"variant": name, "step": 1, "fingerprint": "t",
                                                            "model_config": cfg.model_dump(mode="json")})
        export_variant(name, root / "ckpt" / name, root / "hf" / name, REPO)
        models[name] = model
    return root, models


@pytest.fixture(scope="session")
def bpe_export(tmp_path_factory):
    """A tiny random-weight MHA whose vocabulary is a byte-level BPE trained on a play, exported
    with that tokenizer (what `data.tokenizer: {train: ...}` gives); (export dir, model, tokenizer)."""
    os.environ.setdefault("HF_HOME", str(REPO / "runs" / "hf_home"))
    from models import build_model
    from pipeline.core import checkpoint, plays, tokenizer
    from pipeline.export.bundle import export_variant

    root = tmp_path_factory.mktemp("bpe")
    tok = tokenizer.train_bpe([plays.split_bytes(["hamlet"]).decode()], vocab_size=512)
    tok.save_pretrained(str(root / "tokenizer"))
    cfg = config("mha", vocab_size=len(tok))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    checkpoint.save_final(root / "ckpt", model, {"variant": "mha", "step": 1, "fingerprint": "t",
                                                 "model_config": cfg.model_dump(mode="json")})
    export_variant("mha", root / "ckpt", root / "hf", REPO, tokenizer_dir=root / "tokenizer")
    return root / "hf", model, tok
