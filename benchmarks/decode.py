"""Decode memory and speed per variant (random weights: speed and memory do not depend on
training), each measurement in a fresh process (pipeline.evaluate.probe).

    python benchmarks/decode.py --lengths 1024 8192 32768 65536 --variants mha tensor_cache
    python benchmarks/decode.py --generate 1024 65536 --variants tensor_cache   # flat-memory check
    python benchmarks/decode.py --kinds            # every kind and cache policy of the cache-size
                                                   # benchmark (windows 64), at --params' widths

`--variants` names points of `--params`; `--kinds` names rows of `benchmarks/cache_size.py`
(DEFAULT_VARIANTS, and DEFAULT_POLICIES: MHA decoding through an inference-time cache policy),
built at the model widths of `--params` (its default SwiGLU width, not a matched one).
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from cache_size import DEFAULT_POLICIES, DEFAULT_VARIANTS

from models import CachePolicy, ModelConfig, build_model
from pipeline.core import checkpoint
from pipeline.core.params import load_params
from pipeline.evaluate import probe as probe_module


def probe_under_policy(ckpt: Path, length: int, new: int, mode: str, threads: int, policy: CachePolicy) -> dict:
    """`probe_subprocess` with the model's cache cut by `policy` (a fresh process, as every row)."""
    cmd = [sys.executable, __file__, "--probe-policy", policy.model_dump_json(), str(ckpt), str(length),
           str(new), mode, str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe_policy_here(policy_json: str, ckpt: str, length: str, new: str, mode: str, threads: str) -> dict:
    """`probe.probe` of a model whose `init_cache` and `cache_nbytes` carry the policy: probe makes
    its cache with `model.init_cache(1)` and reads the analytic bytes from `model.cache_nbytes`."""
    policy = CachePolicy.model_validate_json(policy_json)
    load = checkpoint.load_model

    def load_under_policy(path):
        model, meta = load(path)
        model.init_cache = functools.partial(model.init_cache, policy=policy)
        model.cache_nbytes = functools.partial(model.cache_nbytes, policy=policy)
        return model, meta

    checkpoint.load_model = load_under_policy  # this process only
    return probe_module.probe(ckpt, int(length), int(new), mode, int(threads))


def main() -> None:
    if sys.argv[1:2] == ["--probe-policy"]:
        print(json.dumps(_probe_policy_here(*sys.argv[2:8])))
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--variants", nargs="*", help="points of --params (default: all of them)")
    ap.add_argument("--kinds", nargs="*", help="rows of benchmarks/cache_size.py instead (none named: all)")
    ap.add_argument("--lengths", nargs="*", type=int, default=[1024, 8192])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--generate", nargs="*", type=int, default=[])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    params = load_params(args.params)
    if args.kinds is not None:  # name -> (model config, cache policy or None)
        rows = {name: (ModelConfig(**params.model, attention=att), None) for name, att in DEFAULT_VARIANTS.items()}
        rows |= {name: (ModelConfig(**params.model, attention=DEFAULT_VARIANTS[on]), policy)
                 for name, (on, policy) in DEFAULT_POLICIES.items()}
        rows = {name: rows[name] for name in args.kinds or rows}
    else:
        rows = {name: (params.model_config_for(name), None) for name in args.variants or list(params.points)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cfg, policy) in rows.items():
            torch.manual_seed(0)
            ckpt = Path(tmp) / name
            checkpoint.save_final(ckpt, build_model(cfg), {"variant": name, "step": 0, "fingerprint": "bench",
                                                          "model_config": cfg.model_dump(mode="json")})
            runs = [(L, args.new_tokens, "prefill") for L in args.lengths] + [(L, 0, "generate") for L in args.generate]
            for length, new, mode in runs:
                if policy is None:
                    r = probe_module.probe_subprocess(ckpt, length, new, mode, args.threads)
                else:
                    r = probe_under_policy(ckpt, length, new, mode, args.threads, policy)
                print(json.dumps({"variant": name, **r}), flush=True)


if __name__ == "__main__":
    main()
