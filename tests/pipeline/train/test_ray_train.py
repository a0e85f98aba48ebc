"""One run across two Ray Train workers (`compute.workers_per_run: 2`, DDP over gloo): the same
loss curve as the one-process run; preempted (SIGTERM to the stage) it stops with a checkpoint and
the next stage resumes it; a worker killed mid-run is brought back by Ray Train from its last
checkpoint; the run ends on that same curve."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.studies import run_stage, stage_env_for, write_params

TRAIN = {"steps": 20, "log_every": 2, "eval_every": 10, "checkpoint_every": 6, "batch_size": 4,
         "mqar_batch_size": 4}


def _params(root, workers: int) -> None:
    params = write_params(root, {"variants": {"mha": {"kind": "mha"}}, "train": TRAIN})
    params["variants"] = {"mha": {"kind": "mha"}}
    params["compute"].update(workers_per_run=workers, storage=str(root / "storage"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _train(root, workers: int, **env) -> tuple[dict, list[dict], str]:
    _params(root, workers)
    result = run_stage(root, "train", timeout=600, **env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    final = json.loads((root / "checkpoints" / "mha" / "model.json").read_text())
    return final, final["history"], result.stdout + result.stderr


def _preempted_at_7(root) -> list[dict]:
    """The stage, SIGTERM'd while the run is at step 7 (rank 0 holds there until the stage asks it
    to stop): exit 143 naming the run and step 7; returns the history of its step-7 checkpoint."""
    _params(root, 2)
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, text=True,
                            env=stage_env_for(root, "train", KVF_FAULT="mha:7:hold"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not any((root / "storage").rglob("holding")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:] + err[-4000:]
    assert ("[train] PREEMPTED run mha at step 7: preempted (SIGTERM): its step-7 checkpoint is written; "
            "the next make repro resumes it from step 7") in err, err[-4000:]
    assert json.loads((root / "metrics" / "train.json").read_text())["variants"]["mha"]["status"] == "preempted"
    [meta] = list((root / "storage").rglob("step-000007.json"))  # reported to Ray Train, in its storage
    return json.loads(meta.read_text())["history"]


def test_two_workers_follow_one_process_through_a_preemption_and_a_killed_worker(tiny_data, tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    for root in (one, two):
        shutil.copytree(tiny_data, root / "data")
    final_1, curve_1, _ = _train(one, 1)
    before = _preempted_at_7(two)
    assert [r["step"] for r in before] == [2, 4, 6]
    final_2, curve_2, log = _train(two, 2, KVF_FAULT="mha:11:kill")  # worker 1 dies at step 11, once

    assert "x 2 Ray Train workers per run (DDP" in log
    assert (two / "storage").is_dir() and any((two / "storage").rglob("fault-fired"))  # it did die
    # resumed from the step-7 checkpoint (Ray Train, same name and storage), not trained again: the
    # records before it are those the first stage made, to their measured speed
    assert curve_2[:3] == before
    # Ray Train brought the group back from that checkpoint after the kill: each step of the curve
    # once, step 8's record the mean over the window the preemption cut (both workers' sums saved)
    assert [r["step"] for r in curve_2] == [r["step"] for r in curve_1] == list(range(2, 21, 2))
    for a, b in zip(curve_1, curve_2):
        for key in ("train/loss", "train/lm_loss", "train/mqar_loss", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (a["step"], key)
    assert curve_2[0]["train/loss"] == pytest.approx(curve_1[0]["train/loss"], rel=1e-5)  # before Adam acts
    for key in ("val/bpb", "val/loss", "val/objective"):
        assert final_2["metrics"][key] == pytest.approx(final_1["metrics"][key], rel=1e-3)
    # the stage's outputs are where the rest of the pipeline reads them; MLflow has the whole curve once
    metrics = json.loads((two / "metrics" / "train.json").read_text())["variants"]["mha"]
    assert metrics["status"] == "ok" and metrics["val/bpb"] == final_2["metrics"]["val/bpb"]
    history = MlflowClient(f"sqlite:///{two}/mlflow.db").get_metric_history(metrics["run_id"], "train/loss")
    assert sorted(h.step for h in history) == list(range(2, 21, 2))


def test_workers_split_each_batch_without_overlap():
    """Every row of a step's global batch goes to exactly one of the N workers, N equal shares."""
    import numpy as np

    from pipeline.train.ddp import DataParallel

    rows = np.random.default_rng(0).integers(0, 1000, size=(12, 5))
    for world in (1, 2, 3, 4):
        shards = []
        for rank in range(world):
            worker = object.__new__(DataParallel)  # no Ray Train context needed for the split
            worker.rank, worker.world = rank, world
            shards.append(worker.shard(rows))
        assert {len(s) for s in shards} == {12 // world}
        assert sorted(map(tuple, np.concatenate(shards).tolist())) == sorted(map(tuple, rows.tolist()))
