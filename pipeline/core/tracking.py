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
import subprocess
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
    """No MLflow server answers at `tracking.uri` (the message names it and what to do)."""


SERVER_TRIES, SERVER_TIMEOUT_S = 3, 5.0  # a stage's first look: at most ~17 s before it gives up


def check_server(uri: str) -> None:
    """With a tracking server, ask it `/health` before any work (MLflow's own client would retry
    for ~4 minutes, then fail with a traceback); raise TrackingUnreachable when nothing answers.
    A server that answers at all (even an HTTP error: a proxy, auth) counts as there."""
    import urllib.error
    import urllib.request

    if not is_server(uri):
        return
    reason = ""
    for attempt in range(SERVER_TRIES):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S).close()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as err:
            reason = str(getattr(err, "reason", err))
        if attempt + 1 < SERVER_TRIES:
            time.sleep(1.0)
    raise TrackingUnreachable(f"tracking.uri: {uri}: no MLflow server answers ({reason}, {SERVER_TRIES} tries); "
                              "start it (make mlflow-server) or point tracking.uri at one that runs")


class WorkerLog:
    """A train worker's history records, with a tracking server: logged to the run by the worker
    as they are made (the UI's curves move while it trains), then passed on (`forward`, the
    driver's progress display)."""

    def __init__(self, uri: str, run_id: str, forward):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.forward = MlflowClient(tracking_uri=uri), run_id, forward
        self.client.set_tag(run_id, "kvf.logged_by", "worker")

    def __call__(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(record["step"]))
                                                    for k, v in record.items() if k not in ("step", "run")])
        self.forward(record)


def record_sink(job, forward):
    """Where a train worker's history records go: `forward` (the driver's queue), logged to the
    run first when the job names a tracking server's run."""
    return forward if job.mlflow_run_id is None else WorkerLog(job.tracking_uri, job.mlflow_run_id, forward)


class Tracker:
    """The driver's MLflow client."""

    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (found.experiment_id if found is not None
                              else self.client.create_experiment(experiment))
        if found is None or EXPERIMENT_KIND[0] not in found.tags:
            self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        self._last_step: dict[str, int] = {}

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
            history = self.client.get_metric_history(run_id, "train/loss")
            self._last_step[run_id] = max((m.step for m in history), default=0)
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=run_name,
            tags={TAG_RUN: run_name, TAG_FINGERPRINT: fingerprint, **tags})
        self._log_params(run.info.run_id, params)
        self._last_step[run.info.run_id] = 0
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_records(self, run_id: str, records: Iterable[dict]) -> None:
        """History records {"step": s, name: value, ...}; steps already logged are skipped."""
        from mlflow.entities import Metric

        last = self._last_step.get(run_id, 0)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(r["step"])) for r in records if r["step"] > last
                   for k, v in r.items() if k not in ("step", "run")]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[i : i + 900])
        steps = [int(r["step"]) for r in records]
        self._last_step[run_id] = max([last] + steps)

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
