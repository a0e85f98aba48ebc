"""Training and decode speed on CPU, with the peer beside us.

1. peer: our MHA against transformers' LlamaForCausalLM (attn_implementation="sdpa") built
   locally at the same widths (d_model, layers, heads, SwiGLU width, vocab, untied head: equal
   parameter counts, printed): training tokens/s at T = 1024 and 4096 and decode tokens/s after
   a 4k and a 32k prompt, as ratios, both models stepping in the same interleaved rounds.
2. variants: every variant of params.yaml (windows set to --window, as in issue 11's table)
   at T = 1k, 4k, 8k, 16k, all variants stepping in interleaved rounds per T.

A training step is forward + cross-entropy + backward + AdamW on batch = max(1, 4096 / T)
sequences; tokens/s is the median over rounds after a warm-up round. One torch thread by default
(the shared 2-core box: two OpenMP threads stall on every op). The GPU half (window-attention
kernels vs FlexAttention vs SDPA with a mask) is `benchmarks/gpu_kernels.py --tables window`.

    .venv/bin/python benchmarks/train_speed.py              # both tables, markdown
    .venv/bin/python benchmarks/train_speed.py peer --rounds 5
    .venv/bin/python benchmarks/train_speed.py variants --lengths 1024 8192
"""
from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from models import ModelConfig, build_model  # noqa: E402


def study_configs(window: int) -> dict[str, ModelConfig]:
    """params.yaml's widths and families (a swept family: its first point); windows of swa /
    tensor_cache set to `window`."""
    from pipeline.core.sweep import expand

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = {}
    for name, family in params["variants"].items():
        attention = expand(name, family)[0].attention
        if "window" in attention:
            attention = {**attention, "window": window}
        out[name] = ModelConfig(**params["model"], attention=attention)
    return out


def llama_like(cfg: ModelConfig):
    """transformers' Llama at our widths: RMSNorm, RoPE (base and eps ours), SwiGLU, no biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    peer = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                       intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layers,
                       num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                       head_dim=cfg.d_head, max_position_embeddings=1 << 17,
                       rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
                       use_cache=False)
    return LlamaForCausalLM._from_config(peer, attn_implementation="sdpa")


class Trainer:
    """One training step of a model whose call returns logits (ours) or an output with .logits."""

    def __init__(self, model):
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(self, x):
        out = self.model(x[:, :-1])
        logits = getattr(out, "logits", out)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


class Decoder:
    """Greedy-shaped decode with the model's own cache: a prompt once, then one token per call."""

    def __init__(self, model, prompt, ours: bool):
        self.model, self.ours = model.eval(), ours
        with torch.no_grad():
            if ours:
                self.cache = model.init_cache(prompt.shape[0])
                model(prompt, cache=self.cache)
            else:
                out = model(prompt, use_cache=True)
                self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
                params = inspect.signature(model.forward).parameters
                self.kw = "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def step(self, token):
        if self.ours:
            return self.model(token, cache=self.cache)
        return self.model(token, use_cache=True, **{self.kw: self.cache}).logits


def interleaved(steps: dict, work: int, rounds: int) -> dict[str, float]:
    """Every entry steps once per round, in turn; `work` units / median seconds after round 0."""
    times = {name: [] for name in steps}
    for r in range(rounds + 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: work / statistics.median(ts) for name, ts in times.items()}


def peer_table(rounds: int, decode_steps: int) -> None:
    cfg = study_configs(64)["mha"]
    torch.manual_seed(0)
    ours, peer = build_model(cfg), llama_like(cfg)
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ours, peer))
    print(f"\n### MHA vs transformers {__import__('transformers').__version__} LlamaForCausalLM "
          f"(sdpa): d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, SwiGLU "
          f"{cfg.mlp_hidden}, vocab {cfg.vocab_size}; parameters: ours {n_ours:,}, "
          f"Llama {n_peer:,}\n")
    print("| measurement | ours (tokens/s) | Llama (tokens/s) | ours / Llama |")
    print("|---|---|---|---|")
    for T in (1024, 4096):
        batch = max(1, 4096 // T)
        x = torch.randint(0, cfg.vocab_size, (batch, T + 1))
        runs = {"ours": Trainer(ours), "peer": Trainer(peer)}
        rate = interleaved({k: (lambda t=t: t.step(x)) for k, t in runs.items()}, batch * T, rounds)
        print(f"| training, T = {T} (batch {batch}) | {rate['ours']:,.0f} | {rate['peer']:,.0f} "
              f"| {rate['ours'] / rate['peer']:.2f} |", flush=True)
    for L in (4096, 32768):
        prompt = torch.randint(0, cfg.vocab_size, (1, L))
        token = torch.randint(0, cfg.vocab_size, (1, 1))
        runs = {"ours": Decoder(ours, prompt, True), "peer": Decoder(peer, prompt, False)}
        rate = interleaved({k: (lambda d=d: [d.step(token) for _ in range(decode_steps)])
                            for k, d in runs.items()}, decode_steps, rounds)
        print(f"| decode after {L} tokens (batch 1) | {rate['ours']:,.0f} | {rate['peer']:,.0f} "
              f"| {rate['ours'] / rate['peer']:.2f} |", flush=True)
        del runs


def variants_table(lengths, window: int, rounds: int) -> None:
    configs = study_configs(window)
    print(f"\n### Training tokens/s per variant (params.yaml widths, swa / tensor_cache window "
          f"{window}); batch = max(1, 4096 / T) sequences\n")
    print("| variant | " + " | ".join(f"T = {T}" for T in lengths)
          + f" | T = {lengths[-1]} / T = {lengths[0]} |")
    print("|---|" + "---|" * (len(lengths) + 1))
    rates = {}
    for T in lengths:
        batch = max(1, 4096 // T)
        x = torch.randint(0, 259, (batch, T + 1))
        runs = {}
        for name, cfg in configs.items():
            torch.manual_seed(0)
            runs[name] = Trainer(build_model(cfg))
        rates[T] = interleaved({k: (lambda t=t: t.step(x)) for k, t in runs.items()}, batch * T,
                               rounds)
        print(f"<!-- T = {T} done: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates[T].items())
              + " -->", flush=True)
        del runs
    for name in configs:
        row = [rates[T][name] for T in lengths]
        print(f"| {name} | " + " | ".join(f"{r:,.0f} ({r / rates[T]['mha']:.2f}x MHA)"
                                          for r, T in zip(row, lengths))
              + f" | {row[-1] / row[0]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tables", nargs="*", help="peer and/or variants (default: both)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    ap.add_argument("--decode-steps", type=int, default=16, help="decode tokens per round")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    tables = args.tables or ["peer", "variants"]
    if not set(tables) <= {"peer", "variants"}:
        ap.error(f"tables must be peer and/or variants, got {tables}")
    torch.set_num_threads(args.threads)
    print(f"command: `python {' '.join(sys.argv)}`  ")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}, torch "
          f"{torch.__version__}, float32, load avg {os.getloadavg()[0]:.1f}")
    if "peer" in tables:
        peer_table(args.rounds, args.decode_steps)
    if "variants" in tables:
        variants_table(args.lengths, args.window, args.rounds)


if __name__ == "__main__":
    main()
