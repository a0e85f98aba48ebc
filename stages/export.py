"""DVC stage `export`: each variant's checkpoint -> exports/<variant> (HF format), logged to MLflow."""
from __future__ import annotations

from pathlib import Path

from stages import load_or_exit, parse_args, run_stage


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.core.tracking import repo_root
    from pipeline.export.driver import run_export

    run_stage(args.params, lambda: run_export(params, repo_root(), Path("data"), Path("checkpoints"),
                                              Path("exports"), Path("metrics/export.json")))


if __name__ == "__main__":
    main()
