"""Thin DVC entry points: parse params.yaml, then call into pipeline/ (run as `python -m stages.<name>`)."""
from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
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


def load_or_exit(path: str) -> Params:
    """Typed params, or one line naming the field on stderr and exit 2 -- before any work."""
    try:
        return load_params(path)
    except ParamsError as err:
        print(f"{Path(path).name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_stage(params_path: str, job: Callable[[], int]) -> None:
    """Run a stage; a cluster that cannot serve the request, or an input file that is not the one
    written (data, checkpoint), exits 2 with one line that names it and what to do."""
    from pipeline.core.checkpoint import CorruptCheckpoint
    from pipeline.core.data import DataCorrupt
    from pipeline.core.exports import CorruptExport
    from pipeline.core.fanout import ComputeError

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
    raise SystemExit(code)
