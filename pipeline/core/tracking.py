"""MLflow: one run per variant in one experiment, written by the driver alone (sqlite wants one
writer); with a tracking server (`http://...`) each train worker logs its own run's curve live
(`WorkerLog`) and the driver logs everything else once (params, final metrics, exports, registry,
evaluation, report).

Metric names are shared by every variant so the Compare view lines them up:
train/loss, train/lm_loss, train/mqar_loss, train/lr, train/grad_norm, train/tokens_per_s (per
logged step), val/loss, val/bpb, val/mqar_acc_<bucket> (per eval), model/params,
model/cache_bytes_per_token_at_32k, model/state_bytes_32k (once).
Tags: `kvf.run` (the run's name), `kvf.variant`, `kvf.seed`, `kind`, `kvf.fingerprint`. Runs are
found again by run name + fingerprint, so a resumed or skipped run continues its own MLflow run
instead of starting a new one.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TAG_RUN = "kvf.run"  # a variant at one seed (pipeline.core.jobs)
TAG_VARIANT = "kvf.variant"
TAG_SEED = "kvf.seed"
TAG_KIND = "kind"
TAG_FINGERPRINT = "kvf.fingerprint"
TAG_COMMIT = "git_commit"
# the experiment's kind (MLflow 3.17's UI opens on the mode in its URL instead: `make ui`'s links
# carry `workflowType=machine_learning`, tools/mlflow_ui.py)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def repo_root(start: Path | None = None) -> Path:
    """The repository the run belongs to. Inside `dvc exp run --queue`/`--temp`, DVC works in
    `<repo>/.dvc/tmp/exps/...`: runs must still land in `<repo>`, not in the throwaway copy."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def tracking_uri(configured: str | None, root: Path) -> str:
    """params `tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite at an absolute path."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve()}/mlflow.db"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> {"a.b.0": "value"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(obj)
    return out


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "none") + ("-dirty" if dirty else "")


def source_tags(root: Path) -> dict[str, str]:
    """MLflow's own provenance tags (the UI's Source and Version columns) and ours."""
    commit = git_commit(root)
    return {TAG_COMMIT: commit, "mlflow.source.git.commit": commit.removesuffix("-dirty"),
            "mlflow.source.type": "PROJECT", "mlflow.source.name": str(root.resolve())}


def is_server(uri: str) -> bool:
    """A tracking server takes writers in parallel (sqlite wants one): workers may log."""
    return uri.startswith(("http://", "https://"))


class TrackingUnreachable(RuntimeError):
    """No MLflow server answers at `tracking.uri` (the message names it and what to do; `reason`:
    the last error, as the socket said it)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


SERVER_TRIES, SERVER_TIMEOUT_S = 3, 5.0  # a stage's first look: at most ~17 s before it gives up


def check_server(uri: str, tries: int = SERVER_TRIES) -> None:
    """With a tracking server, ask it `/health` before any work (MLflow's own client would retry
    for ~4 minutes, then fail with a traceback); raise TrackingUnreachable when nothing answers.
    A server that answers at all (even an HTTP error: a proxy, auth) counts as there."""
    import urllib.error
    import urllib.request

    if not is_server(uri):
        return
    reason = ""
    for attempt in range(tries):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S).close()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as err:
            reason = str(getattr(err, "reason", err))
        if attempt + 1 < tries:
            time.sleep(1.0)
    raise TrackingUnreachable(f"tracking.uri: {uri}: no MLflow server answers ({reason}, {tries} tries); "
                              "start it (make mlflow-server) or point tracking.uri at one that runs", reason)


def retry_bound_s() -> float:
    """How long MLflow's client keeps retrying one request to a server that does not answer before
    it raises: its waits between tries (urllib3's backoff: 0, then factor x 2^k, at most 120 s
    each) plus their jitter, from MLflow's own settings (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7;
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, default 2; MLFLOW_HTTP_REQUEST_BACKOFF_JITTER, default 1):
    about 4 minutes by default."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    tries, factor = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    waits = [0.0] + [min(factor * 2.0**k, 120.0) for k in range(1, tries)] if tries > 0 else []
    return sum(waits) + max(tries - 1, 0) * MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get()  # no jitter on the first


def lost_server(uri: str) -> str | None:
    """After a stage failed: a line saying the tracking server stopped answering, when it did
    (one look at `/health`), else None (the failure was something else)."""
    if not is_server(uri):
        return None
    try:
        check_server(uri, tries=1)
        return None
    except TrackingUnreachable as err:
        reason = err.reason
    return (f"tracking.uri: {uri}: the MLflow server stopped answering while the stage ran ({reason}), and "
            f"MLflow's client gave up after its retries (about {retry_bound_s():.0f} s: "
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR); what the stage finished is "
            "kept on disk: start the server again, then make repro logs it")


class WorkerLog:
    """A train worker's history records, with a tracking server: logged to the run by the worker
    as they are made (the UI's curves move while it trains), then passed on (`forward`, the
    driver's progress display). A server that goes away stalls a log call while MLflow's client
    retries (`retry_bound_s`); one still gone after that stops the live logging, not the run: the
    driver logs what is missing when the run ends (`Tracker.fill_history`)."""

    def __init__(self, uri: str, run_id: str, forward):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.forward = MlflowClient(tracking_uri=uri), run_id, forward
        self.uri, self.lost = uri, False
        self.client.set_tag(run_id, "kvf.logged_by", "worker")

    def __call__(self, record: dict) -> None:
        from mlflow.entities import Metric

        if not self.lost:
            now = int(time.time() * 1000)
            try:
                self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(record["step"]))
                                                            for k, v in record.items() if k not in ("step", "run")])
            except Exception as err:  # noqa: BLE001 (MlflowException, requests' errors): tracking, not training
                self.lost = True
                print(f"[train] {record.get('run', '')}: tracking.uri {self.uri} stopped answering at step "
                      f"{record['step']} ({type(err).__name__}); the run goes on, its curve is logged when it "
                      "ends", file=sys.stderr, flush=True)
        self.forward(record)


def record_sink(job, forward):
    """Where a train worker's history records go: `forward` (the driver's queue), logged to the
    run first when the job names a tracking server's run."""
    return forward if job.mlflow_run_id is None else WorkerLog(job.tracking_uri, job.mlflow_run_id, forward)


TAG_STUDY = "kvf.study"  # on the experiment: the study (repository) that owns it
STUDY_FILE = Path("runs") / "study-id"


def study_id(root: Path) -> str:
    """This study's id: $KVF_STUDY (a `ray job submit` copy of a study passes its own), else
    `runs/study-id` in the repository, made at first use. Two clones of one project are two
    studies; a copied folder keeps its id (delete the file in the copy to make it one of its own)."""
    if os.environ.get("KVF_STUDY"):
        return os.environ["KVF_STUDY"]
    path = Path(root) / STUDY_FILE
    if not path.exists():
        import uuid

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(uuid.uuid4().hex[:16] + "\n")
        try:
            os.link(tmp, path)  # first writer wins: two stages at once agree on one id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


class StudyConflict(RuntimeError):
    """The experiment belongs to another study on this tracking store (the message names both)."""


def own_experiment(found, uri: str, experiment: str, study: str) -> None:
    """Raise StudyConflict when `found` (an MLflow experiment, or None) is another study's."""
    owner = found.tags.get(TAG_STUDY) if found is not None else None
    if owner is not None and owner != study:
        where = found.tags.get("kvf.study_root", "another repository")
        raise StudyConflict(
            f"tracking.experiment: {experiment!r} on {uri} belongs to another study ({where}, study id {owner}; "
            f"this one is {study}): give this study an experiment of its own (tracking.experiment), so neither's "
            "runs, metrics or registered models mix into the other's; nothing was changed")


def check_study(uri: str, experiment: str, root: Path) -> None:
    """Before any work: StudyConflict when the study's experiment is another study's."""
    from mlflow.tracking import MlflowClient

    own_experiment(MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment), uri, experiment, study_id(root))


def registered_name(experiment: str, run: str) -> str:
    """A run's registered model: `<experiment>.<run>` (the registry is the server's, not the
    experiment's: two studies sharing a server each keep their own names)."""
    return f"{experiment}.{run}".replace("/", "_").replace(":", "_")


def shared_store(configured: str | None, root: Path) -> str | None:
    """The tracking store named by params or $MLFLOW_TRACKING_URI when other studies may use it (a
    server, or a sqlite file outside the repository), else None: the study's own store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).resolve().is_relative_to(
            Path(root).resolve()):
        return None
    return uri


class Tracker:
    """The driver's MLflow client, on the study's experiment. On a shared store (`study`: this
    study's id) the experiment is claimed for the study when made, and StudyConflict is raised
    when it is another study's."""

    def __init__(self, uri: str, experiment: str, study: str | None = None, root: Path | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if study is not None:
            own_experiment(found, uri, experiment, study)
        self.experiment_id = (found.experiment_id if found is not None
                              else self.client.create_experiment(experiment))
        if found is None or EXPERIMENT_KIND[0] not in found.tags:
            self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        if study is not None and (found is None or TAG_STUDY not in found.tags):
            self.client.set_experiment_tag(self.experiment_id, TAG_STUDY, study)
            self.client.set_experiment_tag(self.experiment_id, "kvf.study_root",
                                           f"{socket.gethostname()}:{Path(root or repo_root()).resolve()}")
        self._logged: dict[str, set[int]] = {}  # run id -> the history steps the run has

    @classmethod
    def for_study(cls, params, root: Path) -> "Tracker":
        shared = shared_store(params.tracking.uri, root)
        return cls(tracking_uri(params.tracking.uri, root), params.tracking.experiment,
                   study_id(root) if shared else None, root)

    def find_run(self, run: str, fingerprint: str, finished: bool | None = None):
        query = f"tags.`{TAG_RUN}` = '{run}' and tags.`{TAG_FINGERPRINT}` = '{fingerprint}'"
        if finished is not None:
            query += " and attributes.status " + ("= 'FINISHED'" if finished else "!= 'FINISHED'")
        runs = self.client.search_runs([self.experiment_id], query,
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def open_run(self, run_name: str, fingerprint: str, params: dict[str, str],
                 tags: dict[str, str]) -> str:
        """The run's unfinished MLflow run with this fingerprint (resume), else a new one."""
        run = self.find_run(run_name, fingerprint, finished=False)
        if run is not None:
            run_id = run.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self._logged[run_id] = self._logged_steps(run_id)
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=run_name,
            tags={TAG_RUN: run_name, TAG_FINGERPRINT: fingerprint, **tags})
        self._log_params(run.info.run_id, params)
        self._logged[run.info.run_id] = set()
        return run.info.run_id

    def _logged_steps(self, run_id: str) -> set[int]:
        """Every history record has train/loss (a logging step) or val/objective (an evaluation), and
        is logged in one batch."""
        return {m.step for key in ("train/loss", "val/objective") for m in self.client.get_metric_history(run_id, key)}

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_records(self, run_id: str, records: Iterable[dict]) -> None:
        """History records {"step": s, name: value, ...}; steps already logged are skipped."""
        from mlflow.entities import Metric

        logged = self._logged.setdefault(run_id, set())
        now = int(time.time() * 1000)
        todo = [r for r in records if int(r["step"]) not in logged]
        metrics = [Metric(k, float(v), now, int(r["step"])) for r in todo for k, v in r.items()
                   if k not in ("step", "run")]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[i : i + 900])
        logged.update(int(r["step"]) for r in todo)

    def fill_history(self, run_id: str, records: Iterable[dict]) -> int:
        """The records a worker logging live did not get to the server (it went away for longer
        than the client retries), logged now; how many."""
        self._logged[run_id] = have = self._logged_steps(run_id)
        missing = [r for r in records if int(r["step"]) not in have]
        self.log_records(run_id, missing)
        return len(missing)

    def log_final(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                               for k, v in sorted(metrics.items())
                                               if k.startswith("model/")])

    def finish(self, run_id: str, ok: bool, error: str | None = None) -> None:
        if error:
            self.client.set_tag(run_id, "error", error[:5000])
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def run_url(self, run_id: str) -> str:
        return f"{self.uri} experiment {self.experiment_id} run {run_id}"
