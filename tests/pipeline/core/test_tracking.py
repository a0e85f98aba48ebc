"""The MLflow side of a run when its server goes away: a worker that cannot log keeps training and
its driver sends what is missing, each step once; the retry bound the stages state."""
import random

import pytest

from pipeline.core import tracking
from tests.ray_node import free_port


def _records(steps: list[int]) -> list[dict]:
    rng = random.Random(sum(steps))
    return [{"run": "mha", "step": s, "train/loss": rng.uniform(1, 5), **({"val/objective": rng.uniform(1, 5)}
                                                                          if s % 20 == 0 else {})}
            for s in steps]


def test_a_worker_that_loses_its_server_trains_on_and_the_driver_fills_the_gaps(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.Tracker(uri, "tiny")
    run_id = tracker.open_run("mha", "fp", {"lr": "0.01"}, {})
    forwarded = []
    log = tracking.WorkerLog(uri, run_id, forwarded.append)
    records = _records(list(range(5, 101, 5)))
    for r in records[:7]:
        log(r)

    def gone(*args, **kwargs):
        raise ConnectionError("server gone")

    monkeypatch.setattr(log.client, "log_batch", gone)
    for r in records[7:12]:
        log(r)
    monkeypatch.undo()
    for r in records[12:]:
        log(r)  # it stopped logging live: the run goes on, its records still reach the driver
    assert forwarded == records and log.lost
    assert "tracking.uri sqlite:" in capsys.readouterr().err

    assert tracker.fill_history(run_id, records) == len(records) - 7
    assert tracker.fill_history(run_id, records) == 0  # nothing twice
    for key in ("train/loss", "val/objective"):
        history = tracker.client.get_metric_history(run_id, key)
        expected = {r["step"]: r[key] for r in records if key in r}
        assert sorted(m.step for m in history) == sorted(expected)  # each step once
        assert {m.step: m.value for m in history} == pytest.approx(expected)

    # a resumed run (the next stage) logs only the steps its run lacks
    again = tracking.Tracker(uri, "tiny")
    assert again.open_run("mha", "fp", {"lr": "0.01"}, {}) == run_id
    again.log_records(run_id, records + _records([105, 110]))
    assert sorted(m.step for m in again.client.get_metric_history(run_id, "train/loss")) == list(range(5, 111, 5))


def test_the_stated_retry_bound_is_how_long_mlflows_client_tries(monkeypatch):
    """The bound a stage states (`retry_bound_s`) against a real client giving up on a port nothing
    listens on (2 retries, factor 1: waits of 0 and 2 s, plus up to 1 s of jitter); by default ~4 min."""
    import time

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    assert tracking.retry_bound_s() == 0 + 4 + 8 + 16 + 32 + 64 + 120 + 6  # MLflow's defaults: 7 retries, factor 2
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    bound = tracking.retry_bound_s()
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")
    start = time.perf_counter()
    with pytest.raises(MlflowException, match="Max retries exceeded"):
        client.get_experiment_by_name("tiny")
    assert bound == 3 and 2 <= time.perf_counter() - start <= bound + 1.0


def test_a_lost_server_is_told_apart_from_other_failures(tmp_path):
    port = free_port()
    line = tracking.lost_server(f"http://127.0.0.1:{port}")
    assert line.startswith(f"tracking.uri: http://127.0.0.1:{port}: the MLflow server stopped answering while "
                           "the stage ran (") and "make repro logs it" in line
    assert tracking.lost_server(f"sqlite:///{tmp_path}/mlflow.db") is None  # a local store never goes away
