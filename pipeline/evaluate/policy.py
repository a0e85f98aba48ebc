"""A full-attention checkpoint measured under an inference-time cache policy (window KV,
StreamingLLM): the same quality measures as `evaluate_run`, every one through the policy's cache
(the policy changes the function: each query sees the sinks and its own window), the lm-eval tasks
on its parent's export run under the policy (the export's `kvf_policy` args), and the cache's
measured bytes. No speed probe."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.core import checkpoint
from pipeline.core.jobs import EvalJob
from pipeline.core.tokens import TokenStream


def evaluate_policy(job: EvalJob) -> dict:
    from pipeline.evaluate.quality import measure

    torch.set_num_threads(job.threads)
    cfg, policy = job.eval, job.policy
    model, meta = checkpoint.load_model(Path(job.ckpt_dir))
    model.to(job.device)
    text = TokenStream(job.data_dir, "heldout")
    attention = {**meta["model_config"]["attention"], "cache_policy": policy.model_dump()}
    t0 = time.perf_counter()
    result = {"run": job.run, "checkpoint_run": job.checkpoint_run, "variant": job.variant,
              "family": job.family, "seed": job.seed, "lr": job.lr, "lr_candidates": job.lr_candidates,
              "reach": job.reach, "device": job.device, "kind": f"{attention['kind']}+{policy.policy}",
              "window": policy.window, "attention": attention, "policy": policy.model_dump(),
              "params": model.num_parameters(),
              "cache_bytes_per_token_analytic": model.cache_nbytes(cfg.report_context, policy=policy)
              / cfg.report_context, "lm_eval": {}, "decode": []}
    result.update(measure(model, text, job, policy))
    result["time_quality_s"] = time.perf_counter() - t0
    if cfg.lm_eval_tasks:
        from pipeline.evaluate.harness import run_lm_eval

        t0 = time.perf_counter()
        result["lm_eval"] = run_lm_eval(Path(job.export_dir), cfg.lm_eval_tasks, cfg.limit, job.task_metadata,
                                        job.device, policy=policy)
        result["time_lm_eval_s"] = time.perf_counter() - t0
    result["time_decode_s"] = 0.0
    result["cache_bytes_measured"] = _measured_bytes(model, policy, max(cfg.context_lengths))
    return result


@torch.no_grad()
def _measured_bytes(model, policy, context_len: int) -> dict:
    """The policy cache's own bytes after `context_len` tokens (batch 1), beside the formula."""
    cache = model.init_cache(1, policy=policy)
    ids = torch.randint(0, model.config.vocab_size, (1, context_len), device=model.embed.weight.device)
    model(ids, cache=cache)
    return {"context_len": context_len, "cache_bytes": cache.nbytes(),
            "cache_bytes_analytic": model.cache_nbytes(context_len, policy=policy)}
