"""Where a Tensor Cache retrofit of a pretrained point starts: held-out bits per byte at step 0
(the parent's weights mapped, nothing trained), per write rule and `gate_init`, beside the
parent under the window cache policy of the same window and SWA of that window mapped the same
way (docs/design.md, "A Tensor Cache retrofit's L2 starts quiet").

Reads a study folder that has run prepare and train (its `data/` and `checkpoints/<point>`):
`--windows` sequences of `--length` held-out tokens, evenly spaced through the split. Bits per
byte over all positions, and over the positions past the window (where L2 is read).

    .venv/bin/python benchmarks/retrofit_start.py --study STUDY --point smollm2 --window 64
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="a study folder after prepare and train")
    ap.add_argument("--point", default="smollm2", help="the pretrained point (its checkpoint)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--gates", type=float, nargs="+", default=[-2.0, -4.0, -6.0, -10.0])
    ap.add_argument("--writes", nargs="+", default=["exact", "delta"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from models import CachePolicy, ModelConfig, build_model
    from models.retrofit import initialise
    from pipeline.core import checkpoint
    from pipeline.core.tokens import TokenStream

    parent, _ = checkpoint.load_model(f"{args.study}/checkpoints/{args.point}")
    parent.eval()
    text = TokenStream(f"{args.study}/data", "heldout")
    starts = np.linspace(0, len(text) - args.length - 2, args.windows).astype(int)
    ids = torch.stack([torch.from_numpy(text.ids(s, s + args.length + 1).astype(np.int64)) for s in starts])
    nbytes = np.stack([text.nbytes(s + 1, s + args.length + 1) for s in starts])

    def bpb(logits: torch.Tensor) -> tuple[float, float]:
        nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                 reduction="none").view(len(ids), -1)
        w = args.window
        return (float(nats.sum() / math.log(2) / nbytes.sum()),
                float(nats[:, w:].sum() / math.log(2) / nbytes[:, w:].sum()))

    def child(attention: dict) -> torch.nn.Module:
        cfg = ModelConfig.model_validate({**parent.config.model_dump(), "attention": attention})
        model = build_model(cfg).eval()
        initialise(model, parent.state_dict(), parent.config)
        return model

    kv = parent.config.attention.n_kv_heads
    print(f"{args.point}, W = {args.window}, {args.windows} x {args.length} held-out tokens; bits per byte "
          f"(all positions / past the window)")
    print("| model | bpb | bpb past W | seconds |\n|---|---:|---:|---:|")

    def row(name: str, run) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            all_, far = bpb(run())
        print(f"| {name} | {all_:.3f} | {far:.3f} | {time.perf_counter() - start:.1f} |", flush=True)

    row("full attention", lambda: parent(ids[:, :-1]))
    row(f"window policy W={args.window}", lambda: parent(
        ids[:, :-1], cache=parent.init_cache(len(ids), policy=CachePolicy(policy="window", window=args.window))))
    row(f"swa W={args.window}", lambda: child({"kind": "swa", "window": args.window, "n_kv_heads": kv})(ids[:, :-1]))
    for write in args.writes:
        for gate in args.gates:
            attention = {"kind": "tensor_cache", "window": args.window, "chunk_size": 64, "n_kv_heads": kv,
                         "gate_init": gate, "write": write}
            row(f"tensor_cache {write}, gate_init {gate:g}", lambda a=attention: child(a)(ids[:, :-1]))


if __name__ == "__main__":
    main()
