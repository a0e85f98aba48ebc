"""Decode memory and speed per variant of params.yaml (random weights: speed and memory do not
depend on training), each measurement in a fresh process (pipeline.evaluation.probe).

    python benchmarks/decode.py --lengths 1024 8192 32768 65536 --variants mha tensor_cache
    python benchmarks/decode.py --generate 1024 65536 --variants tensor_cache   # flat-memory check
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from models import build_model
from pipeline import checkpoint
from pipeline.evaluation.probe import probe_subprocess
from pipeline.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--variants", nargs="*")
    ap.add_argument("--lengths", nargs="*", type=int, default=[1024, 8192])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--generate", nargs="*", type=int, default=[])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants or list(params.points):
            cfg = params.model_config_for(name)
            torch.manual_seed(0)
            ckpt = Path(tmp) / name
            checkpoint.save_final(ckpt, build_model(cfg), {"variant": name, "step": 0, "fingerprint": "bench",
                                                          "model_config": cfg.model_dump(mode="json")})
            runs = [(L, args.new_tokens, "prefill") for L in args.lengths] + [(L, 0, "generate") for L in args.generate]
            for length, new, mode in runs:
                r = probe_subprocess(ckpt, length, new, mode, args.threads)
                print(json.dumps({"variant": name, **r}), flush=True)


if __name__ == "__main__":
    main()
