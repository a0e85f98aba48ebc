"""`make ui`: the frontier view the UI reads from the experiment, its links, and the errors that
name what is missing. (The study's own runs and view: tests/stages/test_stages.py.)"""
import json
import socket
import subprocess
import sys
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.core.results import MEASURES
from pipeline.report import mlflow_view
from tests.studies import REPO, write_params
from tools import mlflow_ui


def _store(root):
    """A sqlite store with an experiment of three runs, two with frontier metrics."""
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.create_experiment("tiny")
    for name, cache in (("mha", 4096.0), ("swa.window4", 512.0), ("frontier", None)):
        run = client.create_run(experiment, run_name=name).info.run_id
        if cache is not None:
            client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in {
                "frontier/cache_bytes": cache, "frontier/log10_cache_bytes": 1.0, "frontier/mqar_beyond": 0.5,
                "frontier/bpb": 3.0,
                "eval/kvf_passkey/acc": 1.0, "train/loss": 2.0}.items()])
    return client, experiment


@pytest.fixture
def store(tmp_path):
    return _store(tmp_path)


def test_the_view_lists_evaluated_runs_flat_with_a_scatter_per_measure(store):
    client, experiment = store
    mlflow_view.write_view(client, experiment)
    envelope = json.loads(client.get_experiment(experiment).tags[mlflow_view.VIEW_TAG])
    state = json.loads(envelope["state"])
    held = [m.column for m in MEASURES if m.panel and m.column in ("mqar_beyond", "bpb")]  # what the runs hold
    assert len(held) == 2
    assert [(c["type"], c["xaxis"]["key"], c["yaxis"]["key"]) for c in state["compareRunCharts"]] == \
        [("SCATTER", "frontier/log10_cache_bytes", f"frontier/{col}") for col in held]
    assert state["orderByKey"] == "metrics.`frontier/cache_bytes`" and state["runsHiddenMode"] == "SHOW_ALL"
    runs = client.search_runs([experiment], state["searchFilter"])  # the filter the view applies
    assert sorted(r.info.run_name for r in runs) == ["mha", "swa.window4"]
    sections = {s["name"]: s["display"] for s in state["compareRunSections"]}
    assert sections.pop("Frontier: each measure against log10 cache bytes") is True
    assert sections == {"eval/kvf_passkey": False, "frontier": False, "train": False}


def test_links_open_model_training_mode_and_the_view():
    found = mlflow_ui.links("http://127.0.0.1:5001", "7")
    for name, url in found.items():
        parts = urlsplit(url)
        assert parts.fragment.startswith("/experiments/7/runs?"), name
        query = parse_qs(parts.fragment.split("?", 1)[1])
        assert query["workflowType"] == ["machine_learning"], name
        # the UI ignores a saved view when the link carries search parameters
        assert ("viewStateShareKey" in query) != ("searchFilter" in query), name
    assert parse_qs(found["charts"].split("?", 1)[1])["compareRunsMode"] == ["CHART"]
    assert unquote(found["runs"]).endswith("searchFilter=metrics.`frontier/cache_bytes` > 0")


def _ui(root, *args):
    return subprocess.run([sys.executable, "-m", "tools.mlflow_ui", *args], cwd=root,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": ""})


def test_make_ui_names_a_missing_store_and_a_taken_port(tmp_path):
    write_params(tmp_path)
    out = _ui(tmp_path)
    assert out.returncode == 1 and f"no MLflow store at {tmp_path}/mlflow.db" in out.stderr
    client, experiment = _store(tmp_path)  # now there is a store, with the experiment params name
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _ui(tmp_path, "--port", str(port))
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is taken" in out.stderr
    assert mlflow_view.VIEW_TAG in client.get_experiment(experiment).tags  # written before the server starts
