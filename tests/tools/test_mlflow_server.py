"""The tiny study against a real MLflow tracking server over HTTP (the one `make mlflow-server`
starts: tools/mlflow_server.py, on 127.0.0.1 with a sqlite store): the train workers log their
curves while they train, the driver the rest, and afterwards runs, params, metrics, registered
models and the report's artifacts are all read back through the REST API. Only the server this
test started is stopped."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.studies import run_stage, stage_env_for
from tools.mlflow_server import command

EVAL = {"context_lengths": [32, 64], "bpb_tokens": 128, "mqar_pairs": [2], "mqar_examples": 16,
        "capacity_pairs": [1], "lm_eval_tasks": [], "decode_lengths": [64], "decode_new_tokens": 4,
        "report_context": 1024, "cache_policies": [{"policy": "window", "window": 4, "points": ["mha"]}]}
TRAIN = {"steps": 100, "log_every": 5, "eval_every": 50, "checkpoint_every": 50}  # long enough to watch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    argv, env = command(port, state)
    log = open(state / "server.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (state / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url, state
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # this server's process group only
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _watch_train(root, url: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, int]]]:
    """Run the train stage, polling the server meanwhile: (result, [(run status, points of
    train/loss) seen while the stage was still running])."""
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=stage_env_for(root, "train"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    while proc.poll() is None:
        try:
            found = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="tiny")
            runs = _post(url, "/api/2.0/mlflow/runs/search",
                         {"experiment_ids": [found["experiment"]["experiment_id"]]}).get("runs", [])
            for run in runs:
                history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"],
                               metric_key="train/loss").get("metrics", [])
                seen.append((run["info"]["status"], len(history)))
        except OSError:  # the experiment is not there yet
            pass
        time.sleep(1.0)  # a poll is three requests the server answers on the same two cores
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen


def test_the_tiny_study_against_a_tracking_server(tiny_project, server):
    url, state = server
    root = tiny_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["uri"] = url
    params["eval"].update(EVAL)
    params["train"].update(TRAIN)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result, seen = _watch_train(root, url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(the workers log their curves live)" in result.stdout
    final_points = TRAIN["steps"] // TRAIN["log_every"]
    assert any(status == "RUNNING" and 0 < n < final_points for status, n in seen), seen  # the curve moved
    for stage in ("export", "evaluate", "report"):
        out = run_stage(root, stage, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert not (root / "mlflow.db").exists()  # nothing went to a local store

    # everything read back over HTTP
    experiment = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="tiny")["experiment"]
    runs = {r["info"]["run_name"]: r for r in _post(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]}
    evaluated = json.loads((root / "metrics" / "eval.json").read_text())["variants"]
    trained = json.loads((root / "metrics" / "train.json").read_text())["variants"]
    for name in ("mha", "swa", "mha+window4"):
        run = runs[name]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["eval/bpb_64"] == pytest.approx(evaluated[name]["eval/bpb_64"])
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        if name in trained:
            assert tags["kvf.logged_by"] == "worker" and metrics["val/bpb"] == pytest.approx(trained[name]["val/bpb"])
            history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"],
                           metric_key="train/loss")["metrics"]
            assert sorted(m["step"] for m in history) == list(range(5, 101, 5))  # each step once
            params_logged = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert params_logged["family"] == name and float(params_logged["train.lr"]) > 0
    models = _get(url, "/api/2.0/mlflow/registered-models/search")["registered_models"]
    assert {m["name"] for m in models} == {"kvf-mha", "kvf-swa"}
    artifacts = _get(url, "/api/2.0/mlflow/artifacts/list", run_id=runs["frontier"]["info"]["run_id"], path="report")
    assert {f["path"] for f in artifacts["files"]} == {"report/frontier.png", "report/frontier.md",
                                                       "report/frontier.csv", "report/capacity.png",
                                                       "report/learning.png", "report/retrieval.png"}
    assert any((state / "artifacts").rglob("frontier.md"))  # the server's artifact root holds them


def test_a_server_that_does_not_answer_stops_each_tracked_stage_before_any_work(tiny_project):
    """tracking.uri naming a port nothing listens on: train and export stop at once (MLflow's own
    client would retry for ~4 minutes, then fail with a traceback), one line naming the URI and
    what to do, nothing written."""
    root, url = tiny_project, f"http://127.0.0.1:{_free_port()}"
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["uri"] = url
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for stage in ("train", "export"):
        start = time.time()
        result = run_stage(root, stage, timeout=120)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"params.yaml: tracking.uri: {url}: no MLflow server answers (") and last.endswith(
            "3 tries); start it (make mlflow-server) or point tracking.uri at one that runs"), last
        assert time.time() - start < 60
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
