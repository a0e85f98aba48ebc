"""The train stage's driver: one Ray task per run, progress and MLflow logging in the driver.

- One job per run: each point of the study at each of `train.lr` and `train.seeds` (`Params.runs()`).
- A run whose fingerprint (resolved config, its seed, the data, the code it runs) matches its
  completed checkpoint is skipped; a partial checkpoint with the same fingerprint is resumed.
  A completed checkpoint of another fingerprint (a changed config) is kept while the new one
  trains beside it, in `<run>.next/`, and is replaced only when that run succeeds: a failed
  experiment loses nothing, and reverting params.yaml retrains nothing.
- Workers put each history record on a Ray queue; the driver draws the progress and alone
  writes MLflow (sqlite wants one writer), except with a tracking server (`http://`), where each
  worker logs its own run's curve live and the driver the rest.
- A run that raises or goes NaN/inf is reported by name and step; the others finish.
- `compute.workers_per_run > 1`: each run trains data-parallel with Ray Train (pipeline/train/ddp.py).
- Where workers read and write: with `compute.storage` a path (the default), at the driver's
  paths (`data/`, `checkpoints/<run>`): one machine, or a cluster whose nodes all see them at the
  same path (NFS). With a URI (`s3://`, `gs://`, `file:///...`: pipeline/core/storage.py) the nodes share
  nothing but the storage: the driver uploads the prepared data once per manifest
  (`data/<digest>`), a job carries storage keys and no driver path, its worker fetches the data
  into its node's cache and writes each checkpoint there, then to `checkpoints/<run>-<fingerprint>`
  in storage (resumed from there), and the driver brings a finished run back to
  `checkpoints/<run>`, where DVC, export and evaluate read it.
- `compute.resources` (custom Ray resources) pins the jobs to the nodes that declare them.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from pipeline.core import checkpoint, fanout, storage, tracking
from pipeline.core.data import check_fits, verify_prepared
from pipeline.core.jobs import StorageKeys, TrainJob
from pipeline.core.params import Params
from pipeline.core.runs import (
    adopt_completed,
    mlflow_params,
    mlflow_tags,
    run_result,
    train_code,
    train_jobs,
    with_parent,
)
from pipeline.train import preempt
from pipeline.train.ddp import storage_name
from pipeline.train.loop import OneProcess
from pipeline.train.retrofit import write_initial

STAGING = ".next"  # checkpoints/<run>.next: a changed run trains here beside the finished one


def train_task(job: TrainJob, queue) -> dict:
    """In a Ray worker: train, putting each history record on the driver's queue (and, with a
    tracking server, logging it to the run first). A job with `storage` runs from this node's
    cache (the data fetched, the checkpoint folder copied from storage), and says where it ran."""
    import ray

    from pipeline.train.loop import train_run

    report = tracking.record_sink(job, queue.put)
    if job.storage is None:
        return train_run(job, report)
    store, cache = storage.Storage(job.storage.uri), storage.node_cache()
    job = job.model_copy(update={"data_dir": str(storage.fetch_prepared(store, job.storage.data, cache)),
                                 "ckpt_dir": str(cache / job.storage.checkpoints)})
    store.get_dir(job.storage.checkpoints, Path(job.ckpt_dir))  # what it resumes from
    try:
        result = train_run(job, report, StoredProcess(job, store))
    finally:
        shutil.rmtree(job.ckpt_dir, ignore_errors=True)  # storage holds every checkpoint
    worker = {"node_id": ray.get_runtime_context().get_node_id(), "data_dir": job.data_dir,
              "ckpt_dir": job.ckpt_dir}
    return {**result, "worker": worker}


class StoredProcess(OneProcess):
    """`OneProcess` on a node that shares no filesystem with the driver: each checkpoint is
    written on the node, then copied to the run's folder in storage."""

    def __init__(self, job: TrainJob, store: storage.Storage):
        super().__init__(job)
        self.store, self.key = store, job.storage.checkpoints

    def save(self, step: int, model, optimizer, meta: dict, final: dict | None = None) -> None:
        super().save(step, model, optimizer, meta, final)
        self.store.put_dir(self.ckpt_dir, self.key)  # latest.json, model.json last: a cut copy is never trusted


# --------------------------------------------------------------------------- progress
class Progress:
    """One tqdm bar per run on a terminal; otherwise a line per run every ~10 s."""

    def __init__(self, names: list[str], total: int, done: dict[str, int]):
        self.total, self.tty = total, sys.stderr.isatty()
        self.bars, self.last_line = {}, {}
        self.step = dict(done)
        if self.tty:
            from tqdm import tqdm

            for i, name in enumerate(names):
                self.bars[name] = tqdm(total=total, initial=done.get(name, 0), position=i,
                                       desc=f"{name:>24}", leave=True, dynamic_ncols=True)

    def update(self, record: dict) -> None:
        name, step = record["run"], record["step"]
        self.step[name] = step
        if self.tty:
            bar = self.bars[name]
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{record.get('train/loss', float('nan')):.3f}", refresh=False)
        elif time.time() - self.last_line.get(name, 0) > 10 or step == self.total:
            self.last_line[name] = time.time()
            extra = " ".join(f"{k}={v:.4g}" for k, v in record.items()
                             if k in ("train/loss", "train/tokens_per_s", "val/bpb"))
            print(f"[train] {name}: step {step}/{self.total} {extra}", flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class LiveLog:
    """Drains the workers' queue into the progress display and, unless the workers log
    themselves (a tracking server), each run's MLflow history. When they do, it keeps the records:
    what a worker could not log (its server gone longer than the client retries) is logged as the
    run ends (`fill`)."""

    def __init__(self, queue, tracker: tracking.Tracker, run_ids: dict[str, str], progress: Progress,
                 workers_log: bool = False):
        self.queue, self.tracker, self.run_ids, self.progress = queue, tracker, run_ids, progress
        self.workers_log, self.seen = workers_log, {}

    def drain(self) -> None:
        pending: dict[str, list] = {}
        while not self.queue.empty():
            for record in self.queue.get_nowait_batch(self.queue.qsize()):
                pending.setdefault(record["run"], []).append(record)
                self.progress.update(record)
        for name, records in pending.items():
            if self.workers_log:
                self.seen.setdefault(name, []).extend(records)
            else:
                self.tracker.log_records(self.run_ids[name], records)

    def fill(self, name: str) -> None:
        if self.workers_log:
            missing = self.tracker.fill_history(self.run_ids[name], self.seen.pop(name, []))
            if missing:
                print(f"[train] {name}: {missing} logged step(s) its worker could not send, sent now", flush=True)


# --------------------------------------------------------------------------- the stage


def _replace(ckpt_dir: Path, staging: Path) -> None:
    """The staged run becomes the run's checkpoint; the old one goes only after the swap."""
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(staging, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def _start_here(job: TrainJob, staged: dict[str, Path]) -> tuple[TrainJob, dict | None]:
    """A run whose checkpoint is at the driver's path: (the job, the step checkpoint it resumes
    from). A completed run of another config stays while this one trains in `<run>.next`."""
    final = checkpoint.load_final_meta(job.ckpt_dir, check=False)  # only its fingerprint is read
    if final is not None and final["fingerprint"] != job.fingerprint:  # keep it until this succeeds
        staged[job.run] = Path(job.ckpt_dir)
        job = job.model_copy(update={"ckpt_dir": job.ckpt_dir + STAGING})
    latest = checkpoint.load_latest(Path(job.ckpt_dir))
    if latest is not None and latest.get("fingerprint") != job.fingerprint:
        shutil.rmtree(job.ckpt_dir)  # an unfinished run of another config or code
        latest = None
    return job, latest


def _start_in_storage(job: TrainJob, store: storage.Storage, data_key: str) -> tuple[TrainJob, dict | None]:
    """A run of a study without a shared filesystem: (the job its worker gets, carrying storage
    keys and no path of this machine; the step checkpoint it resumes from). Its checkpoints live
    in storage in a folder of its own config, so a completed run of another config stays in
    `checkpoints/<run>` until this one is brought back whole."""
    keys = StorageKeys(uri=store.location, data=data_key, checkpoints=f"checkpoints/{storage_name(job)}")
    latest = store.read_json(f"{keys.checkpoints}/{checkpoint.LATEST}")
    latest = latest and store.read_json(f"{keys.checkpoints}/{latest['stem']}.json")
    if latest is not None and latest.get("fingerprint") != job.fingerprint:
        store.remove(keys.checkpoints)
        latest = None
    sent = TrainJob.model_validate({**job.model_dump(), "data_dir": None, "ckpt_dir": None,
                                    "storage": keys.model_dump()})
    return sent, latest


def _initial_in_storage(job: TrainJob, store: storage.Storage, key: str) -> dict:
    """A retrofit without a shared filesystem: its step-0 checkpoint made here, from its parent's
    checkpoint (at the driver's path once the parent's wave brought it back), and uploaded to its
    folder in storage; its worker resumes from it as from any checkpoint. Returns its metadata."""
    local = Path(job.ckpt_dir + ".init")
    shutil.rmtree(local, ignore_errors=True)
    try:
        parent = Path(job.ckpt_dir).parent / job.init_from
        latest = write_initial(job.model_copy(update={"ckpt_dir": str(local)}), parent)
        store.put_dir(local, key)
        return latest
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _prune_storage(store: storage.Storage, jobs: dict[str, TrainJob], todo: list[TrainJob]) -> None:
    """Storage's checkpoint folders of runs no longer in params.yaml, and of other configs of the
    runs about to train (as at the driver's path: one unfinished config per run is kept)."""
    training = {job.run: storage_name(job) for job in todo}
    for folder in store.folders("checkpoints"):
        run = folder.rsplit("-", 1)[0]
        if run not in jobs or training.get(run, folder) != folder:
            store.remove(f"checkpoints/{folder}")


def _bring_back(store: storage.Storage, sent: TrainJob, ckpt_dir: Path, result: dict) -> dict:
    """A finished run's folder in storage becomes `ckpt_dir` (copied beside the old one, verified,
    then swapped); `result`, or a failed result naming what is wrong."""
    staging = ckpt_dir.with_name(ckpt_dir.name + STAGING)
    where = store.uri(sent.storage.checkpoints)
    try:
        store.get_dir(sent.storage.checkpoints, staging)
        final = checkpoint.load_final_meta(staging)  # digests verified
        if final is None or final["fingerprint"] != sent.fingerprint:
            raise checkpoint.CorruptCheckpoint(f"{where}: no completed checkpoint of this config")
    except (OSError, checkpoint.CorruptCheckpoint) as err:
        return {"status": "failed", "step": result["step"], "error": f"bringing the checkpoint back: {err}"}
    _replace(ckpt_dir, staging)
    worker = result.get("worker")  # a one-task run says where it ran and read
    print(f"[train] {sent.run}: {where} -> {ckpt_dir.parent.name}/{ckpt_dir.name}"
          + (f" (trained on node {worker['node_id']}, data read from {worker['data_dir']})" if worker else ""),
          flush=True)
    return result


def _train_on_ray(params: Params, tracker: tracking.Tracker, jobs: list[TrainJob], cluster: fanout.Cluster,
                  source: dict[str, str], store: storage.Storage, data_key: str | None,
                  stage: preempt.Stage) -> dict[str, dict]:
    """Train `jobs` (each resumed from its checkpoint when current); {run: result}. With
    `data_key` (the prepared data in storage) the nodes share nothing but `store`. After SIGTERM
    (`stage`) each run stops at its next step with a checkpoint (pipeline/train/preempt.py)."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    jobs, run_ids, started, staged, homes = list(jobs), {}, {}, {}, {}
    for i, job in enumerate(jobs):
        if data_key is None:
            job, latest = _start_here(job, staged)
            if latest is None and job.init_from is not None:  # a retrofit starts from its parent's weights
                latest = write_initial(job, Path(job.ckpt_dir).parent / job.init_from)
        else:
            homes[job.run] = Path(job.ckpt_dir)
            here, (job, latest) = job, _start_in_storage(job, store, data_key)
            if latest is None and job.init_from is not None:
                latest = _initial_in_storage(here, store, job.storage.checkpoints)
        jobs[i], started[job.run] = job, latest["step"] if latest else 0
        run_ids[job.run] = tracker.open_run(job.run, job.fingerprint, mlflow_params(params, job),
                                            mlflow_tags(job, source))
        if latest:
            tracker.log_records(run_ids[job.run], latest["history"])
    # the progress queue lives on the driver's node (and holds no CPU): a node lost mid-study must
    # not take it along, and a head node of no CPUs can hold it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    workers_log, compute = tracking.is_server(tracker.uri), params.compute
    live_fields = lambda job: {"tracking_uri": tracker.uri, "mlflow_run_id": run_ids[job.run]} if workers_log else {}  # noqa: E731
    ready = {job.run: job.model_copy(update={"device": cluster.device, **live_fields(job)}) for job in jobs}
    if compute.workers_per_run == 1:  # one Ray task per run
        refs = fanout.submit(train_task, ready, "train", compute.cpus_per_job, cluster.gpus_per_job, queue,
                             resources=compute.resources, retries=compute.max_failures)
        spread = ""
    else:  # one Ray Train run per run (its task holds nothing; its workers hold the resources)
        from pipeline.train.ddp import clear_stop, fit_run, request_stop

        for job in ready.values():
            clear_stop(job, store.location)
        refs = fanout.submit(fit_run, ready, "train", 0, 0, queue, compute.workers_per_run, compute.cpus_per_job,
                             cluster.gpus_per_job, compute.resources, store.location, compute.max_failures,
                             needs={"CPU": compute.cpus_per_job, "GPU": cluster.gpus_per_job, **compute.resources})
        spread = f" x {compute.workers_per_run} Ray Train workers per run (DDP)"
    print(f"[train] {len(jobs)} run(s) on Ray ({cluster.where}), {cluster.gpus_per_job} GPU(s) per job{spread}; "
          + (f"storage {store.location} (no shared filesystem); " if data_key
             else f"storage {store.location}; " if compute.workers_per_run > 1 else "")
          + f"MLflow: {tracker.uri}" + (" (the workers log their curves live)" if workers_log else ""), flush=True)
    progress = Progress([job.run for job in jobs], max(job.train.steps for job in jobs), started)
    live = LiveLog(queue, tracker, run_ids, progress, workers_log)
    by_name = {job.run: job for job in jobs}
    results = {}
    # as_completed empties it as runs finish; a data-parallel run is asked to stop through storage
    stage.watch(refs, None if compute.workers_per_run == 1 else
                lambda ref: request_stop(ready[refs[ref]], store.location, "SIGTERM"))

    def waited() -> None:
        live.drain()
        stage.poll()

    try:
        # a wait of 0.25 s at most: a SIGTERM's handler runs between waits, so it asks the runs to stop soon
        for name, result in fanout.as_completed(refs, timeout=0.25, on_wait=waited, where=cluster.where,
                                                stranded_after_s=compute.stranded_after_s):
            live.drain()
            live.fill(name)
            job, run_id = by_name[name], run_ids[name]
            if result["status"] == "ok" and name in homes:
                result = _bring_back(store, job, homes[name], result)
            if result["status"] == "ok":
                if name in staged:
                    _replace(staged[name], Path(job.ckpt_dir))
                tracker.log_final(run_id, result["metrics"], result["step"])
                tracker.finish(run_id, ok=True)
                results[name] = run_result(job, run_id, result["step"], result["metrics"], trained=True)
                continue
            step = result["step"] if result["step"] is not None else progress.step.get(name, 0)
            tracker.finish(run_id, ok=False, error=result["error"])
            status = "preempted" if result.get("error_type") == "Preempted" else "failed"
            results[name] = {"status": status, "step": step, "run_id": run_id, "variant": job.variant,
                             "seed": job.seed, "error": result["error"]}
            resumes = f"; the next make repro resumes it from step {step}" if status == "preempted" else ""
            print(f"[train] {status.upper()} run {name} at step {step}: {result['error']}{resumes}",
                  file=sys.stderr, flush=True)
            if result.get("traceback"):
                print(result["traceback"], file=sys.stderr, flush=True)
    finally:
        progress.close()
    return results


def run_training(params: Params, root: Path, data_dir: Path, ckpt_root: Path, metrics_path: Path) -> int:
    """Train every run that needs it; write `metrics_path`; 0 if all succeeded, else 1."""
    code, manifest = train_code(), verify_prepared(data_dir)
    vocab = min(params.model_config_for(run.variant).vocab_size for run in params.runs())
    check_fits(manifest, params.data, vocab, params.train.seq_len)
    jobs = train_jobs(params, code, data_dir, ckpt_root, manifest["files"])
    complete = {}
    for name, job in jobs.items():
        try:
            final = checkpoint.load_final_meta(ckpt_root / name)
        except checkpoint.CorruptCheckpoint as err:  # not trusted: trained (or resumed) again
            print(f"[train] {name}: {err}: training it again", flush=True)
            final = None
        if final is not None and final["fingerprint"] == job.fingerprint:
            complete[name] = final
    todo = [job for name, job in jobs.items() if name not in complete]
    children = {name for name, job in jobs.items() if params.points[job.variant].init_from is not None}

    # Ray only when something trains; outputs and MLflow are touched only after every check passed
    location, remote = params.compute.storage, storage.is_uri(params.compute.storage)
    store = storage.Storage(location if remote else str((root / location).resolve()))  # relative: in the repo
    with (fanout.cluster(params.compute, root, custom=True) if todo else nullcontext()) as cluster, \
            preempt.on_sigterm(params.compute.preempt_grace_s) as stage:
        if ckpt_root.is_dir():
            for stale in ckpt_root.iterdir():  # runs no longer in params.yaml
                if stale.is_dir() and stale.name.removesuffix(STAGING) not in jobs:
                    shutil.rmtree(stale)
        if remote and todo:
            _prune_storage(store, jobs, todo)
        tracker = tracking.Tracker.for_study(params, root)
        source = tracking.source_tags(root)
        results = {name: adopt_completed(params, tracker, jobs[name], final, source)
                   for name, final in complete.items() if name not in children}
        data_key = storage.put_prepared(store, data_dir, manifest) if remote and todo else None
        first = [job for job in todo if job.run not in children]  # parents (and every other run) first
        if first:
            results.update(_train_on_ray(params, tracker, first, cluster, source, store, data_key, stage))
        then = []
        for name in (n for n in jobs if n in children):
            job, run = jobs[name], next(r for r in params.runs() if r.name == name)
            failed = [p.name for p in params.parent_runs(run) if results[p.name]["status"] != "ok"]
            if stage.stopping is not None:
                results[name] = {"status": "preempted", "step": 0, "run_id": None, "variant": job.variant,
                                 "seed": job.seed, "error": "the stage was preempted before it started"}
                continue
            if failed:
                results[name] = {"status": "failed", "step": 0, "run_id": None, "variant": job.variant,
                                 "seed": job.seed, "error": f"parent {failed[0]} failed: not trained"}
                print(f"[train] FAILED run {name}: its parent {failed[0]} failed; not trained", file=sys.stderr,
                      flush=True)
                continue
            jobs[name] = job = with_parent(params, job, ckpt_root)
            if name in complete:
                results[name] = adopt_completed(params, tracker, job, complete[name], source)
            else:
                then.append(job)
        if then:
            results.update(_train_on_ray(params, tracker, then, cluster, source, store, data_key, stage))
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(metrics_path, {
        "mlflow": {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id},
        "variants": {name: results[name] for name in jobs if name in results},
    })
    for name in jobs:
        r = results[name]
        if r["status"] == "ok":
            print(f"[train] {name}: val/bpb={r.get('val/bpb', float('nan')):.4f} "
                  + " ".join(f"{k}={v:.3f}" for k, v in r.items() if k.startswith("val/mqar_acc"))
                  + f" run={r['run_id']}", flush=True)
    failures = [name for name, r in results.items() if r["status"] != "ok"]
    if stage.stopping is not None:  # SIGTERM: 128 + 15, as if it had ended the process
        print(f"[train] preempted (SIGTERM): {len(failures)} run(s) stopped with a checkpoint: "
              + ", ".join(f"{n} (step {results[n]['step']})" for n in failures)
              + "; make repro resumes them", file=sys.stderr)
        return 143
    if failures:
        print(f"[train] {len(failures)} run(s) failed: "
              + ", ".join(f"{n} (step {results[n]['step']})" for n in failures), file=sys.stderr)
        return 1
    return 0
