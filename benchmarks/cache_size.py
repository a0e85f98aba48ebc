"""Cache bytes per variant: measured from the cache object next to the analytic formula.

For each variant and context length T, a real forward fills a real cache and we read
`cache.nbytes()`; the inference-time cache policies (window KV, StreamingLLM) fill the MHA
model's cache made with `init_cache(policy=...)`. Filling a 128k full-attention cache on a CPU
would cost an O(T^2) prefill, so large T run the same model code on torch's "meta" device: every
tensor has its true shape and dtype, nothing is computed. `--check` re-measures the small T on
real tensors to show both agree. The policy rows run on real tensors (their per-token loop is
far slower on meta than on the CPU), measured up to 8k tokens, where they are long full.

    python benchmarks/cache_size.py            # markdown tables for BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from models import CachePolicy, ModelConfig, build_model

CONTEXTS = (1024, 8192, 32768, 131072)

DEFAULT = dict(vocab_size=259, d_model=128, n_layers=2, n_heads=4)
DEFAULT_VARIANTS = {
    "mha": {"kind": "mha"},
    "gqa": {"kind": "gqa", "n_kv_heads": 2},
    "mqa": {"kind": "mqa"},
    "mla": {"kind": "mla", "kv_lora_rank": 32, "rope_dim": 16},
    "tpa": {"kind": "tpa", "rank_q": 6, "rank_k": 2, "rank_v": 2},
    "tpa_kvonly": {"kind": "tpa", "rank_q": None, "rank_k": 2, "rank_v": 2},
    "swa": {"kind": "swa", "window": 64},
    "linear": {"kind": "linear"},
    "tensor_cache": {"kind": "tensor_cache", "window": 64},
    "tensor_cache_delta": {"kind": "tensor_cache", "window": 64, "write": "delta"},
    "swa + 4 sinks": {"kind": "swa", "window": 64, "sinks": 4},
    "tensor_cache + 4 sinks": {"kind": "tensor_cache", "window": 64, "sinks": 4},
    "tensor_cache_factored": {"kind": "tensor_cache", "window": 64,
                              "factors": {"rank_q": None, "rank_k": 2, "rank_v": 2}},
    "infini (N 64)": {"kind": "infini", "segment": 64},
    "infini_delta (N 64)": {"kind": "infini", "segment": 64, "update": "delta"},
}
# A policy cache is filled one token at a time on real tensors (~2.5 ms a token here): measured up
# to 8k, where it has long been full (sinks + window pairs); beyond, the formula alone ("-").
POLICY_MAX_T = 8192
# Inference-time cache policies on the MHA model above (no retraining): `<variant>+<policy>`, as
# the frontier names them; each holds 2 g d_h min(T, sinks + window) elements per layer.
DEFAULT_POLICIES = {f"mha+{p.name}": ("mha", p) for p in (
    CachePolicy(policy="window", window=64),                 # window KV
    CachePolicy(policy="streaming", sinks=4, window=60),     # StreamingLLM: 4 sinks + 60 recent
)}
# T6 paper's small shapes: d_model 768, d_head 64 (12 layers; one layer is shown per token).
PAPER = dict(vocab_size=259, d_model=768, n_layers=12, d_head=64)
PAPER_VARIANTS = {
    "mha (12 heads)": (12, {"kind": "mha"}),
    "gqa (2 kv heads)": (12, {"kind": "gqa", "n_kv_heads": 2}),
    "tpa (34 heads, ranks 6/2/2)": (34, {"kind": "tpa", "rank_q": 6, "rank_k": 2, "rank_v": 2}),
    "mla (d_c 256, d_r 32)": (12, {"kind": "mla", "kv_lora_rank": 256, "rope_dim": 32}),
    "swa (W 512)": (12, {"kind": "swa", "window": 512}),
    "tensor_cache (W 512)": (12, {"kind": "tensor_cache", "window": 512}),
    "tensor_cache factored (W 512, ranks k 1 v 2)": (12, {"kind": "tensor_cache", "window": 512,
                                                          "factors": {"rank_k": 1, "rank_v": 2}}),
}


def measured_nbytes(model, T: int, device: str, piece: int = 4096, policy=None) -> int:
    cache = model.init_cache(1, device=device, policy=policy)
    with torch.no_grad():
        for start in range(0, T, piece):
            model(torch.zeros(1, min(piece, T - start), dtype=torch.long, device=device), cache=cache)
    assert cache.seq_len == T
    return cache.nbytes()


def table(base: dict, variants: dict, check: bool, policies: dict | None = None) -> str:
    """One row per variant (`name: attention` or `name: (heads, attention)`), then one per cache
    policy (`name: (variant, policy)`) on a variant's model."""
    rows = ["| variant | elements / token / layer | " + " | ".join(
        f"T={T // 1024}k measured / analytic (MiB)" for T in CONTEXTS) + " |",
        "|---|---|" + "---|" * len(CONTEXTS)]
    specs = {name: (spec, None) for name, spec in variants.items()}
    specs |= {name: (variants[on], policy) for name, (on, policy) in (policies or {}).items()}
    for name, (spec, policy) in specs.items():
        heads, att = spec if isinstance(spec, tuple) else (base.get("n_heads", 4), spec)
        cfg = ModelConfig(**{**base, "n_heads": heads, "attention": att})
        device = "meta" if policy is None else "cpu"  # a policy evicts by a boolean mask: not on meta
        with torch.device(device):
            model = build_model(cfg).eval()
        per_tok = elements_per_layer(model, policy)
        cells = []
        for T in CONTEXTS:
            if policy is not None and T > POLICY_MAX_T:
                cells.append(f"- / {model.cache_nbytes(T, policy=policy) / 2**20:.2f}")
                continue
            got, want = measured_nbytes(model, T, device, policy=policy), model.cache_nbytes(T, policy=policy)
            if got != want:
                sys.exit(f"{name} T={T}: measured {got} != analytic {want}")
            cells.append(f"{got / 2**20:.2f} / {want / 2**20:.2f}")
        if check and policy is None:
            real = build_model(cfg).eval()
            for T in (1024,):
                assert measured_nbytes(real, T, "cpu", piece=512) == real.cache_nbytes(T), name
        rows.append(f"| {name} | {per_tok} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def elements_per_layer(model, policy=None) -> str:
    """Per-token elements of one layer for growing caches; for bounded ones the elements of one
    layer, 'constant' or the range they cycle through (Infini's current segment)."""
    per_layer = model.embed.weight.element_size() * len(model.blocks)
    held = [model.cache_nbytes(T, policy=policy) // per_layer for T in range(4096, 8192)]
    steps = {b - a for a, b in zip(held, held[1:])}
    if steps == {0}:
        return f"constant ({held[0]} per layer)"
    if len(steps) == 1:
        return str(steps.pop())
    return f"bounded ({min(held)}-{max(held)} per layer)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="also fill real caches at T=1k")
    args = ap.parse_args()
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}; command: python benchmarks/cache_size.py"
          + (" --check" if args.check else ""))
    print("\n### Default config (d_model 128, 4 heads, 2 layers, fp32, batch 1)\n")
    print(table(DEFAULT, DEFAULT_VARIANTS, args.check, DEFAULT_POLICIES))
    print("\n### T6 paper small shapes (d_model 768, d_head 64, 12 layers, fp32, batch 1)\n")
    print(table(PAPER, PAPER_VARIANTS, False))
    mha = ModelConfig(**{**PAPER, "n_heads": 12, "attention": {"kind": "mha"}})
    tc = ModelConfig(**{**PAPER, "n_heads": 12, "attention": {"kind": "tensor_cache", "window": 512}})
    with torch.device("meta"):
        ratio = build_model(tc).cache_nbytes(32768) / build_model(mha).cache_nbytes(32768)
    print(f"\nTensor Cache (W 512) state at 32k / MHA cache at 32k, same width: {ratio:.4f} "
          f"(1/{1 / ratio:.0f}; target <= 1/50)")


if __name__ == "__main__":
    main()
