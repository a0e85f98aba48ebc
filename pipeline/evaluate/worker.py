"""What the evaluate stage measures for one trained run, each measure in its own module:
`quality` (held-out bits per byte, MQAR recall), `harness` (the lm-eval tasks on the export),
`probe` (memory and speed in a fresh process). `evaluate_run` composes them for one job."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from pipeline.core import checkpoint
from pipeline.core.jobs import EvalJob
from pipeline.core.tokens import TokenStream


def evaluate_run(job: EvalJob) -> dict:
    """Everything measured for one run (in a Ray worker, on its GPU when it has one; the
    memory and speed probes always run on CPU, in their own process). Test hook:
    $KVF_FAULT_EVALUATE=<run> (inherited by the local Ray's workers) fails that run at once."""
    if os.environ.get("KVF_FAULT_EVALUATE") == job.run:
        raise RuntimeError(f"injected failure (KVF_FAULT_EVALUATE={job.run})")
    from pipeline.evaluate.harness import run_lm_eval
    from pipeline.evaluate.probe import probe_subprocess
    from pipeline.evaluate.quality import measure, measure_l2_off

    torch.set_num_threads(job.threads)
    os.environ.setdefault("HF_HOME", job.hf_home)
    cfg = job.eval
    model, meta = checkpoint.load_model(Path(job.ckpt_dir))
    model.to(job.device)
    text = TokenStream(job.data_dir, "heldout")
    attention = meta["model_config"]["attention"]
    t0 = time.perf_counter()
    result = {"run": job.run, "variant": job.variant, "family": job.family, "seed": job.seed,
              "lr": job.lr, "lr_candidates": job.lr_candidates, "reach": job.reach, "device": job.device,
              "kind": attention["kind"], "window": attention.get("window"), "attention": attention,
              "widths": {k: meta["model_config"][k] for k in ("n_layers", "n_heads", "d_head")},
              "params": model.num_parameters(),
              "cache_bytes_per_token_analytic": model.cache_nbytes(cfg.report_context) / cfg.report_context,
              "lm_eval": {}, "decode": []}
    result.update(measure(model, text, job))
    if result["kind"] == "tensor_cache":  # how much of it comes through L2
        result["l2_off"] = measure_l2_off(model, text, job)
    result["time_quality_s"] = time.perf_counter() - t0
    if cfg.lm_eval_tasks:
        t0 = time.perf_counter()
        result["lm_eval"] = run_lm_eval(Path(job.export_dir), cfg.lm_eval_tasks, cfg.limit,
                                        job.task_metadata, job.device)
        result["time_lm_eval_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for length in cfg.decode_lengths:
        result["decode"].append(probe_subprocess(Path(job.ckpt_dir), length, cfg.decode_new_tokens,
                                                 "prefill", job.threads))
    if result["kind"] in cfg.generate_kinds:
        for length in cfg.generate_lengths:
            result["decode"].append(probe_subprocess(Path(job.ckpt_dir), length, 0, "generate", job.threads))
    result["time_decode_s"] = time.perf_counter() - t0
    return result
