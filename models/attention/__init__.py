"""Attention variants, one file each, looked up by the config's `kind`."""
from .factored_window import FactoredWindowAttention
from .full import FullAttention
from .infini import InfiniAttention
from .linear import DecayedLinearAttention
from .mla import MultiHeadLatentAttention
from .swa import SlidingWindowAttention
from .tensor_cache import TensorCacheAttention
from .tpa import TensorProductAttention

ATTENTION = {
    "mha": FullAttention,
    "gqa": FullAttention,
    "mqa": FullAttention,
    "mla": MultiHeadLatentAttention,
    "tpa": TensorProductAttention,
    "swa": SlidingWindowAttention,
    "linear": DecayedLinearAttention,
    "tensor_cache": TensorCacheAttention,
    "infini": InfiniAttention,
}


def build_attention(cfg):
    if getattr(cfg.attention, "factors", None) is not None:  # a tensor_cache with a factored window
        return FactoredWindowAttention(cfg)
    return ATTENTION[cfg.attention.kind](cfg)
