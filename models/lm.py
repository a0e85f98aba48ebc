"""The decoder-only language model: embedding, pre-norm blocks, final norm, tied head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import build_attention
from .cache import ModelCache
from .config import ModelConfig

FULL_KINDS = ("mha", "gqa", "mqa")  # the kinds an inference-time cache policy applies to


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x, pos: int, cache=None):
        x = x + self.attn(self.attn_norm(x), pos, cache)
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self):
        std = self.config.init_std
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
        # residual outputs scaled down with depth (GPT-2)
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.mlp.down):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab). With a cache, the tokens are appended after what it holds."""
        return self.lm_head(self.hidden(input_ids, cache))

    def hidden(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """The final normed hidden states (B, T, d_model): what the head reads (a training loss
        over a large vocabulary applies the head a chunk of positions at a time)."""
        pos = cache.seq_len if cache is not None else 0
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return self.norm(x)

    def init_cache(self, batch_size: int = 1, device=None, dtype=None, policy=None) -> ModelCache:
        """An empty cache; `policy` (a `CachePolicy`) cuts a full-attention cache at inference time."""
        p = self.embed.weight
        device, dtype = device or p.device, dtype or p.dtype
        if policy is not None:
            if self.config.attention.kind not in FULL_KINDS:
                raise ValueError(f"cache policy {policy.name}: applies to full attention "
                                 f"({', '.join(FULL_KINDS)}), not {self.config.attention.kind}")
            return ModelCache([b.attn.init_cache(batch_size, device, dtype, policy) for b in self.blocks])
        return ModelCache([b.attn.init_cache(batch_size, device, dtype) for b in self.blocks])

    def cache_nbytes(self, context_len: int, batch_size: int = 1, policy=None) -> int:
        """Analytic cache size (docs/design.md, each variant's "Cache size") after `context_len`
        tokens; under a cache policy, that of the pairs it keeps."""
        elem = self.embed.weight.element_size()
        held = policy.held(context_len) if policy is not None else context_len
        return batch_size * elem * sum(b.attn.cache_elements(held) for b in self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None):
        """Greedy decoding with the variant's own cache; returns prompt + new tokens."""
        cache = self.init_cache(input_ids.shape[0])
        logits = self(input_ids, cache=cache)
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            if eos_token_id is not None:
                done |= nxt[:, 0] == eos_token_id
                if done.all():
                    break
            logits = self(nxt, cache=cache)
        return torch.cat(out, dim=1)


def build_model(config: ModelConfig) -> LanguageModel:
    return LanguageModel(config)
