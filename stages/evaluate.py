"""DVC stage `evaluate`: quality, lm-eval tasks, memory and speed per variant (Ray), logged to MLflow."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from stages import load_or_exit, parse_args


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.runner import ComputeError
    from pipeline.tracking import repo_root

    root = repo_root()
    os.environ.setdefault("HF_HOME", str(root / "runs" / "hf_home"))
    from pipeline.evaluate import run_evaluate

    try:
        code = run_evaluate(params, root, Path("data"), Path("checkpoints"), Path("exports"),
                            Path("results/eval"), Path("metrics/eval.json"))
    except ComputeError as err:
        print(f"{Path(args.params).name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
