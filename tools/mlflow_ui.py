"""The MLflow UI on a study's store (`make ui`):

    python -m tools.mlflow_ui [--params params.yaml] [--port 5001]

Starts `mlflow server` on the store `params.yaml` names (the local sqlite file by default;
loopback only, one worker, job execution off) and prints the links that open the experiment's
runs in the UI's "Model training" mode (MLflow 3.17 opens an experiment on its GenAI overview
otherwise: the mode comes from the URL's `workflowType`, not from the experiment's tags).

The frontier view (pipeline/report/mlflow_view.py) is written by the report stage; `make ui`
writes it again before it starts the server.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from urllib.parse import quote

from pipeline.report.mlflow_view import SORT_KEY, VIEW_ID, write_view


def links(base: str, experiment_id: str) -> dict[str, str]:
    """The charts and the table of the frontier view, and the flat list without it. A link with
    search parameters would make the UI ignore the saved view, so the view's links carry none."""
    runs = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    flat = (f"&orderByKey={quote(f'metrics.`{SORT_KEY}`', safe='')}&orderByAsc=true"
            f"&searchFilter={quote(f'metrics.`{SORT_KEY}` > 0', safe='')}")
    return {"charts": f"{runs}&compareRunsMode=CHART&viewStateShareKey={VIEW_ID}",
            "table": f"{runs}&viewStateShareKey={VIEW_ID}",
            "runs": runs + flat}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    from pipeline.core.params import ParamsError, load_params
    from pipeline.core.tracking import is_server, repo_root, tracking_uri

    try:
        params = load_params(args.params)
    except ParamsError as err:
        sys.exit(f"{Path(args.params).name}: {err}")
    uri = tracking_uri(params.tracking.uri, repo_root())
    if not is_server(uri) and not Path(uri.removeprefix("sqlite:///")).exists():
        sys.exit(f"make ui: no MLflow store at {uri.removeprefix('sqlite:///')}; run the study first (make repro)")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        sys.exit(f"make ui: {uri} has no experiment {params.tracking.experiment!r} (tracking.experiment); "
                 "run the study first (make repro)")
    write_view(client, experiment.experiment_id)
    base = uri if is_server(uri) else f"http://127.0.0.1:{args.port}"
    found = links(base, experiment.experiment_id)
    say = ("[mlflow] the study's runs, in Model training mode:\n"
           f"  frontier charts: {found['charts']}\n  frontier table:  {found['table']}\n"
           f"  all evaluated runs, flat (no saved view): {found['runs']}")
    if is_server(uri):  # the study logs to a server already: open it there
        print(say, flush=True)
        return
    if not _port_free(args.port):
        sys.exit(f"make ui: port {args.port} on 127.0.0.1 is taken; choose another: make ui UI_PORT=<port>")
    print(f"[mlflow] starting the UI on {uri} (127.0.0.1:{args.port}, Ctrl-C stops it; ready in ~30 s)\n{say}",
          flush=True)
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    argv = [mlflow, "server", "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1",
            "--backend-store-uri", uri]
    os.execve(argv[0], argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                              "MLFLOW_DISABLE_TELEMETRY": "true"})


if __name__ == "__main__":
    main()
