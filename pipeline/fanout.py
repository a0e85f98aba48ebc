"""Ray for every stage: connect (local or a cluster), check resources, submit one task per run,
collect results as they finish, and turn any failure into a result that names its run.

- Address: `compute.ray_address`, else $RAY_ADDRESS (set inside a `ray job submit` job), else a
  private local Ray that lives as long as the stage (CPUs from `compute.num_cpus`, temp dir in
  the project, no dashboard, no auth token written to ~/.ray).
- GPUs: `gpus_per_job: auto` asks for one per job when the cluster has any; asking for more
  than the cluster has fails at once (Ray itself would wait forever, silently).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

KEEP_SESSIONS = 2  # a local Ray's newest session folders (their logs) kept in the temp dir

# Ray binds AF_UNIX sockets at <temp dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store:
# about 70 bytes below the temp dir, and the kernel allows 107 in all.
_RAY_SOCKET_SUFFIX = 70
_AF_UNIX_MAX = 107


class ComputeError(RuntimeError):
    """The cluster cannot run the jobs as configured (the message names the compute.* field)."""


def ray_temp_dir(compute, root: Path) -> str:
    """The local Ray's temp dir, as Ray should be given it: `compute.temp_dir` (default
    `runs/ray`, inside the project). When that path is too deep for Ray's socket names, Ray gets
    a short per-project symlink to it (`/tmp/kvf-ray-<hash of the path>`): the session state
    still lives in the project, whatever its depth, and never in $HOME or the shared /tmp/ray."""
    temp_dir = Path(compute.temp_dir)
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


def resolve_gpus(compute, resources: dict, where: str) -> int:
    """GPUs per job; raises ComputeError when the cluster cannot satisfy the request."""
    have_gpu, have_cpu = resources.get("GPU", 0), resources.get("CPU", 0)
    want = compute.gpus_per_job
    gpus = (1 if have_gpu >= 1 else 0) if want == "auto" else want
    if gpus > have_gpu:
        raise ComputeError(
            f"compute.gpus_per_job: asks for {gpus} GPU(s) per job but the Ray cluster ({where}) "
            f"has {have_gpu:g} GPU(s) (CPU={have_cpu:g}); set it to 'auto' or 0, or use a GPU cluster"
        )
    if compute.cpus_per_job > have_cpu:
        raise ComputeError(
            f"compute.cpus_per_job: asks for {compute.cpus_per_job} CPUs per job but the "
            f"Ray cluster ({where}) has {have_cpu:g}"
        )
    return gpus


class Cluster(BaseModel):
    """Where the jobs run: `where` ("local" or the address) and the GPUs each job gets."""

    where: str
    gpus_per_job: int


@contextmanager
def cluster(compute, root: Path) -> Iterator[Cluster]:
    """Connect to Ray and check the request against its resources; shut down on the way out."""
    import ray

    address = compute.ray_address or os.environ.get("RAY_ADDRESS")
    temp_dir = None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        temp_dir = ray_temp_dir(compute, root)
        ray.init(num_cpus=compute.num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=temp_dir, log_to_driver=True)
    try:
        where = address or "local"
        yield Cluster(where=where, gpus_per_job=resolve_gpus(compute, ray.cluster_resources(), where))
    finally:
        ray.shutdown()
        if temp_dir is not None:
            _prune_sessions(Path(temp_dir))


def _prune_sessions(temp_dir: Path) -> None:
    """A local Ray leaves a session folder per start (logs, sockets): keep the newest few."""
    sessions = sorted(p for p in temp_dir.glob("session_2*") if p.is_dir() and not p.is_symlink())
    for old in sessions[:-KEEP_SESSIONS]:
        shutil.rmtree(old, ignore_errors=True)


def guarded(fn: Callable[..., dict], job, *args) -> dict:
    """Run one job in a Ray worker; never raises, so the driver always learns which run failed.
    Success: {"status": "ok", **fn(job, ...)}. Failure: status "failed", the error, its
    traceback and the step it happened at when the error carries one."""
    try:
        return {"status": "ok", **fn(job, *args)}
    except Exception as err:  # noqa: BLE001 -- any error comes back with its run's name
        step = getattr(err, "step", None)  # a failure the job itself diagnosed says so in words
        return {"status": "failed", "step": step,
                "error": str(err) if step is not None else f"{type(err).__name__}: {err}",
                "traceback": "" if step is not None else traceback.format_exc()}


def submit(fn: Callable[..., dict], jobs: dict[str, Any], stage: str, cpus: int, gpus: int,
           *args) -> dict:
    """One Ray task per job (`guarded(fn, job, *args)`), never retried; returns {ref: name}."""
    import ray

    task = ray.remote(guarded)
    return {task.options(num_cpus=cpus, num_gpus=gpus, max_retries=0, name=f"{stage}:{name}")
            .remote(fn, job, *args): name for name, job in jobs.items()}


def as_completed(refs: dict, timeout: float | None = None,
                 on_wait: Callable[[], None] = lambda: None) -> Iterator[tuple[str, dict]]:
    """Yield (name, result) as tasks finish; a worker that died (OOM, signal) becomes a failed
    result. `on_wait` runs after every wait (the train stage drains its progress queue there)."""
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
