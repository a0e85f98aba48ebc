"""Training speed of a retrofit of SmolLM2-135M on this CPU: ours beside transformers' own Llama.

One process, both models holding the packaged SmolLM2-135M weights (`models.pretrained`), batch 1,
AdamW, `--threads` torch threads, each configuration stepping in interleaved rounds (the box is
shared: a slow moment hits every row alike). A step is forward + cross-entropy + backward + AdamW
on one sequence of T tokens; tokens/s is the median over rounds after a warm-up round. Rows:

- transformers' `LlamaForCausalLM` (SDPA), fp32: every weight trained, then attention only;
- ours (`models.LanguageModel`) the same two, then what a retrofit runs (`train.trainable:
  attention`): bf16 autocast (`train.precision: bf16`), the 49k-vocabulary loss in chunks
  (`train.loss_chunk`), a fused AdamW.

Beside them, the rate of a bf16 and an fp32 matmul of the model's own MLP shape (T x 576 x 1536)
on the same threads, and each row's model FLOP rate (6 N per token with every weight trained;
4 N + 2 N_attention with attention alone) as a fraction of the faster matmul's. The bf16 rows run
only where a bf16 matmul is faster than an fp32 one (AMX, AVX512-BF16); a CPU without native bf16
(an AVX2 EPYC: ~1 GFLOP/s) would spend minutes a step on them. The last lines split our fastest
step into forward, backward and optimizer.

    .venv/bin/python benchmarks/pretrained_train.py                 # T = 512 and 1024, 2 threads
    .venv/bin/python benchmarks/pretrained_train.py --lengths 1024 --rounds 4
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from models.pretrained import hf_config, load_pretrained, names  # noqa: E402


def transformers_llama(ours):
    """transformers' LlamaForCausalLM holding our model's weights (the import's table, inverted)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**hf_config(ours.config), attn_implementation="sdpa")
    peer = LlamaForCausalLM(config)
    state = ours.state_dict()
    peer.load_state_dict({theirs: state[mine] for theirs, mine in names(ours.config, 0).items()}, strict=False)
    peer.tie_weights()
    return peer.train()


def attention_only(model, prefix: str) -> list:
    """Freeze all but the attention (names containing `prefix`); the trained parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(prefix in name)
    return [p for p in model.parameters() if p.requires_grad]


class Row:
    """One configuration: a model, what it trains, its precision, loss and optimizer."""

    def __init__(self, name, model, logits, params, bf16=False, chunk=0, fused=False):
        self.name, self.model, self.logits, self.bf16, self.chunk = name, model, logits, bf16, chunk
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused or None)
        self.times: dict[int, list[float]] = {}
        self.parts: dict[int, list[tuple[float, float, float]]] = {}

    def loss(self, x, y):
        if self.chunk:  # the head and the loss a chunk of positions at a time: no (T, vocab) fp32 logits
            from pipeline.train.loop import chunked_cross_entropy

            return chunked_cross_entropy(self.model, x, y, self.chunk)
        return F.cross_entropy(self.logits(x).float().flatten(0, 1), y.flatten())

    def step(self, x, y) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(x, y)
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2


def matmul_rate(T: int, dtype, reps: int = 30) -> float:
    """GFLOP/s of a (T x 576) @ (576 x 1536) matmul in `dtype`, the best of `reps` (what the
    machine can do; a shared box's median says more about its neighbours)."""
    a, b = torch.randn(T, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * T * 576 * 1536 / min(times) / 1e9


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    loaded = time.perf_counter()
    ours_all, _ = load_pretrained("smollm2-135m", tokenizer=False)
    ours_att, _ = load_pretrained("smollm2-135m", tokenizer=False)
    peer_all, peer_att = transformers_llama(ours_all), transformers_llama(ours_all)
    loaded = time.perf_counter() - loaded
    n_params = sum(p.numel() for p in ours_all.parameters())
    ours_all.train(), ours_att.train()
    hf = lambda m: (lambda x: m(input_ids=x).logits)  # noqa: E731
    rows = [Row("transformers, fp32, every weight", peer_all, hf(peer_all), list(peer_all.parameters())),
            Row("transformers, fp32, attention only", peer_att, hf(peer_att), attention_only(peer_att, "self_attn")),
            Row("ours, fp32, every weight", ours_all, ours_all, list(ours_all.parameters())),
            Row("ours, fp32, attention only", ours_att, ours_att, attention_only(ours_att, ".attn."))]
    native = matmul_rate(1024, torch.bfloat16, 5) > matmul_rate(1024, torch.float32, 5)
    rows += [Row(f"ours, fp32, attention only, loss in chunks of {args.chunk}", ours_att, ours_att, rows[-1].params,
                 chunk=args.chunk),
             Row(f"ours, fp32, attention only, chunks of {args.chunk}, fused AdamW", ours_att, ours_att,
                 rows[-1].params, chunk=args.chunk, fused=True)]
    if native:
        rows += [Row(f"ours, bf16 autocast, attention only, chunks of {args.chunk}, fused AdamW", ours_att,
                     ours_att, rows[-1].params, bf16=True, chunk=args.chunk, fused=True)]
    n_att = sum(p.numel() for p in rows[3].params)
    flops = {row.name: (6 * n_params if "every weight" in row.name else 4 * n_params + 2 * n_att) for row in rows}
    rates = {}
    for T in args.lengths:
        x = torch.randint(0, ours_all.config.vocab_size, (1, T))
        y = torch.randint(0, ours_all.config.vocab_size, (1, T))
        rates[T] = {"bf16": matmul_rate(T, torch.bfloat16), "fp32": matmul_rate(T, torch.float32)}
        for r in range(args.rounds + 1):
            for row in rows:
                parts = row.step(x, y)
                if r:  # round 0 warms every row up
                    row.times.setdefault(T, []).append(sum(parts))
                    row.parts.setdefault(T, []).append(parts)
            print(f"[bench] T={T} round {r}/{args.rounds} done", file=sys.stderr, flush=True)
        rates[T] |= {"bf16_after": matmul_rate(T, torch.bfloat16), "fp32_after": matmul_rate(T, torch.float32)}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads; commit {commit}; weights loaded in "
          f"{loaded:.1f} s; N = {n_params:,}, N_attention = {n_att:,}; bf16 rows "
          f"{'run (native bf16 matmuls)' if native else 'left out (bf16 matmuls slower than fp32 here)'}\n")
    for T in args.lengths:
        bf16 = max(rates[T]["bf16"], rates[T]["bf16_after"])
        fp32 = max(rates[T]["fp32"], rates[T]["fp32_after"])
        peak = max(bf16, fp32)
        print(f"T = {T}: matmul {T} x 576 x 1536 at {bf16:,.0f} GFLOP/s in bf16, {fp32:,.0f} in fp32 "
              f"(before/after the rows: {rates[T]['bf16']:,.0f}/{rates[T]['bf16_after']:,.0f} bf16)\n")
        print("| configuration | tokens/s | x transformers (same trained set) | model GFLOP/s | of the matmul rate |")
        print("|---|---:|---:|---:|---:|")
        base = {"every": statistics.median(rows[0].times[T]), "attention": statistics.median(rows[1].times[T])}
        for row in rows:
            t = statistics.median(row.times[T])
            peer = base["every" if "every weight" in row.name else "attention"]
            gflops = flops[row.name] * T / t / 1e9
            print(f"| {row.name} | {T / t:,.0f} | {peer / t:.2f} | {gflops:,.0f} | {gflops / peak:.0%} |")
        fast = rows[-1]
        f, b, o = (statistics.median(p[i] for p in fast.parts[T]) for i in range(3))
        print(f"\n{fast.name}, T = {T}: forward + loss {f:.2f} s, backward {b:.2f} s, optimizer {o:.3f} s\n")


if __name__ == "__main__":
    main()
