"""A shared MLflow tracking server for a study on this machine (`make mlflow-server`):

    python -m tools.mlflow_server [--port 5000] [--dir runs/mlflow-server]

Loopback only, one worker, a sqlite store and the artifacts in `--dir` (inside the repo), job
execution off (ENVIRONMENT.md: ~0.5 GB and up in ~9 s instead of ~12 processes and 3.3 GB). Point a
study at it with `tracking.uri: http://127.0.0.1:<port>`; its train workers then log their
curves live. Ctrl-C stops it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def command(port: int, state_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The server's argv and environment."""
    state_dir = state_dir.resolve()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    argv = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{state_dir}/mlflow.db",
            "--artifacts-destination", str(state_dir / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return argv, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--dir", type=Path, default=Path("runs/mlflow-server"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    argv, env = command(args.port, args.dir)
    print(f"[mlflow] http://127.0.0.1:{args.port} (store and artifacts in {args.dir.resolve()})", flush=True)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
