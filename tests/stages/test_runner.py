"""The train stage end to end on a local Ray: MLflow runs, skipping, failures, GPUs, kill -9.
Tests that start from a trained study take their own copy of the one trained once for the
session (`trained_project`); those about a first training train their own (`tiny_project`)."""
import json
import os
import signal
import subprocess
import sys
import time

import yaml
from mlflow.tracking import MlflowClient

from tests.studies import kill_ray_in, run_stage, stage_env, write_params

VAL_KEYS = ("val/bpb", "val/loss", "val/mqar_acc_near", "val/mqar_acc_far", "train/loss")


def _metrics(root):
    return json.loads((root / "metrics" / "train.json").read_text())


def _runs(root):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    return {r.data.tags["kvf.run"]: r for r in client.search_runs([exp.experiment_id])}


def test_train_logs_one_run_per_variant_then_skips_unchanged(trained_project):
    root = trained_project  # the session's first train stage wrote it (trained_study)
    m = _metrics(root)["variants"]
    assert set(m) == {"mha", "swa"} and all(v["status"] == "ok" and v["trained"] for v in m.values())
    assert m["mha"]["model/cache_bytes_per_token_at_32k"] > m["swa"]["model/cache_bytes_per_token_at_32k"]
    assert m["swa"]["model/state_bytes_32k"] == 2 * 2 * 8 * 4 * 4  # ring buffer: 2*g*d_h*W fp32
    runs = _runs(root)
    assert {n: r.info.run_id for n, r in runs.items()} == {n: v["run_id"] for n, v in m.items()}
    run = runs["swa"]
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "swa"
    assert run.data.params["model.attention.window"] == "4" and run.data.params["train.steps"] == "30"
    history = MlflowClient(f"sqlite:///{root}/mlflow.db").get_metric_history(
        run.info.run_id, "train/loss")
    assert [h.step for h in sorted(history, key=lambda h: h.step)] == [5, 10, 15, 20, 25, 30]
    assert run.data.metrics["val/bpb"] == m["swa"]["val/bpb"]

    # change one variant: only that one retrains; the other keeps its run
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["variants"]["swa"]["window"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage(root, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    m2 = _metrics(root)["variants"]
    assert m2["mha"]["trained"] is False and m2["mha"]["run_id"] == m["mha"]["run_id"]
    assert m2["swa"]["trained"] is True and m2["swa"]["run_id"] != m["swa"]["run_id"]
    assert "mha: unchanged since its last completed run, skipped" in result.stdout
    assert "[train] 1 run(s) on Ray (127.0.0.1:" in result.stdout  # this test process's node (tests/ray_node.py)


def test_failing_variant_is_reported_and_others_finish(tiny_project):
    result = run_stage(tiny_project, "train", KVF_FAULT="swa:12:nan")
    assert result.returncode == 1
    assert "FAILED run swa at step 12: loss became nan" in result.stderr
    m = _metrics(tiny_project)["variants"]
    assert m["mha"]["status"] == "ok" and m["mha"]["step"] == 30
    assert m["swa"]["status"] == "failed" and m["swa"]["step"] == 12
    assert (tiny_project / "checkpoints" / "mha" / "model.safetensors").exists()
    assert not (tiny_project / "checkpoints" / "swa" / "model.safetensors").exists()
    runs = _runs(tiny_project)
    assert runs["mha"].info.status == "FINISHED" and runs["swa"].info.status == "FAILED"
    # the next run retrains only the failed variant, from its step-10 checkpoint
    result = run_stage(tiny_project, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    m = _metrics(tiny_project)["variants"]
    assert m["mha"]["trained"] is False and m["swa"]["trained"] is True


def test_damaged_weights_and_data_are_caught_not_trusted(trained_project):
    """Weights cut or changed on disk are trained again (to the same metrics: batches are pure
    functions of (seed, step)); data that is not what prepare wrote stops the stage at once."""
    root = trained_project
    first = _metrics(root)["variants"]["mha"]
    ckpt = root / "checkpoints" / "mha"
    for name in ("model.safetensors", "step-000030.safetensors"):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])
    result = run_stage(root, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[train] mha: checkpoints/mha/model.safetensors: its bytes do not match the sha256" in result.stdout
    second = _metrics(root)["variants"]["mha"]
    assert second["trained"] is True
    assert {k: v for k, v in second.items() if k.startswith("val/")} == \
        {k: v for k, v in first.items() if k.startswith("val/")}

    train_bin = root / "data" / "text" / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-100])
    result = run_stage(root, "train", timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("data/text/train.bin: missing or not the bytes prepare wrote")


def test_a_failed_experiment_keeps_the_good_checkpoint(trained_project):
    """A changed config trains beside the finished run and replaces it only on success: when it
    fails, the old checkpoint is intact and reverting params.yaml retrains nothing."""
    root = trained_project
    good = (root / "checkpoints" / "swa" / "model.safetensors").read_bytes()
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["variants"]["swa"]["window"] = 6  # the experiment (swa only), made to diverge below
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage(root, "train", KVF_FAULT="swa:12:nan")
    assert result.returncode == 1 and "FAILED run swa at step 12" in result.stderr
    assert (root / "checkpoints" / "swa" / "model.safetensors").read_bytes() == good
    assert (root / "checkpoints" / "swa.next" / "latest.json").exists()  # resumable

    (root / "params.yaml").write_text(original)  # revert: both runs are current again
    result = run_stage(root, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(not v["trained"] for v in _metrics(root)["variants"].values())
    assert (root / "checkpoints" / "swa.next").exists()  # kept for the experiment

    (root / "params.yaml").write_text(yaml.safe_dump(params))  # the experiment, fixed
    result = run_stage(root, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    m = _metrics(root)["variants"]
    assert m["swa"]["trained"] and m["swa"]["step"] == 30
    assert not (root / "checkpoints" / "swa.next").exists()
    assert (root / "checkpoints" / "swa" / "model.safetensors").read_bytes() != good


def test_gpu_request_on_cpu_cluster_fails_fast(tiny_project):
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["compute"]["gpus_per_job"] = 1
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    start = time.time()
    result = run_stage(tiny_project, "train", timeout=120)
    assert result.returncode == 2
    assert "compute.gpus_per_job: asks for 1 GPU(s) per job but the Ray cluster (local) has 0 GPU(s)" \
        in result.stderr
    assert time.time() - start < 60
    assert not (tiny_project / "mlflow.db").exists() and not (tiny_project / "metrics").exists()


def test_resume_after_kill_9_matches_uninterrupted(tiny_project, tmp_path_factory):
    overrides = {"train": {"steps": 100, "checkpoint_every": 20, "log_every": 5, "eval_every": 50},
                 "variants": {"mha": {"kind": "mha"}}}
    reference = tmp_path_factory.mktemp("reference")
    (reference / "data").symlink_to(tiny_project / "data")
    write_params(reference, overrides)
    result = run_stage(reference, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _metrics(reference)["variants"]["mha"]

    params = write_params(tiny_project, overrides)
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=tiny_project, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = tiny_project / "checkpoints" / "mha" / "latest.json"
    deadline = time.time() + 180
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= 40):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    kill_ray_in(params["compute"]["temp_dir"])
    killed_at = json.loads(latest.read_text())["step"]
    assert 40 <= killed_at < 100
    assert not (tiny_project / "checkpoints" / "mha" / "model.json").exists()

    result = run_stage(tiny_project, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _metrics(tiny_project)["variants"]["mha"]
    for key in VAL_KEYS:
        assert resumed[key] == expected[key], key  # bit-exact, not approximately
    runs = _runs(tiny_project)
    assert runs["mha"].info.status == "FINISHED" and runs["mha"].info.run_id == resumed["run_id"]
    steps = [h.step for h in MlflowClient(f"sqlite:///{tiny_project}/mlflow.db").get_metric_history(
        resumed["run_id"], "train/loss")]
    assert sorted(set(steps)) == list(range(5, 101, 5))  # one run, every step logged


def test_a_project_at_a_deep_path_trains(tmp_path, tiny_data):
    """Ray's socket paths must stay under 107 bytes whatever the project's depth: its temp dir
    stays inside the project (runs/ray) and Ray is handed a short link to it."""
    import hashlib
    import shutil

    root = tmp_path / ("studies_" + "x" * 40) / "kv-frontier-with-a-long-name"
    assert len(str(root)) >= 100, root
    shutil.copytree(tiny_data, root / "data")
    params = write_params(root, {"variants": {"swa": {"kind": "swa", "window": 4}}})
    del params["compute"]["temp_dir"]  # the default, runs/ray
    # and a GPU declared to the local Ray, the work forced to CPU: the stage schedules the job on
    # it (test_gpu_scheduling.py checks the packing) and trains on the CPU
    params["compute"].update(num_gpus=1, device="cpu")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    state = (root / "runs" / "ray").resolve()
    link = f"/tmp/kvf-ray-{hashlib.sha256(str(state).encode()).hexdigest()[:12]}"
    old = [state / f"session_2001-01-0{i}_00-00-00_000000_{i}" for i in range(1, 4)]  # earlier runs'
    for folder in old:
        (folder / "logs").mkdir(parents=True)
    try:
        result = run_stage(root, "train")
        assert result.returncode == 0, result.stderr[-3000:]
        assert _metrics(root)["variants"]["swa"]["status"] == "ok"
        assert "2 run(s) on Ray (local), 1 GPU(s) per job" in result.stdout  # one after the other
        sessions = sorted(p.name for p in state.glob("session_2*"))
        assert len(sessions) == 2 and sessions[0] == old[-1].name, sessions  # the newest two kept
        assert sessions[1] > old[-1].name, "Ray's session state is not in the project"
        assert os.path.realpath(link) == str(state)
    finally:
        kill_ray_in(link)
        if os.path.islink(link):
            os.unlink(link)
