"""Typed model configuration. `attention` is a union discriminated on `kind`."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


class _AttentionBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FullAttentionConfig(_AttentionBase):
    """MHA (g = h), MQA (g = 1), GQA (1 < g < h): one module, `n_kv_heads = g`."""

    kind: Literal["mha", "gqa", "mqa"] = "mha"
    n_kv_heads: Optional[int] = Field(None, ge=1, description="g; resolved from kind when omitted")


class MLAConfig(_AttentionBase):
    kind: Literal["mla"] = "mla"
    kv_lora_rank: int = Field(32, ge=1, description="d_c, width of the cached latent")
    rope_dim: int = Field(16, ge=2, description="d_r, width of the shared decoupled RoPE key")
    absorb: bool = Field(True, description="decode with W_uk/W_uv absorbed into q / output")


class TPAConfig(_AttentionBase):
    kind: Literal["tpa"] = "tpa"
    rank_q: Optional[int] = Field(6, ge=1, description="None: TPA-KVonly, a plain query projection")
    rank_k: int = Field(2, ge=1)
    rank_v: int = Field(2, ge=1)


class SWAConfig(_AttentionBase):
    kind: Literal["swa"] = "swa"
    window: int = Field(64, ge=1, description="W: positions [t-W+1, t] are attended")
    n_kv_heads: Optional[int] = Field(None, ge=1)
    sinks: int = Field(0, ge=0, description="n: positions i < n stay attended (attention sinks)")


class LinearConfig(_AttentionBase):
    """Decayed linear attention S_t = lam S_{t-1} + eta k_t^T v_t (bounded-state baseline)."""

    kind: Literal["linear"] = "linear"
    chunk_size: int = Field(64, ge=1)


class FactorRanks(_AttentionBase):
    """A Tensor Cache whose q, k, v come from TPA's contextual factors, and whose window holds
    only the factors (docs/design.md#a-factored-window)."""

    rank_q: Optional[int] = Field(None, ge=1, description="None: a plain query projection, as TPA-KVonly")
    rank_k: int = Field(2, ge=1)
    rank_v: int = Field(2, ge=1)


class TensorCacheConfig(_AttentionBase):
    """L1 sliding window + L2 outer-product memory fed only by evicted pairs.

    Fusion: o = o1 + sigmoid(gate_h) * o2, one gate per head, initialised at `gate_init`.
    """

    kind: Literal["tensor_cache"] = "tensor_cache"
    window: int = Field(64, ge=1)
    chunk_size: int = Field(64, ge=1, description="C of the chunked parallel scan")
    write: Literal["exact", "chunk_mean", "delta"] = Field(
        "exact", description="L2 write: exact outer product, chunk_mean ablation, or delta rule")
    n_kv_heads: Optional[int] = Field(None, ge=1)
    gate_init: float = -2.0
    normalize_k: bool = Field(True, description="L2-normalise the keys written to L2")
    sinks: int = Field(0, ge=0, description="n: positions i < n stay in L1 and never enter L2")
    factors: Optional[FactorRanks] = Field(
        None, description="q, k, v from TPA's factors, the ring holding factors; None: plain projections")

    @model_serializer(mode="wrap")
    def _omit_plain_projections(self, handler):
        """Without factors the dump has no `factors` key: a plain Tensor Cache's config, and so
        its fingerprint, reads as it did before the field existed."""
        out = handler(self)
        if self.factors is None:
            out.pop("factors", None)
        return out


class InfiniConfig(_AttentionBase):
    """Infini-attention: softmax inside segments of N tokens plus a compressive memory of the
    completed segments, mixed per head by sigmoid(beta_h)."""

    kind: Literal["infini"] = "infini"
    segment: int = Field(64, ge=1, description="N: tokens per segment (local attention span)")
    update: Literal["linear", "delta"] = Field(
        "linear", description="memory write: M += s(K)^T V, or the delta rule")
    n_kv_heads: Optional[int] = Field(None, ge=1)


class CachePolicy(_AttentionBase):
    """An inference-time cut of a full-attention cache, no retraining (SPEC "Inference-time cache
    policies"): the first `sinks` pairs and the `window` most recent. `window` (window KV) keeps
    each key at its position in the text; `streaming` (StreamingLLM) stores keys before RoPE and
    rotates each by its index in the cache, the query by its own."""

    policy: Literal["window", "streaming"]
    window: int = Field(ge=1, description="W: the most recent pairs kept (the query's own included)")
    sinks: int = Field(0, ge=0, description="n: the first pairs kept for good (StreamingLLM: 4)")

    @model_validator(mode="after")
    def _check(self) -> "CachePolicy":
        if self.policy == "window" and self.sinks:
            raise ValueError("sinks: the window policy keeps none (use policy: streaming)")
        if self.policy == "streaming" and not self.sinks:
            raise ValueError("sinks: the streaming policy needs at least 1 (the paper keeps 4)")
        return self

    @property
    def name(self) -> str:
        """`window16`, `streaming.sinks4.window12`: the `<point>+<name>` of its frontier point."""
        return f"window{self.window}" if self.policy == "window" else f"streaming.sinks{self.sinks}.window{self.window}"

    def held(self, context_len: int) -> int:
        """Pairs in the cache after `context_len` tokens."""
        return min(context_len, self.sinks + self.window)


AttentionConfig = Annotated[
    Union[FullAttentionConfig, MLAConfig, TPAConfig, SWAConfig, LinearConfig, TensorCacheConfig,
          InfiniConfig],
    Field(discriminator="kind"),
]


class ModelConfig(BaseModel):
    """A decoder-only LM: embedding, pre-norm blocks (RMSNorm, attention, SwiGLU), tied head."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(259, ge=2)
    d_model: int = Field(128, ge=2)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    d_head: Optional[int] = Field(None, ge=2, description="defaults to d_model // n_heads")
    mlp_hidden: Optional[int] = Field(None, ge=1, description="defaults to ~8/3 d_model")
    rope_base: float = Field(10000.0, gt=1.0)
    norm_eps: float = Field(1e-5, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)
    tie_embeddings: bool = True
    attention: AttentionConfig = Field(default_factory=FullAttentionConfig)

    @model_validator(mode="after")
    def _resolve(self) -> "ModelConfig":
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"n_heads: {self.n_heads} does not divide d_model={self.d_model}; "
                    "set d_head explicitly"
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_head % 2:
            raise ValueError(f"d_head: must be even for RoPE, got {self.d_head}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 32 * ((8 * self.d_model // 3 + 31) // 32)
        att = self.attention
        if isinstance(att, FullAttentionConfig):
            wanted = {"mha": self.n_heads, "mqa": 1}.get(att.kind)
            if att.n_kv_heads is None:
                if wanted is None:
                    raise ValueError("attention.n_kv_heads: required for kind 'gqa'")
                att.n_kv_heads = wanted
            elif wanted is not None and att.n_kv_heads != wanted:
                raise ValueError(
                    f"attention.n_kv_heads: kind '{att.kind}' needs {wanted}, got {att.n_kv_heads}"
                )
        if isinstance(att, (SWAConfig, TensorCacheConfig, InfiniConfig)) and att.n_kv_heads is None:
            att.n_kv_heads = self.n_heads
        g = getattr(att, "n_kv_heads", None)
        if g is not None and (g > self.n_heads or self.n_heads % g):
            raise ValueError(f"attention.n_kv_heads: {g} must divide n_heads={self.n_heads}")
        if getattr(att, "factors", None) is not None and g != self.n_heads:
            raise ValueError(f"attention.n_kv_heads: a factored window (attention.factors) has one key "
                             f"per query head: needs {self.n_heads}, got {g}")
        if isinstance(att, MLAConfig) and att.rope_dim % 2:
            raise ValueError(f"attention.rope_dim: must be even for RoPE, got {att.rope_dim}")
        return self
