"""The one table of small variant configs every test uses (models, kernels' callers, exports).

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
    "tensor_cache_delta": {"kind": "tensor_cache", "window": 5, "chunk_size": 4, "gate_init": 2.0,
                           "write": "delta"},
    "swa_sinks": {"kind": "swa", "window": 3, "sinks": 4},
    "tensor_cache_sinks": {"kind": "tensor_cache", "window": 3, "chunk_size": 4, "gate_init": 2.0,
                           "sinks": 4},
    "tensor_cache_factored": {"kind": "tensor_cache", "window": 5, "chunk_size": 4, "gate_init": 2.0,
                              "factors": {"rank_q": None, "rank_k": 2, "rank_v": 1}},
    "tensor_cache_factored_q": {"kind": "tensor_cache", "window": 3, "chunk_size": 4, "gate_init": 2.0,
                                "write": "delta", "factors": {"rank_q": 3, "rank_k": 1, "rank_v": 2}},
    "infini": {"kind": "infini", "segment": 5},
    "infini_delta": {"kind": "infini", "segment": 5, "update": "delta"},
}


# Every kind of cache, for the tests that need one model of each (the HF export): growing
# (mha, gqa, mqa), latent (mla), factors (tpa, tpa_kvonly), bounded (swa, linear, tensor_cache
# with the exact and the delta write, swa and tensor_cache with sinks, tensor_cache with a factored
# window, infini with its linear and delta updates) and the chunk_mean ablation, whose training
# forward differs from its decode by design.
KINDS = {name: ATTENTION[name] for name in ("mha", "gqa", "mqa", "mla", "tpa", "tpa_kvonly", "swa",
                                            "linear", "tensor_cache", "tensor_cache_delta",
                                            "swa_sinks", "tensor_cache_sinks", "tensor_cache_factored",
                                            "infini", "infini_delta")}
KINDS["tensor_cache_chunk_mean"] = dict(ATTENTION["tensor_cache"], write="chunk_mean")


def config(name: str, **overrides) -> ModelConfig:
    fields = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, init_std=0.1,
                  attention={**ATTENTION, **KINDS}[name])
    fields.update(overrides)
    return ModelConfig(**fields)
