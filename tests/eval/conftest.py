import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# One export of every kind of cache: growing (mha, gqa, mqa), latent (mla), factors (tpa),
# bounded (swa, linear, tensor_cache and its chunk_mean ablation). Window and chunk are 8, so
# the generation tests' prompts cross both.
KINDS = {
    "tensor_cache": {"kind": "tensor_cache", "window": 8, "chunk_size": 8},
    "tensor_cache_chunk_mean": {"kind": "tensor_cache", "window": 8, "chunk_size": 8,
                                "write": "chunk_mean"},
    "tpa": {"kind": "tpa", "rank_q": 2, "rank_k": 2, "rank_v": 1},
    "tpa_kvonly": {"kind": "tpa", "rank_q": None, "rank_k": 2, "rank_v": 1},
    "mla": {"kind": "mla", "kv_lora_rank": 8, "rope_dim": 4},
    "gqa": {"kind": "gqa", "n_kv_heads": 1},
    "mha": {"kind": "mha"},
    "mqa": {"kind": "mqa"},
    "swa": {"kind": "swa", "window": 8},
    "linear": {"kind": "linear", "chunk_size": 8},
}


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Tiny random-weight checkpoints of several kinds, each exported; (root, {kind: model})."""
    os.environ.setdefault("HF_HOME", str(REPO / "runs" / "hf_home"))
    from models import ModelConfig, build_model
    from pipeline import checkpoint
    from pipeline.export import export_variant

    root = tmp_path_factory.mktemp("exports")
    models = {}
    for name, attention in KINDS.items():
        cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, tie_embeddings=name == "gqa", init_std=0.1,
                          attention=attention)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        checkpoint.save_final(root / "ckpt" / name, model, {"variant": name, "step": 1, "fingerprint": "t",
                                                            "model_config": cfg.model_dump(mode="json")})
        export_variant(name, root / "ckpt" / name, root / "hf" / name, REPO)
        models[name] = model
    return root, models
