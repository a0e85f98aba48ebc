"""Ray for every stage: connect (local or a cluster), check resources, submit one task per run,
collect results as they finish, and turn any failure into a result that names its run.

- Address: `compute.ray_address`, else $RAY_ADDRESS (set inside a `ray job submit` job), else a
  private local Ray that lives as long as the stage (CPUs from `compute.num_cpus`, temp dir in
  the project, no dashboard). A cluster we are given keeps its own auth settings.
- The private local Ray is closed: every process of it listens on 127.0.0.1 only, and token
  authentication is on with a fresh token per start, kept in `<compute.temp_dir>/auth/` (mode
  0600, removed at shutdown; never ~/.ray), whatever RAY_AUTH_MODE the caller's shell exports.
- GPUs: `gpus_per_job: auto` asks for one per job when the cluster has any; asking for more
  than the cluster has fails at once (Ray itself would wait forever, silently). A job holding a
  GPU computes on CUDA unless `compute.device` is cpu (how the tests exercise GPU scheduling on
  a local Ray that declares GPUs, `compute.num_gpus`, on a machine without any).
- Custom resources (`compute.resources`, the train stage's jobs only) pin jobs to the nodes that
  declare them; a cluster without them fails at once too, naming the field.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
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


def project_temp_dir(compute, root: Path) -> Path:
    """`compute.temp_dir` (default `runs/ray`, relative to the project), resolved and created."""
    temp_dir = Path(compute.temp_dir)
    temp_dir = (temp_dir if temp_dir.is_absolute() else root / temp_dir).resolve()
    temp_dir.mkdir(parents=True, exist_ok=True)
    return temp_dir


def ray_temp_dir(compute, root: Path) -> str:
    """The local Ray's temp dir, as Ray should be given it: `compute.temp_dir` (default
    `runs/ray`, inside the project). When that path is too deep for Ray's socket names, Ray gets
    a short per-project symlink to it (`/tmp/kvf-ray-<hash of the path>`): the session state
    still lives in the project, whatever its depth, and never in $HOME or the shared /tmp/ray."""
    temp_dir = project_temp_dir(compute, root)
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
    workers = compute.workers_per_run
    for kind, per_worker, have in (("CPU", compute.cpus_per_job, have_cpu), ("GPU", gpus, have_gpu)):
        if workers > 1 and workers * per_worker > have:
            raise ComputeError(
                f"compute.workers_per_run: {workers} workers x {per_worker} {kind}(s) per run but the "
                f"Ray cluster ({where}) has {have:g} {kind}(s); lower it or use a bigger cluster")
    return gpus


def check_resources(compute, have: dict, where: str) -> None:
    """Raise ComputeError unless the cluster declares the custom resources `compute.resources`
    asks for (Ray would keep the jobs pending forever, silently)."""
    workers = compute.workers_per_run
    for name, amount in compute.resources.items():
        if workers * amount > have.get(name, 0):
            declared = sorted(k for k in have if k not in ("CPU", "GPU", "memory", "object_store_memory")
                              and not k.startswith("node:"))
            raise ComputeError(
                f"compute.resources: {name}={amount:g} per train job" + (f" x {workers} workers" if workers > 1 else "")
                + f" but the Ray cluster ({where}) has {have.get(name, 0):g} of it (its custom resources: "
                f"{', '.join(declared) or 'none'}); start a node with ray start --resources "
                f"'{{\"{name}\": ...}}', or drop it")


class Cluster(BaseModel):
    """Where the jobs run: `where` ("local" or the address), the GPUs each job gets and the
    torch device its work uses ("cuda" when it holds a GPU, unless `compute.device` is cpu)."""

    where: str
    gpus_per_job: int
    device: str = "cpu"

    @classmethod
    def of(cls, compute, where: str, gpus: int) -> "Cluster":
        return cls(where=where, gpus_per_job=gpus, device="cuda" if gpus and compute.device == "auto" else "cpu")


@contextmanager
def cluster(compute, root: Path, custom: bool = False) -> Iterator[Cluster]:
    """Connect to Ray and check the request against its resources (with `custom`, the custom
    resources of `compute.resources` too: the train stage's jobs ask for them); shut down on the
    way out."""
    import ray

    def check(where: str) -> Cluster:
        have = ray.cluster_resources()
        if custom:
            check_resources(compute, have, where)
        return Cluster.of(compute, where, resolve_gpus(compute, have, where))

    address = compute.ray_address or os.environ.get("RAY_ADDRESS")
    if address:  # the user's cluster: its auth (token or not) is the user's to set
        ray.init(address=address, log_to_driver=True)
        try:
            yield check(address)
        finally:
            ray.shutdown()
        return
    temp_dir = ray_temp_dir(compute, root)
    try:
        with _closed_local_ray(project_temp_dir(compute, root) / "auth"):
            ray.init(num_cpus=compute.num_cpus or os.cpu_count(), num_gpus=compute.num_gpus,
                     include_dashboard=False, _node_ip_address=LOOPBACK, _temp_dir=temp_dir,
                     log_to_driver=True)
            try:
                yield check("local")
            finally:
                ray.shutdown()
    finally:
        _prune_sessions(Path(temp_dir))


LOOPBACK = "127.0.0.1"
# What the private local Ray reads from the environment (its children inherit it at spawn).
_LOCAL_RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


@contextmanager
def _closed_local_ray(auth_dir: Path) -> Iterator[Path]:
    """Environment of a private local Ray, restored (and the token removed) on the way out.

    Token auth (Ray 2.60): RAY_AUTH_MODE=token; the token is read by the C++
    AuthenticationTokenLoader from $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token (written by ray.init when none is found). A fresh token goes to a 0600 file
    under `auth_dir` and RAY_AUTH_TOKEN_PATH names it; a caller's RAY_AUTH_TOKEN (meant for some
    other cluster, and first in that order) is set aside. GCS, raylet and workers inherit this.

    Loopback (Ray 2.60): the GCS, raylet (node manager, object manager), core workers, driver
    and agents bind 127.0.0.1 when the node IP is a localhost address, and all interfaces
    otherwise (measured for the C++ servers; the agents: ray/dashboard/agent.py:165,
    ray/dashboard/modules/reporter/reporter_agent.py:534). But ray.init(_node_ip_address=
    "127.0.0.1") passes it through `services.resolve_ip_for_localhost`
    (ray/_private/worker.py:1844), which swaps a localhost address for the machine's routable
    IP unless `ray_constants.ENABLE_RAY_CLUSTER` is false (ray/_private/services.py:799, :815);
    that flag is read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when Ray is imported, so it is set
    both ways here (the attribute for this process, the variable for Ray's children)."""
    import ray._private.ray_constants as ray_constants

    saved_env = {var: os.environ.get(var) for var in _LOCAL_RAY_ENV}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    token = _write_token(auth_dir)
    try:
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                          RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        ray_constants.ENABLE_RAY_CLUSTER = False
        _reload_ray_auth()
        yield token
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        _reload_ray_auth()  # config first, then the cached token, then the file (as Ray's tests do)
        token.unlink(missing_ok=True)


def _write_token(auth_dir: Path) -> Path:
    """A fresh 256-bit token (Ray's own format) in `auth_dir/token.<pid>`, mode 0600."""
    auth_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(auth_dir, 0o700)
    path = auth_dir / f"token.{os.getpid()}"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(secrets.token_hex(32))
    return path


def _reload_ray_auth() -> None:
    """Make this process see the auth environment now (RayConfig and the token are cached)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _prune_sessions(temp_dir: Path) -> None:
    """A local Ray leaves a session folder per start (logs, sockets): keep the newest few."""
    sessions = sorted(p for p in temp_dir.glob("session_2*") if p.is_dir() and not p.is_symlink())
    for old in sessions[:-KEEP_SESSIONS]:
        shutil.rmtree(old, ignore_errors=True)


def guarded(fn: Callable[..., dict], job, *args) -> dict:
    """Run one job in a Ray worker; never raises, so the driver always learns which run failed.
    Success: {"status": "ok", **fn(job, ...)}. Failure: status "failed", the error (and its type's
    name), its traceback and the step it happened at when the error carries one."""
    try:
        return {"status": "ok", **fn(job, *args)}
    except Exception as err:  # noqa: BLE001 -- any error comes back with its run's name
        step = getattr(err, "step", None)  # a failure the job itself diagnosed says so in words
        return {"status": "failed", "step": step, "error_type": type(err).__name__,
                "error": str(err) if step is not None else f"{type(err).__name__}: {err}",
                "traceback": "" if step is not None else traceback.format_exc()}


def submit(fn: Callable[..., dict], jobs: dict[str, Any], stage: str, cpus: int, gpus: int,
           *args, resources: dict[str, float] | None = None, retries: int = 0,
           needs: dict[str, float] | None = None) -> dict:
    """One Ray task per job (`guarded(fn, job, *args)`), each holding `cpus`, `gpus` and the
    custom `resources`; returns {ref: name}. A task whose worker dies (killed, out of memory, its
    node gone) is run again by Ray up to `retries` times (an error the job raises is a result,
    never retried); a train job resumes from its last checkpoint. `needs`: what one node must
    have for the job's work when the task itself holds less (a Ray Train run's workers)."""
    import ray

    task = ray.remote(guarded)
    need = {k: float(v) for k, v in (needs or {"CPU": cpus, "GPU": gpus, **(resources or {})}).items() if v}
    refs = {task.options(num_cpus=cpus, num_gpus=gpus, resources=resources or {}, max_retries=retries,
                         name=f"{stage}:{name}")
            .remote(fn, job, *args): name for name, job in jobs.items()}
    NEEDS.update({ref: need for ref in refs})
    return refs


NEEDS: dict = {}  # ref -> the resources its task asks for (submit), read by `stranded`


def _live_nodes() -> tuple[list[dict], list[dict]]:
    import ray

    nodes = ray.nodes()
    return [n for n in nodes if n.get("Alive")], [n for n in nodes if not n.get("Alive")]


def stranded(need: dict[str, float], live: list[dict]) -> bool:
    """True when no live node has `need` in all (busy nodes are not stranding: their jobs end)."""
    return not any(all(node.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items()) for node in live)


def _stranded_result(need: dict, live: list[dict], lost: list[dict], after_s: float, where: str) -> dict:
    wants = ", ".join(f"{k}={v:g}" for k, v in sorted(need.items()))
    gone = "; ".join(f"node {n.get('NodeManagerAddress', '?')} ("
                     + ", ".join(f"{k}={v:g}" for k, v in sorted(n.get("Resources", {}).items())
                                 if not k.startswith("node:") and k not in ("memory", "object_store_memory"))
                     + ")" for n in lost)
    return {"status": "failed", "step": None, "error_type": "Stranded",
            "error": f"nothing left to run it on: it needs {wants} and none of the {len(live)} live node(s) of "
                     f"the Ray cluster ({where}) has that" + (f" (lost: {gone})" if gone else "")
                     + f"; waited {after_s:g} s (compute.stranded_after_s): start a node that can take it, then "
                     "run it again (a train run resumes from its last checkpoint)"}


def as_completed(refs: dict, timeout: float | None = None, on_wait: Callable[[], None] = lambda: None,
                 stranded_after_s: float = 0.0, where: str = "") -> Iterator[tuple[str, dict]]:
    """Yield (name, result) as tasks finish; a worker that died (OOM, signal) becomes a failed
    result. `on_wait` runs after every wait (the train stage drains its progress queue there).
    With `stranded_after_s`, a task no live node can run (`stranded`: its node lost, nothing
    else with its resources) for that long is cancelled and comes back failed, naming what it
    needs and the nodes lost: the stage ends with a line instead of waiting forever."""
    import ray

    since: dict = {}  # ref -> when it was first seen stranded
    checked = 0.0
    wait = timeout if not stranded_after_s else min(timeout or 1.0, 1.0)
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=wait)
        on_wait()
        for ref in ready:
            name = refs.pop(ref)
            NEEDS.pop(ref, None)
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 -- the worker died
                result = {"status": "failed", "step": None, "error": f"{type(err).__name__}: {err}"}
            yield name, result
        if stranded_after_s and refs and time.monotonic() - checked >= 1.0:
            checked = now = time.monotonic()
            live, lost = _live_nodes()
            for ref in list(refs):
                need = NEEDS.get(ref, {})
                if not stranded(need, live):
                    since.pop(ref, None)
                elif now - since.setdefault(ref, now) >= stranded_after_s:
                    ray.cancel(ref, force=True)
                    NEEDS.pop(ref, None)
                    yield refs.pop(ref), _stranded_result(need, live, lost, stranded_after_s, where)
