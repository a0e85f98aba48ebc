"""The train stage's driver: one Ray task per variant, progress and MLflow logging in the driver.

- Ray: `compute.ray_address`, else $RAY_ADDRESS (set inside a `ray job submit` job), else a
  local `ray.init` (CPUs from `compute.num_cpus`, temp dir inside the repo, no dashboard).
- GPUs: `gpus_per_job: auto` asks for one per job when the cluster has any; asking for more than
  the cluster has fails at once (Ray would wait forever, silently).
- One job per run: a variant at each of `train.seeds` (`Params.runs()`: the first seed's run is
  named by the variant, the others `<variant>.seed<k>`).
- A run whose fingerprint (resolved config, its seed, the code it runs) matches its completed
  checkpoint is skipped; a partial checkpoint with the same fingerprint is resumed.
- A variant that raises or goes NaN/inf is reported by name and step; the others finish.
Multi-node clusters need `data/` and `checkpoints/` on a filesystem every node sees at the same
path; a single-node cluster (or `ray job submit` to one) needs nothing more.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from pipeline import SOURCE_ROOT, checkpoint
from pipeline.params import Params, Run

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CODE_FILES = ("pipeline/train.py", "pipeline/data.py", "pipeline/tokenizer.py",
              "pipeline/checkpoint.py")


class ComputeError(RuntimeError):
    """The cluster cannot run the jobs as configured (message names the compute.* field)."""


# --------------------------------------------------------------------------- fingerprints
def code_hash() -> str:
    """sha256 over the source the training job runs: models/, kernels/ and the training modules."""
    repo = SOURCE_ROOT
    files = sorted((repo / "models").rglob("*.py"))
    kernels = repo / "kernels"
    if kernels.is_dir():
        files += sorted(kernels.rglob("*.py"))
    files += [repo / f for f in CODE_FILES]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(repo)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def variant_job(params: Params, run: Run, code: str) -> dict:
    """Everything one run (a variant at one seed) depends on, and its fingerprint. The train
    block holds only this run's seed, so adding a seed to the study retrains nothing else."""
    model = params.model_config_for(run.variant).model_dump(mode="json")
    train = {**params.train.model_dump(mode="json"), "seeds": [run.seed]}
    data = params.data.model_dump(mode="json")
    blob = json.dumps({"model": model, "train": train, "data": data, "code": code}, sort_keys=True)
    return {"variant": run.key, "base_variant": run.variant, "seed": run.seed, "model": model,
            "train": train, "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16]}


# --------------------------------------------------------------------------- Ray
# Ray binds AF_UNIX sockets at <temp dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store:
# about 70 bytes below the temp dir, and the kernel allows 107 in all.
_RAY_SOCKET_SUFFIX = 70
_AF_UNIX_MAX = 107


def ray_temp_dir(params: Params, root: Path) -> str:
    """The local Ray's temp dir, as Ray should be given it: `compute.temp_dir` (default
    `runs/ray`, inside the project). When that path is too deep for Ray's socket names, Ray gets
    a short per-project symlink to it (`/tmp/kvf-ray-<hash of the path>`): the session state
    still lives in the project, whatever its depth, and never in $HOME or the shared /tmp/ray."""
    temp_dir = Path(params.compute.temp_dir)
    temp_dir = (temp_dir if temp_dir.is_absolute() else root / temp_dir).resolve()
    temp_dir.mkdir(parents=True, exist_ok=True)
    if len(str(temp_dir)) + _RAY_SOCKET_SUFFIX <= _AF_UNIX_MAX:
        return str(temp_dir)
    link = Path("/tmp") / f"kvf-ray-{hashlib.sha256(str(temp_dir).encode()).hexdigest()[:12]}"
    if not (link.is_symlink() and Path(os.readlink(link)) == temp_dir):
        tmp = link.with_name(f"{link.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(temp_dir, target_is_directory=True)
        os.replace(tmp, link)  # atomic: a stale link to another place is replaced whole
    return str(link)


def connect_ray(params: Params, root: Path):
    import ray

    address = params.compute.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A private cluster that lives as long as the stage: no dashboard, and no auth token
        # written to ~/.ray (Ray 2.60 turns token auth on for every new cluster).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=params.compute.num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=ray_temp_dir(params, root), log_to_driver=True)
    return address or "local"


def as_completed(refs: dict, timeout: float | None = None, on_wait=lambda: None):
    """Yield (name, result) as Ray tasks finish ({ref: name}); a worker that died (OOM, signal)
    becomes {"status": "failed", "step": None, "error": ...}. `on_wait` runs after every wait."""
    import ray

    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
        on_wait()
        for ref in ready:
            name = refs.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 -- the worker died
                result = {"status": "failed", "step": None, "error": f"{type(err).__name__}: {err}"}
            yield name, result


def resolve_gpus(params: Params, resources: dict, where: str) -> int:
    """GPUs per job; raises ComputeError when the cluster cannot satisfy the request."""
    have_gpu, have_cpu = resources.get("GPU", 0), resources.get("CPU", 0)
    want = params.compute.gpus_per_job
    gpus = (1 if have_gpu >= 1 else 0) if want == "auto" else want
    if gpus > have_gpu:
        raise ComputeError(
            f"compute.gpus_per_job: asks for {gpus} GPU(s) per job but the Ray cluster ({where}) "
            f"has {have_gpu:g} GPU(s) (CPU={have_cpu:g}); set it to 'auto' or 0, or use a GPU cluster"
        )
    if params.compute.cpus_per_job > have_cpu:
        raise ComputeError(
            f"compute.cpus_per_job: asks for {params.compute.cpus_per_job} CPUs per job but the "
            f"Ray cluster ({where}) has {have_cpu:g}"
        )
    return gpus


def _train_task(job: dict, queue) -> dict:
    """Runs inside a Ray worker; never raises, so the driver always learns name and step."""
    from pipeline.train import VariantFailed, train_variant

    last = {"step": 0}

    def report(record: dict) -> None:
        last["step"] = record["step"]
        queue.put(record)

    try:
        return train_variant(job, report)
    except VariantFailed as err:
        return {"status": "failed", "step": err.step, "error": str(err)}
    except Exception as err:  # noqa: BLE001 -- any error must come back with the variant's name
        return {"status": "failed", "step": last["step"], "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()}


# --------------------------------------------------------------------------- progress
class Progress:
    """One tqdm bar per variant on a terminal; otherwise a line per variant every ~10 s."""

    def __init__(self, names: list[str], total: int, done: dict[str, int]):
        self.total, self.tty = total, sys.stderr.isatty()
        self.bars, self.last_line = {}, {}
        if self.tty:
            from tqdm import tqdm

            for i, name in enumerate(names):
                self.bars[name] = tqdm(total=total, initial=done.get(name, 0), position=i,
                                       desc=f"{name:>24}", leave=True, dynamic_ncols=True)

    def update(self, record: dict) -> None:
        name, step = record["variant"], record["step"]
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


# --------------------------------------------------------------------------- the stage
def run_training(params: Params, root: Path, data_dir: Path, ckpt_root: Path,
                 metrics_path: Path) -> int:
    """Train every variant that needs it; write `metrics_path`; 0 if all succeeded, else 1."""
    from pipeline import tracking

    code = code_hash()
    jobs = {run.key: variant_job(params, run, code) for run in params.runs()}
    fault = os.environ.get("KVF_FAULT")
    done, todo = {}, []
    for name, job in jobs.items():
        job.update(data_dir=str(data_dir.resolve()), ckpt_dir=str((ckpt_root / name).resolve()),
                   threads=params.compute.cpus_per_job, fault=fault)
        final = checkpoint.load_final_meta(ckpt_root / name)
        if final is not None and final["fingerprint"] == job["fingerprint"]:
            done[name] = final
        else:
            todo.append(name)

    gpus, where = 0, "none"
    if todo:
        import ray

        where = connect_ray(params, root)
        try:
            gpus = resolve_gpus(params, ray.cluster_resources(), where)
        except ComputeError:
            ray.shutdown()
            raise

    # Only now, with every check passed, touch outputs and MLflow.
    if ckpt_root.is_dir():
        for stale in ckpt_root.iterdir():  # variants removed from params.yaml
            if stale.is_dir() and stale.name not in jobs:
                shutil.rmtree(stale)
    tracker = tracking.Tracker(tracking.tracking_uri(params.tracking.uri, root),
                               params.tracking.experiment)
    commit = tracking.git_commit(root)
    results: dict[str, dict] = {}

    def params_of(job):
        return tracking.flatten({"variant": job["base_variant"], "seed": job["seed"], "model": job["model"],
                                 "train": job["train"], "data": params.data.model_dump(mode="json"),
                                 "fingerprint": job["fingerprint"]})

    def tags_of(job):
        return {tracking.TAG_KIND: job["model"]["attention"]["kind"], tracking.TAG_COMMIT: commit,
                tracking.TAG_BASE_VARIANT: job["base_variant"], tracking.TAG_SEED: str(job["seed"])}

    for name, final in done.items():
        job = jobs[name]
        run = tracker.find_run(name, job["fingerprint"], finished=True)
        if run is None:  # e.g. a fresh mlflow.db: rebuild the run from the checkpoint's history
            run_id = tracker.open_run(name, job["fingerprint"], params_of(job), tags_of(job))
            tracker.log_records(run_id, final["history"])
            tracker.log_final(run_id, final["metrics"], final["step"])
            tracker.finish(run_id, ok=True)
        else:
            run_id = run.info.run_id
        results[name] = {"status": "ok", "trained": False, "step": final["step"], "run_id": run_id,
                         "variant": job["base_variant"], "seed": job["seed"], **final["metrics"]}
        print(f"[train] {name}: unchanged since its last completed run, skipped", flush=True)

    failures = []
    if todo:
        import ray
        from ray.util.queue import Queue

        queue = Queue()
        task = ray.remote(_train_task)
        run_ids, refs, started = {}, {}, {}
        for name in todo:
            job = jobs[name]
            latest = checkpoint.load_latest(ckpt_root / name)
            final = checkpoint.load_final_meta(ckpt_root / name)
            stale = (latest is not None and latest.get("fingerprint") != job["fingerprint"]) or (
                final is not None and final.get("fingerprint") != job["fingerprint"])
            if stale:
                shutil.rmtree(ckpt_root / name)
                latest = None
            started[name] = latest["step"] if latest else 0
            run_ids[name] = tracker.open_run(name, job["fingerprint"], params_of(job), tags_of(job))
            if latest:
                tracker.log_records(run_ids[name], latest["history"])
            refs[task.options(num_cpus=params.compute.cpus_per_job, num_gpus=gpus, max_retries=0,
                              name=f"train:{name}").remote({**job, "device": "cuda" if gpus else "cpu"},
                                                            queue)] = name
        print(f"[train] {len(todo)} run(s) on Ray ({where}), {gpus} GPU(s) per job; "
              f"MLflow: {tracker.uri}", flush=True)
        progress = Progress(todo, params.train.steps, started)
        pending_records: dict[str, list] = {name: [] for name in todo}

        def drain():
            while not queue.empty():
                for record in queue.get_nowait_batch(queue.qsize()):
                    pending_records[record["variant"]].append(record)
                    progress.update(record)
            for name, records in pending_records.items():
                if records:
                    tracker.log_records(run_ids[name], records)
                    records.clear()

        try:
            for name, result in as_completed(refs, timeout=1.0, on_wait=drain):
                drain()
                if result["status"] == "ok":
                    tracker.log_final(run_ids[name], result["metrics"], result["step"])
                    tracker.finish(run_ids[name], ok=True)
                    results[name] = {"status": "ok", "trained": True, "step": result["step"],
                                     "run_id": run_ids[name], "variant": jobs[name]["base_variant"],
                                     "seed": jobs[name]["seed"], **result["metrics"]}
                else:
                    tracker.finish(run_ids[name], ok=False, error=result["error"])
                    results[name] = {"status": "failed", "step": result["step"],
                                     "run_id": run_ids[name], "variant": jobs[name]["base_variant"],
                                     "seed": jobs[name]["seed"], "error": result["error"]}
                    failures.append(name)
                    print(f"[train] FAILED variant {name} at step {result['step']}: {result['error']}",
                          file=sys.stderr, flush=True)
                    if result.get("traceback"):
                        print(result["traceback"], file=sys.stderr, flush=True)
        finally:
            progress.close()
            ray.shutdown()

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
    if failures:
        print(f"[train] {len(failures)} run(s) failed: "
              + ", ".join(f"{n} (step {results[n]['step']})" for n in failures), file=sys.stderr)
        return 1
    return 0
