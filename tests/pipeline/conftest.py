"""A tiny project (params + prepared data) in a temp dir, and helpers to run stages in it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

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


def short_tmp(prefix: str) -> Path:
    """Ray's socket paths must stay under ~107 bytes: pytest's tmp_path is too deep."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    _SHORT_DIRS.append(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _remove_short_dirs():
    yield
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
           "DVC_NO_ANALYTICS": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),  # test_ray_job's cluster (a stage's Ray: token)
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **extra}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_stage(root: Path, stage: str, *args: str, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=root, env=stage_env(**env),
                          capture_output=True, text=True, timeout=timeout)


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
        time.sleep(1.0)


@pytest.fixture(scope="session")
def tiny_data() -> Path:
    """`data/` of the tiny project, prepared once per session."""
    root = short_tmp("kvfdata")
    write_params(root)
    result = run_stage(root, "prepare")
    assert result.returncode == 0, result.stderr
    yield root / "data"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiny_project(tmp_path, tiny_data) -> Path:
    """A tiny project dir with params.yaml and prepared data (copied)."""
    shutil.copytree(tiny_data, tmp_path / "data")
    write_params(tmp_path)
    return tmp_path
