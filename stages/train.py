"""DVC stage `train`: every variant on Ray, tracked in MLflow; metrics/train.json holds the run ids."""
from __future__ import annotations

from pathlib import Path

from stages import load_or_exit, parse_args, run_stage


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.core.tracking import repo_root
    from pipeline.train.driver import run_training

    run_stage(args.params, lambda: run_training(
        params, repo_root(), Path("data"), Path("checkpoints"), Path("metrics/train.json")))


if __name__ == "__main__":
    main()
