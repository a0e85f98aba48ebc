"""KVFForCausalLM: a `models` LanguageModel behind the Hugging Face interfaces.

`generate()` decodes with the variant's own cache (`KVFCache` wraps `models.ModelCache`): a
Tensor Cache keeps its window ring and L2 matrix (with a factored window, a ring of factors),
TPA its factors, MLA its latents -- never a DynamicCache of full keys and values.

transformers 5.24 renamed the cache argument and output field from `past_key_values` to
`cache` (and `generate()` passes it under the new name); `forward` takes either name and
returns the cache under whichever field this transformers' output class has, so the same
export decodes correctly on both sides of the rename.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_kvf import KVFConfig
from .kvf_bundle import load

# The output field that carries the cache: `cache` from transformers 5.24 on, else `past_key_values`.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _namespace(value):
    """The resolved config dict -> attribute access, as the modules read it (no pydantic needed)."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


class KVFCache(Cache):
    """A `models.ModelCache` seen by `generate()` as a transformers Cache."""

    def __init__(self, model_cache):
        super().__init__(layers=[])
        self.model_cache = model_cache

    def __len__(self) -> int:
        return len(self.model_cache.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.model_cache.seq_len

    @property
    def is_compileable(self) -> bool:
        return False

    def nbytes(self) -> int:
        return self.model_cache.nbytes()

    def _map(self, fn) -> None:
        for layer in self.model_cache.layers:
            layer.map_(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a ring buffer / recurrent state cannot be rewound (no assisted decoding)")


class KVFForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = KVFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: KVFConfig):
        super().__init__(config)
        self.model = load("lm").LanguageModel(_namespace(config.kvf))
        self.post_init()

    def _init_weights(self, module):
        pass  # LanguageModel initialises itself; exports always load trained weights

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() makes its own KVFCache on the first step

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def cache_policy(self):
        """The inference-time cache policy the config names (`kvf_policy`...), or None: what
        `models.PolicyCache` reads of a `models.CachePolicy`, without pydantic."""
        c = self.config
        if not c.kvf_policy:
            return None
        if c.kvf_policy not in ("window", "streaming") or not c.kvf_window or int(c.kvf_window) < 1:
            raise ValueError(f"kvf_policy={c.kvf_policy!r}, kvf_window={c.kvf_window!r}: a policy is window or "
                             "streaming, with a window of at least 1")
        window, sinks = int(c.kvf_window), int(c.kvf_sinks or 0)
        name = f"window{window}" if c.kvf_policy == "window" else f"streaming.sinks{sinks}.window{window}"
        return SimpleNamespace(policy=c.kvf_policy, window=window, sinks=sinks, name=name)

    def init_cache(self, batch_size: int = 1) -> KVFCache:
        return KVFCache(self.model.init_cache(batch_size, policy=self.cache_policy()))

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                return_dict: bool | None = None, **kwargs):
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("got two different caches (`cache` and `past_key_values`): pass one")
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[1] > 1 \
                and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            # right padding is harmless for a causal model; left padding would shift every state
            raise ValueError("left-padded batches are not supported: decode with batch size 1")
        if cache is not None and not isinstance(cache, KVFCache):
            if cache.get_seq_length() > 0:
                raise ValueError("the cache must be the KVFCache this model returned")
            cache = None  # generate()'s empty default cache: ours replaces it
        policy = self.cache_policy()
        if cache is None and (use_cache or policy is not None):  # a policy is applied through its cache
            cache = self.init_cache(input_ids.shape[0])
        logits = self.model(input_ids, cache=cache.model_cache if cache is not None else None)
        if not use_cache and policy is not None:
            cache = None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
