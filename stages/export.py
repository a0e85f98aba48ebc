"""DVC stage `export`: each variant's checkpoint -> exports/<variant> (HF format), logged to MLflow."""
from __future__ import annotations

import os
from pathlib import Path

from stages import load_or_exit, parse_args


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.tracking import repo_root

    root = repo_root()
    os.environ.setdefault("HF_HOME", str(root / "runs" / "hf_home"))  # dynamic-module cache in the repo
    from pipeline.export import run_export

    raise SystemExit(run_export(params, root, Path("checkpoints"), Path("exports"),
                                Path("metrics/train.json"), Path("metrics/export.json")))


if __name__ == "__main__":
    main()
