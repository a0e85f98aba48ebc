"""A training run's identity, shared by the stages that follow it: its job and fingerprint
(`train_job`: the config, the seed, the data's sha256, the code it runs) and its MLflow run,
found by name and fingerprint or rebuilt from its checkpoint (`mlflow_run_ids`)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from pipeline.core import checkpoint, selection, sweep, tracking
from pipeline.core.data import verify_prepared
from pipeline.core.fingerprint import digest, source_hash
from pipeline.core.jobs import TrainJob
from pipeline.core.params import Params, Run

# The code a trained model depends on: changing any of it retrains.
TRAIN_CODE = ("models", "kernels", "pipeline/train/loop.py", "pipeline/core/data.py", "pipeline/core/tokenizer.py",
              "pipeline/core/tokens.py", "pipeline/core/checkpoint.py", "pipeline/prepare/prepare.py")
# The code a retrofit's start depends on: hashed into retrofits only (it cannot change other runs).
RETROFIT_CODE = ("models/retrofit.py", "pipeline/train/retrofit.py")
TAG_INIT_FROM = "kvf.init_from"


def train_code() -> str:
    """The hash of TRAIN_CODE that every run's fingerprint holds (the retrofit code left out)."""
    return source_hash(TRAIN_CODE, exclude=RETROFIT_CODE)


def train_job(params: Params, run: Run, code: str, data_dir: Path, ckpt_root: Path,
              data_files: dict[str, str], parents: dict[str, str] | None = None) -> TrainJob:
    """Everything one run depends on, and its fingerprint: the config (the train block holds
    only this run's seed and rate, so adding a seed or a rate retrains nothing else), the code and the sha256 of
    every prepared data file (`data_files`, from the verified manifest). A retrofit's also holds the
    retrofit code and `parents`, the fingerprints of its candidate parent runs (`Params.parent_runs`)."""
    model = params.model_config_for(run.variant)
    train = params.train_for(run.variant).model_copy(update={"seeds": [run.seed], "lr": run.lr})
    described = {"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json"),
                 "data": params.data.model_dump(mode="json"), "code": code, "data_files": data_files}
    if params.points[run.variant].init_from is not None:
        described["retrofit"] = {"code": source_hash(RETROFIT_CODE), "parents": parents}
    pretrained = params.points[run.variant].pretrained
    if pretrained is not None:  # its weights are its checkpoint's files
        described["pretrained"] = pretrained_digest(pretrained)
    fingerprint = digest(described)
    return TrainJob(run=run.name, variant=run.variant, seed=run.seed, model=model, train=train,
                    fingerprint=fingerprint, data_dir=str(data_dir.resolve()), pretrained=pretrained,
                    ckpt_dir=str((ckpt_root / run.name).resolve()), threads=params.compute.cpus_per_job,
                    fault=os.environ.get("KVF_FAULT"))


@functools.cache
def pretrained_digest(source: str) -> dict[str, str]:
    """The sha256 of every file a pretrained checkpoint is read from (`models.pretrained`), by name:
    a replaced file reads the point again (and retrains its retrofits)."""
    from models.pretrained import checkpoint_files

    return {path.name: checkpoint.file_sha256(path) for path in checkpoint_files(source)}


def train_jobs(params: Params, code: str, data_dir: Path, ckpt_root: Path,
               data_files: dict[str, str]) -> dict[str, TrainJob]:
    """Every run's job, in `Params.runs()` order; a retrofit's fingerprint holds its parents'."""
    runs = params.runs()
    jobs = {run.name: train_job(params, run, code, data_dir, ckpt_root, data_files)
            for run in runs if params.points[run.variant].init_from is None}
    for run in runs:
        if run.name not in jobs:
            parents = {p.name: jobs[p.name].fingerprint for p in params.parent_runs(run)}
            jobs[run.name] = train_job(params, run, code, data_dir, ckpt_root, data_files, parents)
    return {run.name: jobs[run.name] for run in runs}


def with_parent(params: Params, job: TrainJob, ckpt_root: Path) -> TrainJob:
    """A retrofit's job naming the parent run it starts from: of its candidates (complete), the
    one with the lowest validation objective, as the evaluate stage selects (one rate: that run)."""
    by_name = {run.name: run for run in params.runs()}
    candidates = params.parent_runs(by_name[job.run])
    finals = {run.name: checkpoint.load_final_meta(ckpt_root / run.name, check=False) for run in candidates}
    if len(candidates) == 1:
        chosen = candidates[0]
    else:
        best = selection.choose({run.lr: float(finals[run.name]["metrics"].get(selection.OBJECTIVE, float("nan")))
                                 for run in candidates})
        chosen = next(run for run in candidates if run.lr == best)
    return job.model_copy(update={"init_from": chosen.name,
                                  "init_from_fingerprint": finals[chosen.name]["fingerprint"]})


def mlflow_params(params: Params, job: TrainJob) -> dict[str, str]:
    """The full config (`train.lr`, `seed` among it), plus `family` and one `knob.<field>` per field swept anywhere
    in the study (`-` where this point has none), so that the UI's charts plot against them."""
    point = params.points[job.variant]
    swept = dict.fromkeys(k for p in params.points.values() for k in p.knobs)
    knobs = {f"knob.{k}": sweep.token(point.knobs[k]) if k in point.knobs else "-" for k in swept}
    config = {"variant": job.variant, "seed": job.seed, "model": job.model.model_dump(mode="json"),
              "train": job.train.model_dump(mode="json"), "data": params.data.model_dump(mode="json"),
              "fingerprint": job.fingerprint}
    parent = {"init_from": job.init_from, "init_from_fingerprint": job.init_from_fingerprint} if job.init_from else {}
    return {**knobs, "family": point.family, **parent, **tracking.flatten(config)}


def mlflow_tags(job: TrainJob, source: dict[str, str]) -> dict[str, str]:
    return {tracking.TAG_KIND: job.model.attention.kind, **source,
            tracking.TAG_VARIANT: job.variant, tracking.TAG_SEED: str(job.seed),
            **({TAG_INIT_FROM: job.init_from} if job.init_from else {})}


def run_result(job: TrainJob, run_id: str, step: int, metrics: dict, trained: bool) -> dict:
    return {"status": "ok", "trained": trained, "step": step, "run_id": run_id,
            "variant": job.variant, "seed": job.seed, **({"init_from": job.init_from} if job.init_from else {}),
            **metrics}


def adopt_completed(params: Params, tracker: tracking.Tracker, job: TrainJob, final: dict,
                     source: dict[str, str], quiet: bool = False) -> dict:
    """A run whose checkpoint is complete and current: find its MLflow run, or rebuild it from
    the checkpoint's history (e.g. a fresh mlflow.db)."""
    run = tracker.find_run(job.run, job.fingerprint, finished=True)
    if run is None:
        run_id = tracker.open_run(job.run, job.fingerprint, mlflow_params(params, job), mlflow_tags(job, source))
        tracker.log_records(run_id, final["history"])
        tracker.log_final(run_id, final["metrics"], final["step"])
        tracker.finish(run_id, ok=True)
    else:
        run_id = run.info.run_id
    if not quiet:
        print(f"[train] {job.run}: unchanged since its last completed run, skipped", flush=True)
    return run_result(job, run_id, final["step"], final["metrics"], trained=False)


def mlflow_run_ids(params: Params, root: Path, data_dir: Path, ckpt_root: Path, names: list[str],
                   rebuilt: set[str] | None = None) -> dict[str, str]:
    """The MLflow run of each completed run in `names`, found by name and fingerprint in the
    store, or rebuilt there from its checkpoint (a deleted or fresh store; its name is added to
    `rebuilt`): what export and evaluate log to, so losing mlflow.db never leaves them pointing
    at runs that are gone."""
    code, data_files = train_code(), verify_prepared(data_dir)["files"]
    jobs = train_jobs(params, code, data_dir, ckpt_root, data_files)
    tracker = tracking.Tracker.for_study(params, root)
    source, out = tracking.source_tags(root), {}
    for name in names:
        final = checkpoint.load_final_meta(ckpt_root / name, check=False)
        if final is None:
            continue
        job = jobs[name].model_copy(update={"fingerprint": final["fingerprint"]})
        run = tracker.find_run(name, final["fingerprint"], finished=True)
        if run is None:
            if params.points[job.variant].init_from is not None:
                job = with_parent(params, job, ckpt_root)
            print(f"[mlflow] {name}: no run in {tracker.uri}; rebuilt from its checkpoint", flush=True)
            out[name] = adopt_completed(params, tracker, job, final, source, quiet=True)["run_id"]
            if rebuilt is not None:
                rebuilt.add(name)
        else:
            out[name] = run.info.run_id
    return out

