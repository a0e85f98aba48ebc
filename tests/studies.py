"""A tiny project (params + prepared data) in a temp dir, the tiny study trained once for the
tests that start from a trained study, and helpers to run stages in it: what the stage-level tests
share (tests/stages, tests/tools, and tests/pipeline's that run a stage). The fixtures are
imported by tests/conftest.py, so every test folder sees them."""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.ray_node import SHARED
from tests.stage_zygote import Zygotes

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "data": {
        "seed": 7,
        "validation_plays": ["julius_caesar"],
        "heldout_plays": ["macbeth"],
        "mqar": {"seq_len": 32, "num_pairs": 2, "pair_tokens": 1, "num_keys": 4, "num_values": 4,
                 "num_fillers": 8, "train_gaps": [2, 24], "eval_gaps": {"near": [2, 6], "far": [12, 24]},
                 "num_train": 128, "num_eval": 16},
        "retrieval": {"tasks": ["passkey"], "context_lengths": [256], "distances": [0.5],
                      "episodes_per_cell": 1, "num_distractors": 0},
    },
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2},
    "variants": {"mha": {"kind": "mha"}, "swa": {"kind": "swa", "window": 4}},
    "train": {"steps": 30, "seq_len": 32, "batch_size": 2, "mqar_batch_size": 4, "warmup_steps": 3,
              "log_every": 5, "eval_every": 10, "val_batches": 1, "checkpoint_every": 10},
    "eval": {"context_lengths": [32, 64], "mqar_pairs": [2]},
    "compute": {"num_cpus": 2, "cpus_per_job": 1},
    "tracking": {"experiment": "tiny"},
}


_SHORT_DIRS: list[Path] = []
ZYGOTES = Zygotes()


def short_tmp(prefix: str) -> Path:
    """Ray's socket paths must stay under ~107 bytes: pytest's tmp_path is too deep."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    _SHORT_DIRS.append(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _remove_short_dirs():
    yield
    ZYGOTES.stop()
    for path in _SHORT_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def write_params(root: Path, overrides: dict | None = None) -> dict:
    params = yaml.safe_load(yaml.safe_dump(TINY))
    for block, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(params.get(block), dict):
            params[block].update(values)
        else:
            params[block] = values
    params.setdefault("compute", {})["temp_dir"] = str(short_tmp("kvfray"))
    params.setdefault("tracking", {})["uri"] = f"sqlite:///{root}/mlflow.db"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def stage_env(**extra: str) -> dict:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
           # RAY_AUTH_MODE: test_ray_job's cluster (a stage's own Ray uses a token)
           "DVC_NO_ANALYTICS": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
           # MLflow's client backs off 1, not 2 (its default): a test's server outage costs less waiting
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)  # the caller's, not ours: `extra` may name one
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run_stage(root: Path, stage: str, *args: str, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    """`python -m stages.<stage>` in `root` (a dotted name runs that module: `tools.mlflow_sync`),
    forked from a zygote that has imported what stages import (tests/stage_zygote.py).
    A train or evaluate stage that `shares_ray` runs its jobs on this test process's Ray node
    (tests/ray_node.py); any other starts its private local Ray, as a user's stage does."""
    module = stage if "." in stage else f"stages.{stage}"
    return ZYGOTES.run([sys.executable, "-m", module, *args], cwd=root, env=stage_env_for(root, stage, **env),
                       timeout=timeout)


def stage_env_for(root: Path, stage: str, **extra: str) -> dict:
    """`stage_env(**extra)`, pointing the stage at this test process's Ray node when it `shares_ray`."""
    if shares_ray(root, stage, extra):
        extra = {**extra, **SHARED.env(TINY["compute"]["num_cpus"])}
    return stage_env(**extra)


def shares_ray(root: Path, stage: str, env: dict | None = None) -> bool:
    """A train or evaluate stage on TINY's compute block (its temp dir and storage aside: the node
    is on this machine; `workers_per_run` up to TINY's CPUs) whose extra environment is at most the
    train stage's fault hook (read by its driver, not its workers): nothing a shared node would
    change."""
    if stage not in ("train", "evaluate") or not set(env or {}) <= ({"KVF_FAULT"} if stage == "train" else set()):
        return False
    try:
        compute = yaml.safe_load((root / "params.yaml").read_text()).get("compute")
    except (OSError, yaml.YAMLError, AttributeError):  # a test of a bad params file: the stage says so
        return False
    compute = {k: v for k, v in (compute or {}).items() if k not in ("temp_dir", "storage")}
    # Ray Train's workers for a run, as many as a test process's share of the node has CPUs for
    if compute.get("workers_per_run", 1) <= TINY["compute"]["num_cpus"]:
        compute.pop("workers_per_run", None)
    return compute == TINY["compute"]


def kill_ray_in(temp_dir: str) -> None:
    """Stop the Ray processes of one temp dir only (never `ray stop`: it stops every cluster)."""
    mine = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            mine.append(int(proc.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 1.0  # up to a second for them to go, no longer than they take
        while (mine := [pid for pid in mine if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: its parent has yet to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def once_per_run(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `name`, made by `make(folder)` once per test run: under pytest-xdist by the
    first worker that asks, in the temp dir all workers share, the others waiting on its lock."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-<n>/, above each worker's own popen-gw<i>/
    folder, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`data/` of the tiny project, prepared once per test run."""
    def prepare(root: Path) -> None:
        root.mkdir()
        write_params(root)
        result = run_stage(root, "prepare")
        assert result.returncode == 0, result.stderr

    return once_per_run(tmp_path_factory, "tiny", prepare) / "data"


@pytest.fixture
def tiny_project(tmp_path, tiny_data) -> Path:
    """A tiny project dir with params.yaml and prepared data (copied)."""
    shutil.copytree(tiny_data, tmp_path / "data")
    write_params(tmp_path)
    return tmp_path


def copy_study(src: Path, dest: Path) -> Path:
    """The study at `src` as it stands, at `dest`: its own MLflow store (absolute paths in
    mlflow.db moved along) and its own Ray temp dir. A copy is what a test changes; `src` stays."""
    shutil.copytree(src, dest, symlinks=True)
    old, new = str(src), str(dest)
    db = sqlite3.connect(dest / "mlflow.db")
    try:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]:
                db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                           f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0', (old, new, old))
        db.commit()
    finally:
        db.close()
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["compute"]["temp_dir"] = str(short_tmp("kvfcopy"))
    params["tracking"]["uri"] = f"sqlite:///{dest}/mlflow.db"
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


@pytest.fixture(scope="session")
def trained_study(tmp_path_factory, tiny_data) -> Path:
    """The tiny project after one train stage (TINY's params, both variants), trained once per
    test run; tests take a copy of it (`trained_project`) and never change this one."""
    def train(root: Path) -> None:
        shutil.copytree(tiny_data, root / "data")
        write_params(root)
        result = run_stage(root, "train")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    return once_per_run(tmp_path_factory, "trained", train)


@pytest.fixture
def trained_project(tmp_path, trained_study) -> Path:
    """A copy of the trained tiny study, the test's own."""
    return copy_study(trained_study, tmp_path / "study")
