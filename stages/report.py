"""DVC stage `report`: the frontier PNG and table under report/, logged to a parent MLflow run."""
from __future__ import annotations

from pathlib import Path

from stages import load_or_exit, parse_args, run_stage


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.core.tracking import repo_root
    from pipeline.report.frontier import run_report

    run_stage(args.params, lambda: run_report(params, repo_root(), Path("results/eval"), Path("report"),
                                              Path("checkpoints")))


if __name__ == "__main__":
    main()
