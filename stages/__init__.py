"""Thin DVC entry points: parse params.yaml, then call into pipeline/ (run as `python -m stages.<name>`)."""
from __future__ import annotations

import argparse
import atexit
import fcntl
import gc
import os
import sys
import time
from pathlib import Path
from typing import Callable

from pipeline.core.params import Params, ParamsError, load_params

# Tool state stays out of $HOME and /tmp defaults, however the stage is started.
_QUIET_TOOLS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": str(Path("runs") / "hf_home"),  # transformers' dynamic-module cache
    "TRITON_CACHE_DIR": str(Path("runs") / "triton_cache"),  # compiled kernels
}


def parse_args(description: str) -> argparse.Namespace:
    for var, value in _QUIET_TOOLS.items():
        os.environ.setdefault(var, str(Path(value).resolve()) if var in ("HF_HOME", "TRITON_CACHE_DIR")
                              else value)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    return parser.parse_args()


def load_or_exit(path: str, tracked: bool = True) -> Params:
    """Typed params, or one line naming the field on stderr and exit 2 -- before any work. A
    `tracked` stage (one that logs to MLflow) also stops there when its tracking server does not
    answer or its experiment on a shared store is another study's (`tracking.check_study`), and
    every stage when another stage of the study is running (`study_lock`)."""
    from pipeline.core.tracking import (
        StudyConflict,
        TrackingUnreachable,
        check_server,
        check_study,
        repo_root,
        shared_store,
    )

    global _tracking_uri
    try:
        params = load_params(path)
        if tracked and params.tracking.uri:
            check_server(params.tracking.uri)
            _tracking_uri = params.tracking.uri
        shared = shared_store(params.tracking.uri, repo_root())  # not the study's own mlflow.db
        if tracked and shared:
            check_study(shared, params.tracking.experiment, repo_root())
    except (ParamsError, TrackingUnreachable, StudyConflict) as err:
        print(f"{Path(path).name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    stage = Path(sys.argv[0]).stem
    try:
        study_lock(stage)
    except StudyBusy as err:
        print(f"[{stage}] {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return params


LOCK_FILE = Path("runs") / "stage.lock"
_tracking_uri = None  # the tracking server a tracked stage checked before it began
_held = None  # the lock file, open (so locked) until this process ends


class StudyBusy(RuntimeError):
    """Another stage of this study holds its lock."""


def study_lock(stage: str) -> None:
    """One stage at a time in a study (the folder a stage runs in): an exclusive lock on
    `runs/stage.lock`, which names its holder, held until the process ends (the kernel drops it
    on any exit, kill -9 included; not inherited by what the stage starts). `dvc repro` runs its
    stages one after another, and DVC's own lock refuses a second `dvc repro`; this one refuses a
    stage started by hand beside either. Raises StudyBusy, having changed nothing."""
    global _held
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not said which"
        lock.close()
        raise StudyBusy(f"another stage of this study is running ({holder}; {LOCK_FILE}): wait for it to end "
                        "or stop it; nothing was changed") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{stage}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    _held = lock


def run_stage(params_path: str, job: Callable[[], int]) -> None:
    """Run a stage; a cluster that cannot serve the request, or an input file that is not the one
    written (data, checkpoint), exits 2 with one line that names it and what to do; a tracking
    server that stopped answering mid-stage (past MLflow's retries) exits 1 with one line naming it."""
    from pipeline.core.checkpoint import CorruptCheckpoint, DiskFull
    from pipeline.core.data import DataCorrupt
    from pipeline.core.exports import CorruptExport
    from pipeline.core.fanout import ComputeError
    from pipeline.core.tracking import lost_server

    atexit.register(gc.freeze)  # the collector skips torch's, lm-eval's... objects at exit: 3-5 s a stage
    try:
        code = job()
    except ComputeError as err:
        print(f"{Path(params_path).name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except CorruptCheckpoint as err:
        print(f"{err}: run the train stage (make repro) to train it again", file=sys.stderr)
        raise SystemExit(2) from None
    except CorruptExport as err:
        print(f"{err}: export it again (make repro re-runs the export stage when its outputs changed)",
              file=sys.stderr)
        raise SystemExit(2) from None
    except DataCorrupt as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(2) from None
    except DiskFull as err:  # what is written stays; nothing half-written (pipeline.core.checkpoint)
        print(f"[{Path(sys.argv[0]).stem}] {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception:
        lost = _tracking_uri and lost_server(_tracking_uri)  # the server went away mid-stage
        if not lost:
            raise
        print(f"[{Path(sys.argv[0]).stem}] {lost}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(code)
