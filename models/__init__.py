"""kv-frontier models: attention variants that shrink the KV cache, and the LM around them."""
from .cache import AppendCache, LayerCache, ModelCache, PolicyCache, RingCache, StateCache, TwoLevelCache
from .config import (
    CachePolicy,
    FactorRanks,
    FullAttentionConfig,
    LinearConfig,
    MLAConfig,
    ModelConfig,
    SWAConfig,
    TensorCacheConfig,
    TPAConfig,
)
from .lm import FULL_KINDS, LanguageModel, build_model

__all__ = [
    "ModelConfig", "FullAttentionConfig", "MLAConfig", "TPAConfig", "SWAConfig", "LinearConfig",
    "TensorCacheConfig", "FactorRanks", "LanguageModel", "build_model", "ModelCache", "LayerCache", "AppendCache",
    "RingCache", "StateCache", "TwoLevelCache", "CachePolicy", "PolicyCache", "FULL_KINDS",
]
