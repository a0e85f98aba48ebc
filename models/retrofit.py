"""Retrofit: a child model's weights mapped from a trained full-attention parent
(docs/design.md#retrofit-a-point-initialised-from-a-trained-one).

Everything the two models share is copied; the key and value projections pool the parent's
`g_p` KV heads into the child's `g_c` (GQA's conversion, Ainslie et al. 2023: a child head is
the mean of the parent heads whose query heads it serves; a copy when `g_c = g_p`):

    W_k,c = (g_c / g_p) sum_{m // (g_p/g_c) = c} W_k,m        (W_v likewise)

Parameters only the child has (Tensor Cache's decay, write rate, gate) keep their initial values.
"""
from __future__ import annotations

import torch

PARENT_KINDS = ("mha", "gqa", "mqa")
CHILD_KINDS = ("mha", "gqa", "mqa", "swa", "tensor_cache")
WIDTHS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_head", "mlp_hidden", "tie_embeddings",
          "rope_base", "norm_eps")
CHILD_ONLY = ("attn.memory.decay_logit", "attn.memory.write_rate_raw", "attn.gate")  # Tensor Cache's L2
WHY_NOT = {
    "mla": "its RoPE lives in one key shared by all heads and its latent is RMS-normalised: no weights "
           "reproduce the parent's keys (docs/design.md#retrofit-a-point-initialised-from-a-trained-one)",
    "tpa": "its factors are bilinear in the input: no weights reproduce the parent's linear keys",
    "linear": "it has no softmax window to inherit",
    "infini": "its segment memory has no counterpart in the parent",
}


class RetrofitError(ValueError):
    """No map from this parent to this child; the message starts with the field to blame."""


def check(parent, child) -> None:
    """Raise RetrofitError (`field: why`) unless `parent` maps to `child` (two ModelConfigs)."""
    p, c = parent.attention, child.attention
    if p.kind not in PARENT_KINDS:
        raise RetrofitError(f"init_from: a retrofit starts from full attention ({', '.join(PARENT_KINDS)}), "
                            f"not {p.kind}")
    if c.kind not in CHILD_KINDS:
        raise RetrofitError(f"kind: no map from {p.kind} to {c.kind}: {WHY_NOT.get(c.kind, 'not supported')}")
    if getattr(c, "factors", None) is not None:
        raise RetrofitError("factors: no map to a factored window (its q, k, v are TPA factors)")
    for width in WIDTHS:
        if getattr(parent, width) != getattr(child, width):
            raise RetrofitError(f"{width}: the parent has {getattr(parent, width)}, the child "
                                f"{getattr(child, width)}; a retrofit keeps every width")
    if p.n_kv_heads % c.n_kv_heads:
        raise RetrofitError(f"n_kv_heads: {c.n_kv_heads} does not divide the parent's {p.n_kv_heads} "
                            "(a child head is the mean of whole groups of parent heads)")


def pool_kv_heads(weight: torch.Tensor, g_parent: int, g_child: int) -> torch.Tensor:
    """(g_p d_h, d) -> (g_c d_h, d): each run of g_p / g_c consecutive heads averaged."""
    rows, d = weight.shape
    d_h = rows // g_parent
    return weight.view(g_child, g_parent // g_child, d_h, d).mean(dim=1).reshape(g_child * d_h, d)


def child_state(parent_state: dict[str, torch.Tensor], parent, child) -> dict[str, torch.Tensor]:
    """The child's mapped parameters from the parent's state dict (ModelConfigs `parent`, `child`);
    the child's own parameters (`CHILD_ONLY`) are left out."""
    check(parent, child)
    g_p, g_c = parent.attention.n_kv_heads, child.attention.n_kv_heads
    out = {}
    for name, tensor in parent_state.items():
        if name.endswith(("attn.k_proj.weight", "attn.v_proj.weight")):
            out[name] = pool_kv_heads(tensor, g_p, g_c)
        else:
            out[name] = tensor.clone()
    return out


def initialise(child_model, parent_state: dict[str, torch.Tensor], parent) -> None:
    """Load the mapped weights into a freshly built child (`models.LanguageModel`), whose own
    parameters keep their initial values; anything else left unset is an error."""
    state = child_state(parent_state, parent, child_model.config)
    missing, unexpected = child_model.load_state_dict(state, strict=False)
    unset = [name for name in missing if not name.endswith(CHILD_ONLY)]
    if unset or unexpected:
        raise RetrofitError(f"kind: the map from {parent.attention.kind} to {child_model.config.attention.kind} "
                            f"leaves {unset} unset and has no place for {unexpected}")
