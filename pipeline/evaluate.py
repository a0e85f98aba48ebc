"""The evaluate stage's driver: one Ray job per run (`pipeline.evaluation.evaluate_run`); the
driver alone writes MLflow and `results/eval/<run>.json`, `metrics/eval.json`.

A run whose (checkpoint fingerprint, eval config, task settings, evaluation code) is unchanged
keeps its result.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline import checkpoint, fanout, tracking
from pipeline.data import verify_prepared
from pipeline.fingerprint import digest, source_hash
from pipeline.jobs import EvalJob
from pipeline.params import Params

# The code a result depends on besides the checkpoint: changing any of it re-evaluates.
EVAL_CODE = ("pipeline/evaluation", "pipeline/tasks", "pipeline/export.py", "pipeline/hf/modeling_kvf.py")


def reference_window(params: Params) -> int | None:
    """The study's shortest reach: W-token windows stacked n_layers deep see at most
    n_layers * (W - 1) positions back. MQAR queries are split inside / beyond it."""
    windows = [a.get("window") for a in params.variants.values() if a.get("window")]
    n_layers = params.model_config_for(next(iter(params.variants))).n_layers
    return n_layers * (min(windows) - 1) if windows else None


def task_metadata(params: Params) -> dict:
    """The lm-eval tasks draw their haystacks from the same held-out plays as the pipeline."""
    retrieval = params.data.retrieval
    return {"seed": params.eval.seed, "context_lengths": params.eval.task_context_lengths,
            "heldout_plays": params.data.heldout_plays, "distances": retrieval.distances,
            "num_distractors": retrieval.num_distractors}


def eval_jobs(params: Params, root: Path, data_dir: Path, ckpt_root: Path, export_root: Path) -> dict[str, EvalJob]:
    code, ref_window, tasks = source_hash(EVAL_CODE), reference_window(params), task_metadata(params)
    jobs = {}
    for run in params.runs():
        final = checkpoint.load_final_meta(ckpt_root / run.name)
        if final is None:
            raise FileNotFoundError(f"{ckpt_root / run.name}: no completed checkpoint; run the train stage")
        fingerprint = digest({"ckpt": final["fingerprint"], "weights": final.get("weights_sha256"),
                              "eval": params.eval.model_dump(mode="json"),
                              "mqar": params.data.mqar.model_dump(mode="json"), "tasks": tasks,
                              "ref_window": ref_window, "code": code})
        jobs[run.name] = EvalJob(
            run=run.name, variant=run.variant, seed=run.seed, eval=params.eval, mqar=params.data.mqar,
            fingerprint=fingerprint, ref_window=ref_window, task_metadata=tasks,
            threads=params.compute.cpus_per_job, ckpt_dir=str((ckpt_root / run.name).resolve()),
            export_dir=str((export_root / run.name).resolve()), data_dir=str(data_dir.resolve()),
            hf_home=os.environ.get("HF_HOME", str(root / "runs" / "hf_home")))
    return jobs


def flat_metrics(r: dict) -> dict[str, float]:
    """Stable metric names shared by every variant (eval/..., mem/..., speed/...)."""
    out = {"eval/cache_bytes_per_token": r["cache_bytes_per_token_analytic"]}
    for length, v in r["bpb"].items():
        out[f"eval/bpb_{length}"] = v
    for name, v in r["mqar"].items():
        for key in ("acc", "acc_inside_window", "acc_beyond_window"):
            if v.get(key) is not None:
                out[f"eval/mqar_{key}_{name}"] = v[key]
            if v.get("decode", {}).get(key) is not None:
                out[f"eval/mqar_decode_{key}_{name}"] = v["decode"][key]
    for task, scores in r.get("lm_eval", {}).get("scores", {}).items():
        for metric, v in scores.items():
            out[f"eval/{task}/{metric}"] = v
    for d in r["decode"]:
        tag = f"{d['mode']}_{d['context_len']}"
        out[f"mem/cache_bytes_{tag}"] = d["cache_bytes"]
        out[f"mem/peak_rss_{tag}"] = d["peak_rss_bytes"]
        out[f"speed/decode_tokens_per_s_{tag}"] = d["decode_tokens_per_s"]
        if d["mode"] == "prefill":
            out[f"speed/prefill_tokens_per_s_{tag}"] = d["prefill_tokens_per_s"]
    return out


def _log_to_mlflow(tracker: tracking.Tracker, run_id: str, r: dict) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracker.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(flat_metrics(r).items())])
    rows = r.get("lm_eval", {}).get("by_length", [])
    if rows:
        tracker.client.log_table(run_id, {k: [row[k] for row in rows] for k in rows[0]},
                                 "eval/lm_eval_by_length.json")
    tracker.client.log_dict(run_id, r, "eval/results.json")


def run_evaluate(params: Params, root: Path, data_dir: Path, ckpt_root: Path, export_root: Path,
                 results_dir: Path, metrics_path: Path) -> int:
    from pipeline.evaluation import evaluate_run

    verify_prepared(data_dir)
    jobs = eval_jobs(params, root, data_dir, ckpt_root, export_root)
    train_metrics = Path("metrics/train.json")
    train_runs = checkpoint.read_json(train_metrics)["variants"] if train_metrics.exists() else {}
    results_dir.mkdir(parents=True, exist_ok=True)
    results, todo = {}, {}
    for name, job in jobs.items():
        cached = results_dir / f"{name}.json"
        if cached.exists() and checkpoint.read_json(cached).get("eval_fingerprint") == job.fingerprint:
            results[name] = checkpoint.read_json(cached)
            print(f"[evaluate] {name}: unchanged (checkpoint, eval config), kept", flush=True)
        else:
            todo[name] = job
    failures = []
    if todo:
        with fanout.cluster(params.compute, root) as cluster:
            device = "cuda" if cluster.gpus_per_job else "cpu"
            refs = fanout.submit(evaluate_run, {n: j.model_copy(update={"device": device}) for n, j in todo.items()},
                                 "evaluate", params.compute.cpus_per_job, cluster.gpus_per_job)
            print(f"[evaluate] {len(todo)} run(s) on Ray ({cluster.where}), {cluster.gpus_per_job} GPU(s) per job",
                  flush=True)
            for name, r in fanout.as_completed(refs):
                if r["status"] != "ok":
                    failures.append(name)
                    print(f"[evaluate] FAILED {name}: {r['error']}\n{r.get('traceback', '')}",
                          file=sys.stderr, flush=True)
                    continue
                r["eval_fingerprint"] = todo[name].fingerprint
                checkpoint.write_json(results_dir / f"{name}.json", r)
                results[name] = r
                seconds = r["time_quality_s"] + r.get("time_lm_eval_s", 0) + r["time_decode_s"]
                print(f"[evaluate] {name}: done in {seconds:.1f}s", flush=True)

    tracker = tracking.Tracker(tracking.tracking_uri(params.tracking.uri, root), params.tracking.experiment)
    for name, r in results.items():
        r["run_id"] = train_runs.get(name, {}).get("run_id")
        if r["run_id"] is not None:
            _log_to_mlflow(tracker, r["run_id"], r)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(metrics_path, {"reference_window": reference_window(params),
                                         "report_context": params.eval.report_context,
                                         "variants": {n: {"run_id": r.get("run_id"), **flat_metrics(r)}
                                                      for n, r in results.items()}})
    return 1 if failures else 0
