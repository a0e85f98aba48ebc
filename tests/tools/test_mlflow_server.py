"""The tiny study against a real MLflow tracking server over HTTP (the one `make mlflow-server`
starts: tools/mlflow_server.py, on 127.0.0.1 with a sqlite store): the train workers log their
curves while they train, the driver the rest, and afterwards runs, params, metrics, registered
models and the report's artifacts are all read back through the REST API. On the way the server
goes away (stopped, then started again on the same store, as a restarted server is) while the
workers log, then for good while evaluate computes; and a second clone of the study shares the
server. Only the server this module started is stopped."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.ray_node import free_port
from tests.studies import run_stage, stage_env, stage_env_for, write_params
from tools.mlflow_server import command

# no memory/speed probes (a fresh process each, ~2 CPU s): what goes to the server is the point here
EVAL = {"context_lengths": [32, 64], "bpb_tokens": 128, "mqar_pairs": [2], "mqar_examples": 16,
        "capacity_pairs": [1], "lm_eval_tasks": [], "decode_lengths": [],
        "report_context": 1024, "cache_policies": [{"policy": "window", "window": 4, "points": ["mha"]}]}
TRAIN = {"steps": 100, "log_every": 5, "eval_every": 50, "checkpoint_every": 50}  # long enough to watch




def _get(url: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


class Server:
    """The MLflow server this module started (`make mlflow-server`'s command), which a test can
    stop and start again on the same port and store, as a restarted server is."""

    def __init__(self, state):
        self.state, self.port, self.proc, self.log = state, free_port(), None, None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv, env = command(self.port, self.state)
        self.log = open(self.state / "server.log", "a")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5).read()
                return
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, \
                    (self.state / "server.log").read_text()[-3000:]
                time.sleep(0.5)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)  # this server's process group only
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop()


OUTAGE_S = 5  # then the server's restart (~5-10 s): the client retries after 0, 2, 4, 8, 16 s (tests.studies)


def _watch_train(root, server: Server) -> tuple[subprocess.CompletedProcess, list[tuple[str, int]], bool]:
    """Run the train stage, polling the server meanwhile; once a run's curve has moved, stop the
    server for OUTAGE_S and start it again. (result, [(run status, points of train/loss) seen
    while the stage ran], whether the outage fell inside the stage)."""
    url, final_points = server.url, TRAIN["steps"] // TRAIN["log_every"]
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=stage_env_for(root, "train"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, outage = [], None
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
        if outage is None and any(status == "RUNNING" and 0 < n < final_points for status, n in seen):
            server.stop()  # the workers are logging: their next log calls find no server
            time.sleep(OUTAGE_S)
            outage = proc.poll() is None
            server.start()
        time.sleep(1.0)  # a poll is three requests the server answers on the same two cores
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen, bool(outage)


def _evaluate_with_outage(root, server: Server, env=None) -> subprocess.CompletedProcess:
    """Run the evaluate stage (every run to evaluate); stop the server for good once the stage is
    past its first look at it (its results folder made): its first MLflow call, after the results,
    finds none."""
    results = root / "results" / "eval"
    assert not results.exists()
    proc = subprocess.Popen([sys.executable, "-m", "stages.evaluate"], cwd=root,
                            env={**stage_env_for(root, "evaluate"), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not results.is_dir():
        time.sleep(0.1)
    server.stop()
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_tiny_study_against_a_tracking_server_that_goes_away(tiny_project, server, tmp_path_factory):
    """The study against the server, which is stopped for OUTAGE_S (then restarted) while the
    workers log their curves: MLflow's client retries and every step ends up logged once. Then it
    goes for good while evaluate computes: evaluate ends with one line naming it, its results on
    disk, and logs them once the server is back. Then a second clone of the study beside it, the
    two writing to the server at the same time (this one's report, the clone's runs)."""
    url, state, root = server.url, server.state, tiny_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["uri"] = url
    params["eval"].update(EVAL)
    params["train"].update(TRAIN)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result, seen, outage = _watch_train(root, server)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(the workers log their curves live)" in result.stdout
    final_points = TRAIN["steps"] // TRAIN["log_every"]
    assert any(status == "RUNNING" and 0 < n < final_points for status, n in seen), seen  # the curve moved
    assert outage, "the train stage ended before the server came back: the outage tested nothing"
    out = run_stage(root, "export", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    # the server goes for good while evaluate computes (MLflow's client bounded to one retry)
    evaluated_names = ("mha", "swa", "mha+window4")
    out = _evaluate_with_outage(root, server,
                                env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"})
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"[evaluate] tracking.uri: {url}: the MLflow server stopped answering while the stage "
                           "ran (") and "start the server again, then make repro logs it" in last, out.stderr[-3000:]
    assert sorted(p.stem for p in (root / "results" / "eval").iterdir()) == sorted(evaluated_names)  # kept
    assert not (root / "metrics" / "eval.json").exists()  # the stage's output: not half-written
    server.start()
    out = run_stage(root, "evaluate", timeout=600)
    assert out.returncode == 0 and out.stdout.count("unchanged (checkpoint, eval config), kept") == 3, \
        out.stdout[-2000:] + out.stderr[-3000:]
    clone = _a_second_study_beside(root, server, tmp_path_factory.mktemp("clone"))  # runs this study's report
    assert not (root / "mlflow.db").exists()  # nothing went to a local store

    # everything read back over HTTP
    experiment = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="tiny")["experiment"]
    runs = {r["info"]["run_name"]: r for r in _post(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]}
    evaluated = json.loads((root / "metrics" / "eval.json").read_text())["variants"]
    trained = json.loads((root / "metrics" / "train.json").read_text())["variants"]
    for name in evaluated_names:
        run = runs[name]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_id"] == evaluated[name]["run_id"]
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
    assert {m["name"] for m in models if not m["name"].startswith("tiny-clone.")} == {"tiny.mha", "tiny.swa"}
    artifacts = _get(url, "/api/2.0/mlflow/artifacts/list", run_id=runs["frontier"]["info"]["run_id"], path="report")
    assert {f["path"] for f in artifacts["files"]} == {"report/frontier.png", "report/frontier.md",
                                                       "report/frontier.csv", "report/capacity.png",
                                                       "report/learning.png", "report/retrieval.png"}
    assert any((state / "artifacts").rglob("frontier.md"))  # the server's artifact root holds them
    clone()


def _experiment_runs(url: str, name: str) -> dict[str, str]:
    experiment = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=name)["experiment"]
    runs = _post(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                      "max_results": 1000})["runs"]
    return {r["info"]["run_id"]: r["info"]["run_name"] for r in runs}


def _a_second_study_beside(root, server: Server, tmp_path):
    """Another clone of the study at `root` (its own study id) on the same server: with the first's
    experiment, every tracked stage stops at once naming it, changing nothing; with an experiment
    of its own, its MLflow side is built from disk (`tools.mlflow_sync`, the way `make repro` ends)
    while the first study's report stage logs to the same server, and neither's runs or registered
    models appear in the other's. Returns the check of the clone's side, to run last."""
    first = _experiment_runs(server.url, "tiny")
    models = {m["name"] for m in _get(server.url, "/api/2.0/mlflow/registered-models/search")["registered_models"]}
    assert first and models == {"tiny.mha", "tiny.swa"}
    owner = (root / "runs" / "study-id").read_text().strip()
    other = tmp_path / "clone"
    shutil.copytree(root, other, ignore=shutil.ignore_patterns("runs"))  # a clone of the project, not this folder
    params = yaml.safe_load((other / "params.yaml").read_text())
    params["tracking"] = {"uri": server.url, "experiment": "tiny"}
    (other / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("train", "export"):
        out = run_stage(other, stage, timeout=120)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
        assert out.stderr.strip().splitlines()[-1] == (
            f"params.yaml: tracking.experiment: 'tiny' on {server.url} belongs to another study "
            f"({socket.gethostname()}:{root.resolve()}, study id {owner}; this one is "
            f"{(other / 'runs' / 'study-id').read_text().strip()}): give "
            "this study an experiment of its own (tracking.experiment), so neither's runs, metrics or "
            "registered models mix into the other's; nothing was changed"), out.stderr[-3000:]
    assert _experiment_runs(server.url, "tiny") == first

    params["tracking"]["experiment"] = "tiny-clone"
    (other / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sync = subprocess.Popen([sys.executable, "-m", "tools.mlflow_sync"], cwd=other, env=stage_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    report = run_stage(root, "report", timeout=600)  # the first study, at the same time
    out, err = sync.communicate(timeout=300)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-3000:]
    assert sync.returncode == 0, out[-2000:] + err[-3000:]

    def check() -> None:
        mine = _experiment_runs(server.url, "tiny")
        assert set(mine.values()) == set(first.values()) | {"frontier"}  # its report's run, nothing of the clone's
        clone = _experiment_runs(server.url, "tiny-clone")
        assert {"mha", "swa", "mha+window4"} <= set(clone.values()) and not set(clone) & set(mine)
        models = _get(server.url, "/api/2.0/mlflow/registered-models/search")["registered_models"]
        by_name = {m["name"]: m for m in models}
        assert set(by_name) == {"tiny.mha", "tiny.swa", "tiny-clone.mha", "tiny-clone.swa"}
        for name, model in by_name.items():
            owner_runs = mine if name.startswith("tiny.") else clone
            assert all(v["run_id"] in owner_runs for v in model["latest_versions"]), (name, model)

    return check


def test_two_studies_train_at_once_on_one_server(server, tiny_data, tmp_path_factory):
    """Two studies (each its own folder, study id and experiment) train at the same time against
    one server, their workers logging their curves live: each experiment holds its own two runs and
    none of the other's, each run has every logged step once, and the studies' runs were open at once."""
    roots = {}
    for name in ("side-a", "side-b"):
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(tiny_data, root / "data")
        params = write_params(root)
        params["tracking"].update(uri=server.url, experiment=name)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        roots[name] = root
    procs = {name: subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=stage_env_for(root, "train"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, root in roots.items()}
    outs = {name: proc.communicate(timeout=600) for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, outs[name][0][-2000:] + outs[name][1][-3000:]
        assert "(the workers log their curves live)" in outs[name][0]

    spans, ids = {}, {}  # study -> (first run's start, last run's end); its run ids
    for name, root in roots.items():
        trained = json.loads((root / "metrics" / "train.json").read_text())["variants"]
        runs = _experiment_runs(server.url, name)  # run id -> run name
        assert sorted(runs.values()) == ["mha", "swa"], runs
        assert set(runs) == {trained[run]["run_id"] for run in ("mha", "swa")}
        infos = [_get(server.url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]["info"] for run_id in runs]
        assert all(info["status"] == "FINISHED" for info in infos)
        spans[name] = (min(int(i["start_time"]) for i in infos), max(int(i["end_time"]) for i in infos))
        for run_id in runs:
            history = _get(server.url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                           metric_key="train/loss")["metrics"]
            assert sorted(m["step"] for m in history) == list(range(5, 31, 5))  # each step once
        ids[name] = set(runs)
    assert not ids["side-a"] & ids["side-b"]
    (a_start, a_end), (b_start, b_end) = spans.values()
    assert a_start < b_end and b_start < a_end, spans  # the two studies' runs were open at once


def test_a_server_that_does_not_answer_stops_each_tracked_stage_before_any_work(tiny_project):
    """tracking.uri naming a port nothing listens on: train and export stop at once (MLflow's own
    client would retry for ~4 minutes, then fail with a traceback), one line naming the URI and
    what to do, nothing written."""
    root, url = tiny_project, f"http://127.0.0.1:{free_port()}"
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
