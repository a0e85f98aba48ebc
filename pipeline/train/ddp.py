"""One run across N workers (`compute.workers_per_run: N > 1`): Ray Train's `TorchTrainer`, DDP
over gloo on CPU or NCCL on GPU, running the very loop a one-process run runs
(`pipeline.train.loop.train_run`) with `DataParallel` in place of `OneProcess`.

- Every step's global batch is the same pure function of (seed, step) as for N = 1; worker r
  takes rows r, r + N, ... of it and DDP averages the gradients, so the loss curve equals
  N = 1's up to float rounding (the losses a record logs are averaged over the workers).
- Checkpoints go through Ray Train: at every `checkpoint_every` steps rank 0 writes the usual
  checkpoint folder (`pipeline.core.checkpoint`: safetensors + JSON, digests) into a fresh temporary
  folder and reports it (`ray.train.report`); Ray Train keeps it under
  `compute.storage/<run>-<fingerprint>`. A worker that dies brings the group back from the
  latest one (`FailureConfig(max_failures)`); a stage killed whole resumes there on its next
  run (same name, same storage: Ray Train restores it).
- When the run ends its final checkpoint is copied into `checkpoints/<run>`, where export and
  evaluate read it like any other; with `compute.storage` a URI (no shared filesystem) Ray Train
  keeps its checkpoints there, each worker reads the data from its node's copy
  (`pipeline.core.storage.fetch_prepared`) and the final checkpoint goes to the run's folder in
  storage, from which the driver brings it back.
- Preemption: the stage asks the run to stop through a marker in its folder in storage
  (`request_stop`; no signal reaches the workers' loops), every worker stops after the same step,
  rank 0 reports that step's checkpoint (the logging window's sums averaged over the workers) and
  `fit_run` raises `Preempted`; the next stage's Ray Train resumes there
  (pipeline/train/preempt.py).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core import checkpoint, storage
from pipeline.core.jobs import TrainJob


class DataParallel:
    """`OneProcess`'s interface for one of N Ray Train workers."""

    def __init__(self, job: TrainJob, store: storage.Storage, fault_marker: str, stop_marker: str):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.store, self.fault_marker, self.stop_marker = store, fault_marker, stop_marker
        self.device, self._look_after = None, 0.0

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        self.device = device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device])

    def stop_requested(self) -> bool:
        """Whether the stage asked this run to stop (its stop marker in storage, `request_stop`):
        rank 0 looks, at most every half second, and every worker takes its answer at the same
        step (a broadcast each step, as small as a loss)."""
        import torch
        import torch.distributed as dist

        asked = 0
        if self.rank == 0 and time.monotonic() >= self._look_after:
            self._look_after = time.monotonic() + 0.5
            asked = int(self.store.exists(self.stop_marker))
        flag = torch.tensor([asked], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def shard(self, rows: np.ndarray) -> np.ndarray:
        return rows[self.rank :: self.world]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        keys = sorted(values)
        total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return dict(zip(keys, (total / self.world).tolist()))

    def resume(self, job: TrainJob, model, optimizer) -> tuple[int, list, dict]:
        """(step, history, the logging window's sums averaged over the workers when it was saved)."""
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            return 0, [], {}
        with found.as_directory() as folder:
            meta = checkpoint.restore(Path(folder), model, optimizer)  # digests verified
        return meta["step"], meta["history"], meta.get("window", {})

    def save(self, step: int, model, optimizer, meta: dict, final: dict | None = None) -> None:
        """Every worker reports; rank 0's report carries the checkpoint."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="kvf-ckpt-") as folder:
            saved = None
            if self.rank == 0:
                checkpoint.save(Path(folder), step, model, optimizer, meta)
                if final is not None:
                    checkpoint.save_final(Path(folder), model, final)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"step": step}, checkpoint=saved)

    def hold(self) -> None:
        """Test hook (`<run>:<step>:hold`): rank 0 says it holds (`holding` in the run's folder)
        and waits there, up to 5 minutes, for the stage's stop request; the others wait on it in
        the step's gradient all-reduce. A SIGTERM to the stage then lands at a known step."""
        if self.rank == 0:
            self.store.put_bytes(self.stop_marker.rsplit("/", 1)[0] + "/holding", b"holding\n")
            deadline = time.monotonic() + 300
            while not self.store.exists(self.stop_marker) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._look_after = 0.0  # seen: this step's check takes it

    def kill(self) -> None:
        """Test hook (`<run>:<step>:kill`): the last worker dies once, as if its node went."""
        if self.rank == self.world - 1 and not self.store.exists(self.fault_marker):
            self.store.put_bytes(self.fault_marker, b"killed once\n")
            os._exit(1)


def _worker(config: dict) -> None:
    """Ray Train's loop on each worker."""
    import ray.train.torch

    from pipeline.core import tracking
    from pipeline.train.loop import Preempted, train_run

    job = TrainJob.model_validate(config["job"])
    job = job.model_copy(update={"device": str(ray.train.torch.get_device()) if job.device == "cuda" else "cpu"})
    store = storage.Storage(config["storage"])
    if job.storage is not None:  # no shared filesystem: this node's copy of the data
        job = job.model_copy(update={"data_dir": str(storage.fetch_prepared(store, job.storage.data,
                                                                            storage.node_cache()))})
    parallel = DataParallel(job, store, config["fault_marker"], config["stop_marker"])
    try:
        if parallel.rank == 0:  # the one that reports
            train_run(job, tracking.record_sink(job, config["queue"].put), parallel)
        else:
            train_run(job, parallel=parallel)
    except Preempted:  # asked to stop: that step's checkpoint is reported; fit_run tells the stage
        return


def storage_name(job: TrainJob) -> str:
    """The run's folder in `compute.storage`: a changed config starts a folder of its own."""
    return f"{job.run}-{job.fingerprint[:12]}"


def _stop_marker(job: TrainJob) -> str:
    return f"{storage_name(job)}/stop-requested"


def clear_stop(job: TrainJob, location: str) -> None:
    """Before the run starts: a stop asked of an earlier attempt is not this one's."""
    storage.Storage(location).remove(_stop_marker(job))


def request_stop(job: TrainJob, location: str, why: str) -> None:
    """The stage's stop request to a data-parallel run (its workers' loops run on threads where
    no signal reaches them): the marker in storage that `DataParallel.stop_requested` looks for."""
    storage.Storage(location).put_bytes(_stop_marker(job), f"{why}\n".encode())


def fit_run(job: TrainJob, queue, workers: int, cpus: int, gpus: int, custom: dict[str, float], location: str,
            max_failures: int) -> dict:
    """In a Ray task (no resources of its own): train `job` on `workers` Ray Train workers (each
    holding `cpus`, `gpus` and the `custom` resources; checkpoints in `location`, compute.storage),
    then copy its final checkpoint into `job.ckpt_dir`, or with `job.storage` into the run's folder
    there. Returns what `train_run` returns. When the stage asks the run to stop (`request_stop`)
    the workers stop after the same step and report its checkpoint
    (`DataParallel.stop_requested`), and this raises `Preempted` with that step."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import Preempted

    name, store, stop_marker = storage_name(job), storage.Storage(location), _stop_marker(job)
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job.model_dump(mode="json"), "queue": queue, "storage": location,
                           "fault_marker": f"{name}/fault-fired", "stop_marker": stop_marker},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=location, failure_config=FailureConfig(max_failures=max_failures)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        final = checkpoint.load_final_meta(Path(folder))  # digests verified
        if final is None:  # its workers stopped on the stage's request before the last step
            step, why = checkpoint.load_latest(Path(folder))["step"], store.read_bytes(stop_marker) or b"?"
            raise Preempted(step, f"preempted ({why.decode().strip()}): its step-{step} checkpoint is written")
        if job.storage is not None:
            store.put_dir(Path(folder), job.storage.checkpoints)
        else:
            incoming = Path(job.ckpt_dir + ".incoming")
            shutil.rmtree(incoming, ignore_errors=True)
            shutil.copytree(folder, incoming)
            shutil.rmtree(job.ckpt_dir, ignore_errors=True)
            os.replace(incoming, job.ckpt_dir)
    return {"step": final["step"], "metrics": final["metrics"], "history": final["history"]}
