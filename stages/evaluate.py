"""DVC stage `evaluate`: quality, lm-eval tasks, memory and speed per variant (Ray), logged to MLflow."""
from __future__ import annotations

from pathlib import Path

from stages import load_or_exit, parse_args, run_stage


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.core.tracking import repo_root
    from pipeline.evaluate.driver import run_evaluate

    run_stage(args.params, lambda: run_evaluate(
        params, repo_root(), Path("data"), Path("checkpoints"), Path("exports"),
        Path("results/eval"), Path("metrics/eval.json")))


if __name__ == "__main__":
    main()
