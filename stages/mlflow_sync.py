"""`make repro`'s last step: rebuild a missing or emptied MLflow store from checkpoints, exports,
results and the report (pipeline/mlflow_sync.py); a whole store is left alone."""
from __future__ import annotations

from pathlib import Path

from stages import load_or_exit, parse_args, run_stage


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.mlflow_sync import sync_store
    from pipeline.tracking import repo_root

    def job() -> int:
        rebuilt = sync_store(params, repo_root(), Path("data"), Path("checkpoints"), Path("exports"),
                             Path("results/eval"), Path("report"))
        print(f"[mlflow] store rebuilt for {len(rebuilt)} run(s)" if rebuilt else "[mlflow] store complete")
        return 0

    run_stage(args.params, job)


if __name__ == "__main__":
    main()
