"""Thin DVC entry points: parse params.yaml, then call into pipeline/ (run as `python -m stages.<name>`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.params import Params, ParamsError, load_params


def parse_args(description: str) -> argparse.Namespace:
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
