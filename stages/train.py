"""DVC stage `train`: every variant on Ray, tracked in MLflow; metrics/train.json holds the run ids."""
from __future__ import annotations

import sys
from pathlib import Path

from stages import load_or_exit, parse_args


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.runner import ComputeError, run_training
    from pipeline.tracking import repo_root

    try:
        code = run_training(params, repo_root(), Path("data"), Path("checkpoints"),
                            Path("metrics/train.json"))
    except ComputeError as err:
        print(f"{Path(args.params).name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
