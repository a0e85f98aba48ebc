"""The evaluate stage's driver: one Ray job per run (`pipeline.evaluate.evaluate_run`); the
driver alone writes MLflow and `results/eval/<run>.json`, `metrics/eval.json`. With
`compute.storage` a URI the jobs carry storage keys, not paths: their workers fetch the data, the
checkpoint and the export into their node's cache (`through_storage`, `in_node_cache`), as the
train stage's do; `compute.resources` pins them to nodes as it pins training.

A run whose (checkpoint fingerprint, eval config, task settings, evaluation code) is unchanged
keeps its result.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from pipeline.core import checkpoint, fanout, storage, tracking
from pipeline.core.data import verify_prepared
from pipeline.core.fingerprint import digest, source_hash
from pipeline.core.jobs import EvalJob
from pipeline.core.params import Params, policy_key
from pipeline.core.selection import select

# The code a result depends on besides the checkpoint: changing any of it re-evaluates.
# The export's code stands for the export lm-eval reads; data.py and prepare.py hold the MQAR and
# retrieval generators.
EVAL_CODE = ("pipeline/evaluate/worker.py", "pipeline/evaluate/quality.py", "pipeline/evaluate/harness.py",
             "pipeline/evaluate/probe.py", "pipeline/evaluate/policy.py", "pipeline/evaluate/tasks",
             "pipeline/core/lm_eval_tasks.py",
             "pipeline/export/bundle.py", "pipeline/export/driver.py", "pipeline/core/exports.py",
             "pipeline/export/hf/modeling_kvf.py", "pipeline/core/tokens.py", "pipeline/core/data.py",
             "pipeline/prepare/prepare.py")


def reaches(params: Params) -> tuple[int, int] | None:
    """The study's shortest and longest reach: W-token windows stacked n_layers deep see at most
    n_layers * (W - 1) positions back. An MQAR query counts as inside the window when its gap is
    within the shortest reach (every window sees it) and as beyond it when its gap exceeds the
    longest (no window sees it), so that both measures mean the same for every point."""
    windows = _windows(params)
    if not windows:
        return None
    n_layers = params.model_config_for(next(iter(params.points))).n_layers
    return n_layers * (min(windows) - 1), n_layers * (max(windows) - 1)


def _windows(params: Params) -> list[int]:
    """Every trained window and every inference-time cache policy's window."""
    return ([p.attention["window"] for p in params.points.values() if p.attention.get("window")]
            + [policy.window for _, policy in params.policy_points()])


def min_window(params: Params) -> int | None:
    """The study's smallest window: the W of the bits-per-byte-by-distance split."""
    return min(_windows(params), default=None)


def task_metadata(params: Params, data_dir: Path) -> dict:
    """The lm-eval tasks draw their haystacks from the pipeline's held-out text: the held-out plays
    by name, or the prepared held-out split of a local corpus (`heldout_path`; its bytes are in
    the checkpoint's fingerprint already, so the path itself is left out of the result's)."""
    retrieval = params.data.retrieval
    out = {"seed": params.eval.seed, "context_lengths": params.eval.task_context_lengths,
           "heldout_plays": params.data.heldout_plays, "distances": retrieval.distances,
           "num_distractors": retrieval.num_distractors, "episodes_per_cell": retrieval.episodes_per_cell}
    if params.data.corpus.format != "shakespeare":
        out["heldout_path"] = str((data_dir / "text" / "heldout.bin").resolve())
    return out


def eval_jobs(params: Params, root: Path, data_dir: Path, ckpt_root: Path, export_root: Path) -> dict[str, EvalJob]:
    """One job per selection key (`<point>[.seed<k>]`): its best-rate run."""
    code, reach, tasks = source_hash(EVAL_CODE), reaches(params), task_metadata(params, data_dir)
    jobs = {}
    for key, (run, candidates) in select(params, ckpt_root).items():
        final = checkpoint.load_final_meta(ckpt_root / run.name)
        if final is None:
            raise FileNotFoundError(f"{ckpt_root / run.name}: no completed checkpoint; run the train stage")
        fingerprint = digest({"ckpt": final["fingerprint"], "weights": final.get("weights_sha256"),
                              "eval": params.eval.model_dump(mode="json"),
                              "mqar": params.data.mqar.model_dump(mode="json"),
                              "tasks": {k: v for k, v in tasks.items() if k != "heldout_path"},
                              "reach": reach, "code": code})
        jobs[key] = EvalJob(
            run=run.name, variant=run.variant, seed=run.seed, family=run.family, lr=run.lr,
            lr_candidates={str(lr): v for lr, v in candidates.items()},
            eval=params.eval, mqar=params.data.mqar,
            fingerprint=fingerprint, reach=reach, task_metadata=tasks, min_window=min_window(params),
            trained_len=params.train.seq_len,
            threads=params.compute.cpus_per_job, ckpt_dir=str((ckpt_root / run.name).resolve()),
            export_dir=str((export_root / run.name).resolve()), data_dir=str(data_dir.resolve()),
            hf_home=os.environ.get("HF_HOME", str(root / "runs" / "hf_home")))
    for point, policy in params.policy_points():  # `<point>+<policy>[.seed<k>]`: the same checkpoint, cut
        for key, job in list(jobs.items()):
            if job.variant == point and job.policy is None:
                jobs[policy_key(key, point, policy)] = job.model_copy(update={
                    "run": f"{job.run}+{policy.name}", "checkpoint_run": job.run, "policy": policy,
                    "variant": f"{point}+{policy.name}", "family": f"{point}+{policy.policy}",
                    "fingerprint": digest({"eval": job.fingerprint, "policy": policy.model_dump()})})
    return jobs


def through_storage(store, jobs: dict[str, EvalJob], data_dir: Path, ckpt_root: Path,
                    export_root: Path, manifest: dict) -> dict[str, EvalJob]:
    """The jobs as sent when the nodes share no filesystem (`compute.storage` a URI): the prepared
    data (once per manifest), each run's checkpoint and export uploaded to storage; each job
    carries their keys, and no path of this machine (its worker fetches them: `in_node_cache`)."""
    data_key, sent, uploaded = storage.put_prepared(store, data_dir, manifest), {}, set()
    for name, job in jobs.items():
        run = job.checkpoint_run or job.run
        if run not in uploaded:
            store.remove(f"evaluate/{run}")
            store.put_dir(ckpt_root / run, f"evaluate/{run}/checkpoint")
            if (export_root / run).is_dir():
                store.put_dir(export_root / run, f"evaluate/{run}/export")
            uploaded.add(run)
        sent[name] = EvalJob.model_validate({
            **job.model_dump(), "ckpt_dir": None, "export_dir": None, "data_dir": None, "hf_home": None,
            "task_metadata": {**job.task_metadata, **({"heldout_path": "text/heldout.bin"}  # in the node's copy
                                                      if "heldout_path" in job.task_metadata else {})},
            "storage": {"uri": store.location, "data": data_key, "run": f"evaluate/{run}"}})
    return sent


def in_node_cache(job: EvalJob, fn) -> dict:
    """In a Ray worker: `fn(job)`, after fetching what a job sent through storage needs into this
    node's cache (a folder of its own per job: two jobs of one run may share a node)."""
    if job.storage is None:
        return fn(job)
    import ray

    store, cache = storage.Storage(job.storage.uri), storage.node_cache()
    data = storage.fetch_prepared(store, job.storage.data, cache)
    local = cache / "evaluate" / f"{job.run}-{os.getpid()}"
    try:
        store.get_dir(f"{job.storage.run}/checkpoint", local / "checkpoint")
        store.get_dir(f"{job.storage.run}/export", local / "export")
        tasks = dict(job.task_metadata)
        if "heldout_path" in tasks:  # a local corpus's haystack: the node's copy of the held-out split
            tasks["heldout_path"] = str(data / tasks["heldout_path"])
        job = job.model_copy(update={"data_dir": str(data), "ckpt_dir": str(local / "checkpoint"),
                                     "export_dir": str(local / "export"), "hf_home": str(cache / "hf_home"),
                                     "task_metadata": tasks})
        result = fn(job)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return {**result, "worker": {"node_id": ray.get_runtime_context().get_node_id(), "data_dir": str(data)}}


def flat_metrics(r: dict, report_context: int, trained_len: int) -> dict[str, float]:
    """Stable metric names shared by every variant (eval/..., mem/..., speed/..., frontier/...);
    no value under two names: a bucket's inside/beyond split is logged only where it is not the
    whole bucket, cache bytes per token only by the train stage (model/...)."""
    from pipeline.core.results import headline

    out = {}
    for length, v in r["bpb"].items():
        out[f"eval/bpb_{length}"] = v
    for name, v in r["mqar"].items():
        for prefix, scores in (("eval/mqar", v), ("eval/mqar_decode", v.get("decode", {}))):
            if scores.get("acc") is None:
                continue
            out[f"{prefix}_acc_{name}"] = scores["acc"]
            for part in ("inside_window", "beyond_window"):
                if scores.get(f"acc_{part}") is not None and scores.get(f"n_{part}") != scores.get("n"):
                    out[f"{prefix}_acc_{part}_{name}"] = scores[f"acc_{part}"]
    for pairs, v in r.get("capacity", {}).items():  # the capacity curve; its capacity at 90 %: frontier/capacity90
        if v.get("acc_beyond_window") is not None:
            out[f"eval/mqar_capacity_p{pairs}"] = v["acc_beyond_window"]
    for task, scores in r.get("lm_eval", {}).get("scores", {}).items():
        for metric, v in scores.items():
            out[f"eval/{task}/{metric}"] = v
    for d in r["decode"]:
        tag = f"{d['mode']}_{d['context_len']}"
        out[f"mem/cache_bytes_{tag}"] = d["cache_bytes"]
        out[f"mem/peak_rss_bytes_{tag}"] = d["peak_rss_bytes"]
        out[f"speed/decode_tokens_per_s_{tag}"] = d["decode_tokens_per_s"]
        if d["mode"] == "prefill":
            out[f"speed/prefill_tokens_per_s_{tag}"] = d["prefill_tokens_per_s"]
    return {**out, **headline(r, report_context, trained_len)}


def policy_run_id(tracker: tracking.Tracker, r: dict, checkpoint_id: str) -> str:
    """The MLflow run of a cache-policy result (`<run>+<policy>`), top-level beside its checkpoint's
    run (`kvf.checkpoint_run_id` points to it): found by name and evaluation fingerprint, else
    created (finished: it trains nothing). A run an older version nested is un-nested."""
    from mlflow.entities import Param

    found = tracker.find_run(r["run"], r["eval_fingerprint"])
    if found is not None:
        if "mlflow.parentRunId" in found.data.tags:
            tracker.client.delete_tag(found.info.run_id, "mlflow.parentRunId")
            tracker.client.set_tag(found.info.run_id, "kvf.checkpoint_run_id", checkpoint_id)
        return found.info.run_id
    run_id = tracker.client.create_run(tracker.experiment_id, run_name=r["run"], tags={
        tracking.TAG_RUN: r["run"], tracking.TAG_FINGERPRINT: r["eval_fingerprint"],
        tracking.TAG_VARIANT: r["variant"], tracking.TAG_SEED: str(r["seed"]), tracking.TAG_KIND: r["kind"],
        "family": r["family"], "kvf.policy": r["policy"]["policy"], "kvf.checkpoint_run_id": checkpoint_id}).info.run_id
    tracker.client.log_batch(run_id, params=[Param(f"policy.{k}", str(v)) for k, v in sorted(r["policy"].items())]
                             + [Param("checkpoint_run", r["checkpoint_run"]), Param("family", r["family"])])
    tracker.client.set_terminated(run_id, "FINISHED")
    return run_id


def result_run_ids(tracker: tracking.Tracker, results: dict[str, dict], run_ids: dict[str, str]) -> dict[str, str]:
    """Result key -> the MLflow run its metrics go to: the trained run's own, or for a cache
    policy a run of its own beside it."""
    out = {}
    for key, r in results.items():
        if r.get("policy") is None:
            if r["run"] in run_ids:
                out[key] = run_ids[r["run"]]
        elif r["checkpoint_run"] in run_ids:
            out[key] = policy_run_id(tracker, r, run_ids[r["checkpoint_run"]])
    return out


def log_result(tracker: tracking.Tracker, run_id: str, metrics: dict[str, float], r: dict) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracker.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())])
    rows = r.get("lm_eval", {}).get("by_length", [])
    if rows:
        tracker.client.log_table(run_id, {k: [row[k] for row in rows] for k in rows[0]},
                                 "eval/lm_eval_by_length.json")
    tracker.client.log_dict(run_id, r, "eval/results.json")


def run_evaluate(params: Params, root: Path, data_dir: Path, ckpt_root: Path, export_root: Path,
                 results_dir: Path, metrics_path: Path) -> int:
    from pipeline.core.runs import mlflow_run_ids
    from pipeline.evaluate.policy import evaluate_policy
    from pipeline.evaluate.worker import evaluate_run

    manifest = verify_prepared(data_dir)
    jobs = eval_jobs(params, root, data_dir, ckpt_root, export_root)
    results, todo = {}, {}
    for name, job in jobs.items():
        cached = results_dir / f"{name}.json"
        if cached.exists() and checkpoint.read_json(cached).get("eval_fingerprint") == job.fingerprint:
            results[name] = checkpoint.read_json(cached)
            print(f"[evaluate] {name}: unchanged (checkpoint, eval config), kept", flush=True)
        else:
            todo[name] = job
    if params.eval.lm_eval_tasks and todo:  # lm-eval reads the exports: trust no changed byte
        from pipeline.core.exports import verify_export

        for job in todo.values():
            if job.policy is None:
                verify_export(Path(job.export_dir))
    results_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    if todo:
        with fanout.cluster(params.compute, root, custom=True) as cluster:
            device, sent, where = cluster.device, todo, ""
            if storage.is_uri(params.compute.storage):  # the nodes share nothing but the storage
                sent = through_storage(storage.Storage(params.compute.storage), todo, data_dir, ckpt_root,
                                       export_root, manifest)
                where = f"; storage {params.compute.storage} (no shared filesystem)"
            refs = {}
            for fn, policy in ((evaluate_run, False), (evaluate_policy, True)):
                mine = {n: j.model_copy(update={"device": device}) for n, j in sent.items()
                        if (j.policy is not None) == policy}
                if mine:
                    refs |= fanout.submit(in_node_cache, mine, "evaluate", params.compute.cpus_per_job,
                                          cluster.gpus_per_job, fn, resources=params.compute.resources,
                                          retries=params.compute.max_failures)
            print(f"[evaluate] {len(todo)} run(s) on Ray ({cluster.where}), {cluster.gpus_per_job} GPU(s) per "
                  f"job{where}", flush=True)
            for name, r in fanout.as_completed(refs, timeout=1.0, where=cluster.where,
                                               stranded_after_s=params.compute.stranded_after_s):
                if r["status"] != "ok":
                    failures.append(name)
                    print(f"[evaluate] FAILED {name}: {r['error']}\n{r.get('traceback', '')}",
                          file=sys.stderr, flush=True)
                    continue
                r["key"], r["eval_fingerprint"] = name, todo[name].fingerprint
                worker = r.pop("worker", None)  # through storage: where it ran (not part of the result)
                checkpoint.write_json(results_dir / f"{name}.json", r,
                                      then="make repro keeps the results written and evaluates the rest")
                results[name] = r
                seconds = r["time_quality_s"] + r.get("time_lm_eval_s", 0) + r["time_decode_s"]
                print(f"[evaluate] {name}: done in {seconds:.1f}s" + (
                    f" (on node {worker['node_id']}, data read from {worker['data_dir']})" if worker else ""),
                    flush=True)

    tracker = tracking.Tracker.for_study(params, root)
    context, trained = params.eval.report_context, params.train.seq_len
    flat = {name: flat_metrics(r, context, trained) for name, r in results.items()}
    winners = {r["run"] for r in results.values()}
    run_ids = mlflow_run_ids(params, root, data_dir, ckpt_root, [run.name for run in params.runs()])
    for run in params.runs():  # the UI can filter on the runs the report uses
        if run.name in run_ids:
            tracker.client.set_tag(run_ids[run.name], "kvf.selected", str(run.name in winners).lower())
    logged = result_run_ids(tracker, results, run_ids)
    for name, r in results.items():
        r["run_id"] = logged.get(name)
        if r["run_id"] is not None:
            log_result(tracker, r["run_id"], flat[name], r)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    variants = {n: {"run": r["run"], "run_id": r.get("run_id"), **flat[n]} for n, r in results.items()}
    old = checkpoint.read_json(metrics_path).get("variants", {}) if metrics_path.exists() else {}
    for name in failures:  # a failed evaluation keeps its last good numbers, marked as such
        if name in old:
            variants[name] = {**old[name], "stale": True}
            print(f"[evaluate] {name}: kept its last good metrics in {metrics_path} (marked stale)",
                  file=sys.stderr, flush=True)
    checkpoint.write_json(metrics_path, {"reach": reaches(params), "report_context": context,
                                         "variants": {n: variants[n] for n in jobs if n in variants}})
    return 1 if failures else 0
