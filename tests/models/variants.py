"""Small configs of every variant, shared by the model tests.

Weights use a larger init (0.1) and an open Tensor Cache gate so attention is far from uniform
and L2 contributes visibly: a positional or eviction bug cannot hide under the tolerance.
"""
from models import ModelConfig

ATTENTION = {
    "mha": {"kind": "mha"},
    "gqa": {"kind": "gqa", "n_kv_heads": 2},
    "mqa": {"kind": "mqa"},
    "mla": {"kind": "mla", "kv_lora_rank": 12, "rope_dim": 4},
    "tpa": {"kind": "tpa", "rank_q": 3, "rank_k": 2, "rank_v": 2},
    "tpa_kvonly": {"kind": "tpa", "rank_q": None, "rank_k": 2, "rank_v": 1},
    "swa": {"kind": "swa", "window": 5},
    "swa_w1": {"kind": "swa", "window": 1},
    "linear": {"kind": "linear", "chunk_size": 4},
    "tensor_cache": {"kind": "tensor_cache", "window": 5, "chunk_size": 4, "gate_init": 2.0},
    "tensor_cache_w1": {"kind": "tensor_cache", "window": 1, "chunk_size": 3, "gate_init": 2.0},
    "tensor_cache_gqa": {"kind": "tensor_cache", "window": 3, "chunk_size": 16, "n_kv_heads": 2,
                         "gate_init": 2.0},
}


def config(name: str, **overrides) -> ModelConfig:
    fields = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, init_std=0.1,
                  attention=ATTENTION[name])
    fields.update(overrides)
    return ModelConfig(**fields)
