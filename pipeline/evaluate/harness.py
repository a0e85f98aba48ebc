"""The lm-eval tasks of `pipeline/evaluate/tasks`, run through `lm_eval.simple_evaluate` on an HF export
(the same code path as the stock `lm_eval --model hf` command)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.lm_eval_tasks import TASKS_DIR


def policy_args(policy) -> str:
    """The model_args that run a full-attention export under an inference-time cache policy
    (`models.CachePolicy`; the export's config reads them: `kvf_policy`, `kvf_window`, `kvf_sinks`)."""
    return f",kvf_policy={policy.policy},kvf_window={policy.window},kvf_sinks={policy.sinks}"


def depth(doc: dict) -> float:
    """Where the evidence sits in the context, 0 (its start) to 1 (its end): the heatmap's rows. A
    document records the depth it was placed at (1 - its distance fraction); older ones, their
    evidence's distance from the end in bytes (rounded to one decimal)."""
    if doc.get("depth") is not None:
        return float(doc["depth"])
    return round(1.0 - doc["distance"] / doc["context_len"], 1)


def run_lm_eval(export_dir: Path, tasks: list[str], limit: int | None, metadata: dict,
                device: str = "cpu", policy=None) -> dict:
    """lm_eval.simple_evaluate on the export (under a cache `policy` when given); returns
    {task: metrics}, per-length rows and per-(length, depth) cells."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # the metadata goes to the task manager: simple_evaluate applies its own only when it makes the
    # manager, so the tasks' data would otherwise be their defaults' (contexts, seed, haystack)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    args = f"pretrained={export_dir},trust_remote_code=True,device={device}"
    out = lm_eval.simple_evaluate(
        model="hf", model_args=args + (policy_args(policy) if policy is not None else ""),
        tasks=tasks, limit=limit, task_manager=manager, log_samples=True, metadata=metadata,
        batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    scores, rows, cells = {}, [], []
    for task in tasks:
        res = out["results"].get(task, {})
        scores[task] = {k.split(",")[0]: float(v) for k, v in res.items()
                        if isinstance(v, (int, float)) and "stderr" not in k
                        and not k.startswith(("alias", "sample_len"))}
        by_len: dict[int, list[float]] = {}
        by_cell: dict[tuple[int, float], list[float]] = {}
        metric = next(iter(scores[task]), None)
        for sample in out.get("samples", {}).get(task, []):
            if metric is not None and metric in sample:
                length, score = int(sample["doc"]["context_len"]), float(sample[metric])
                by_len.setdefault(length, []).append(score)
                by_cell.setdefault((length, depth(sample["doc"])), []).append(score)
        for length, values in sorted(by_len.items()):
            rows.append({"task": task, "metric": metric, "context_len": length,
                         "score": float(np.mean(values)), "n": len(values)})
        for (length, at), values in sorted(by_cell.items()):
            cells.append({"task": task, "metric": metric, "context_len": length, "depth": at,
                          "score": float(np.mean(values)), "n": len(values)})
    return {"scores": scores, "by_length": rows, "by_cell": cells}
