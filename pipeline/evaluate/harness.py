"""The lm-eval tasks of `pipeline/evaluate/tasks`, run through `lm_eval.simple_evaluate` on an HF export
(the same code path as the stock `lm_eval --model hf` command)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.lm_eval_tasks import TASKS_DIR


def run_lm_eval(export_dir: Path, tasks: list[str], limit: int | None, metadata: dict,
                device: str = "cpu") -> dict:
    """lm_eval.simple_evaluate on the export; returns {task: metrics} and per-length rows."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={export_dir},trust_remote_code=True,device={device}",
        tasks=tasks, limit=limit, task_manager=manager, log_samples=True, metadata=metadata,
        batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    scores, rows = {}, []
    for task in tasks:
        res = out["results"].get(task, {})
        scores[task] = {k.split(",")[0]: float(v) for k, v in res.items()
                        if isinstance(v, (int, float)) and "stderr" not in k
                        and not k.startswith(("alias", "sample_len"))}
        by_len: dict[int, list[float]] = {}
        metric = next(iter(scores[task]), None)
        for sample in out.get("samples", {}).get(task, []):
            if metric is not None and metric in sample:
                by_len.setdefault(int(sample["doc"]["context_len"]), []).append(float(sample[metric]))
        for length, values in sorted(by_len.items()):
            rows.append({"task": task, "metric": metric, "context_len": length,
                         "score": float(np.mean(values)), "n": len(values)})
    return {"scores": scores, "by_length": rows}
