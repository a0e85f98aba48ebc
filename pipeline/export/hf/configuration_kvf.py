"""KVFConfig: the resolved `models.ModelConfig` (under `kvf`) plus its fields under standard HF names.

`kvf_versions` records the torch and transformers an export was made with; loading it under
another transformers major version warns (its generation and cache interfaces change between
majors, and 5.24 already renamed the cache argument within one).

`kvf_policy`, `kvf_window`, `kvf_sinks`: an inference-time cache policy (`models.CachePolicy`:
`window` or `streaming`) a full-attention export runs under when they are given, e.g. by the
stock harness: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,
kvf_policy=window,kvf_window=256`. Unset (the saved default), the model is as trained.
"""
from __future__ import annotations

import warnings

import transformers
from transformers import PretrainedConfig


def _major(version: str) -> str:
    return version.split(".", 1)[0]


class KVFConfig(PretrainedConfig):
    model_type = "kv_frontier"

    def __init__(self, kvf: dict | None = None, max_position_embeddings: int = 1 << 17,
                 kvf_versions: dict | None = None, kvf_policy: str | None = None, kvf_window: int | None = None,
                 kvf_sinks: int = 0, **kwargs):
        kvf = dict(kvf or {})
        self.kvf_versions = dict(kvf_versions or {})
        made_with = self.kvf_versions.get("transformers")
        if made_with and _major(made_with) != _major(transformers.__version__):
            warnings.warn(f"this kv-frontier export was made with transformers {made_with}; loading it "
                          f"under {transformers.__version__} (another major version) may decode wrongly",
                          stacklevel=2)
        attention = kvf.get("attention", {})
        self.kvf = kvf  # models.ModelConfig.model_dump(): the one source of truth
        self.kvf_policy, self.kvf_window, self.kvf_sinks = kvf_policy, kvf_window, kvf_sinks
        self.attention_kind = attention.get("kind")
        self.vocab_size = kvf.get("vocab_size", 259)
        self.hidden_size = kvf.get("d_model")
        self.num_hidden_layers = kvf.get("n_layers")
        self.num_attention_heads = kvf.get("n_heads")
        self.num_key_value_heads = attention.get("n_kv_heads", kvf.get("n_heads"))
        self.head_dim = kvf.get("d_head")
        self.intermediate_size = kvf.get("mlp_hidden")
        self.rms_norm_eps = kvf.get("norm_eps")
        self.sliding_window = attention.get("window")
        # RoPE has no trained length limit; this only tells harnesses how much context to keep
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("eos_token_id", 1)
        kwargs.setdefault("tie_word_embeddings", kvf.get("tie_embeddings", True))
        super().__init__(**kwargs)
