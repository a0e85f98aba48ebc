"""MQAR zero-shot on a pretrained point: how often the model, never trained on the task, copies a
stored pair's value after its key, per validation bucket of a study's `data.mqar` block.

The sequences are the study's own (`pipeline.core.data.make_mqar` with the params file's MQAR
block and gap buckets, seed 1); the model is the params file's first pretrained point, full
attention, one forward per batch of sequences; a hit is the argmax at a query key's position
naming its value. Chance is 1 / num_values.

    .venv/bin/python benchmarks/mqar_zero_shot.py configs/smollm2-cpu.yaml --n 8
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", help="a params file with a pretrained point and an MQAR block")
    ap.add_argument("--n", type=int, default=8, help="sequences per bucket")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from models.pretrained import load_pretrained
    from pipeline.core.data import make_mqar
    from pipeline.core.params import load_params

    params = load_params(args.params)
    point = next(p for p in params.points.values() if p.pretrained is not None)
    cfg = params.data.mqar
    model, _ = load_pretrained(point.pretrained, tokenizer=False)
    model.eval()
    print(f"{point.name} ({point.pretrained}), MQAR {cfg.alphabet} ids {cfg.first_id}..{cfg.end_id}, "
          f"pair_tokens {cfg.pair_tokens}, {cfg.num_pairs} pairs in {cfg.seq_len} tokens; chance "
          f"{1 / cfg.num_values:.3f}")
    print("| bucket | gaps | queries | recall | seconds |\n|---|---|---:|---:|---:|")
    for bucket, gaps in cfg.eval_gaps.items():
        seqs = make_mqar(cfg, args.n, gaps, seed=1)
        x, mask = torch.from_numpy(seqs["tokens"].astype(np.int64)), torch.from_numpy(seqs["answer_mask"])
        start = time.perf_counter()
        with torch.no_grad():
            pred = model(x)[:, :-1].argmax(-1)
        hits = (pred == x[:, 1:])[mask[:, 1:]]
        print(f"| {bucket} | {gaps[0]}-{gaps[1]} | {hits.numel()} | {hits.float().mean().item():.3f} | "
              f"{time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
