"""The train stage end to end on a local Ray: MLflow runs, skipping, failures, GPUs, kill -9.
Tests that start from a trained study take their own copy of the one trained once for the
session (`trained_project`); those about a first training train their own (`tiny_project`)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.studies import kill_ray_in, once_per_run, run_stage, stage_env, stage_env_for, write_params

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


# one run of 100 steps, checkpoints every 20, logged every 5: what an interrupted run must end with
LONG = {"steps": 100, "checkpoint_every": 20, "log_every": 5, "eval_every": 50}


def _long(root) -> dict:
    """`root`'s params: TINY with LONG's training and the mha point alone."""
    params = write_params(root, {"train": LONG})
    params["variants"] = {"mha": {"kind": "mha"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, tiny_data):
    """LONG trained once per test run, uninterrupted: (metrics, history, weights, bytes of a step checkpoint)."""
    def train(root):
        root.mkdir()
        (root / "data").symlink_to(tiny_data)
        _long(root)
        result = run_stage(root, "train")
        assert result.returncode == 0, result.stderr[-3000:]

    root = once_per_run(tmp_path_factory, "uninterrupted", train)
    final = json.loads((root / "checkpoints" / "mha" / "model.json").read_text())
    return (_metrics(root)["variants"]["mha"], final["history"],
            load_file(root / "checkpoints" / "mha" / "model.safetensors"),
            (root / "checkpoints" / "mha" / "step-000100.safetensors").stat().st_size)


def _ends_as(root, uninterrupted) -> None:
    """`root`'s run ended exactly as the uninterrupted one: metrics, weights, logged history, one
    MLflow run with every step once."""
    expected, history, weights, _ = uninterrupted
    resumed = _metrics(root)["variants"]["mha"]
    for key in VAL_KEYS:
        assert resumed[key] == expected[key], key  # bit-exact, not approximately
    got = load_file(root / "checkpoints" / "mha" / "model.safetensors")
    assert got.keys() == weights.keys() and all(got[k].equal(weights[k]) for k in got)
    final = json.loads((root / "checkpoints" / "mha" / "model.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(final["history"]) == strip(history)  # a window cut by the stop logs the same sums
    runs = _runs(root)
    assert runs["mha"].info.status == "FINISHED" and runs["mha"].info.run_id == resumed["run_id"]
    steps = [h.step for h in MlflowClient(f"sqlite:///{root}/mlflow.db").get_metric_history(
        resumed["run_id"], "train/loss")]
    assert sorted(set(steps)) == list(range(5, 101, 5))  # one run, every step logged


def _checkpointed(root, at_least: int, deadline_s: float = 180) -> None:
    latest = root / "checkpoints" / "mha" / "latest.json"
    deadline = time.time() + deadline_s
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= at_least):
        time.sleep(0.05)


def test_resume_after_kill_9_matches_uninterrupted(tiny_project, uninterrupted):
    params = _long(tiny_project)
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=tiny_project, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _checkpointed(tiny_project, 40)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    kill_ray_in(params["compute"]["temp_dir"])
    latest = tiny_project / "checkpoints" / "mha" / "latest.json"
    killed_at = json.loads(latest.read_text())["step"]
    assert 40 <= killed_at < 100
    assert not (tiny_project / "checkpoints" / "mha" / "model.json").exists()

    result = run_stage(tiny_project, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    _ends_as(tiny_project, uninterrupted)


def test_preemption_and_a_killed_worker_end_as_the_uninterrupted_run(tiny_project, uninterrupted):
    """SIGTERM to the train stage (a scheduler's preemption), then SIGTERM to the run's Ray worker
    alone: each time the run writes the checkpoint of the step it is in and stops, naming the run
    and the step; the stage exits 143 (the worker's alone: 1, a run not finished). The third run
    resumes, and kill -9 to its worker mid-run (out of memory, a node gone) has Ray run the task
    again (`compute.max_failures`) from its last checkpoint: the stage succeeds and the run ends
    bit-exactly as an uninterrupted one (pipeline/train/preempt.py, fanout.submit)."""
    root = tiny_project
    _long(root)
    env = stage_env_for(root, "train")
    latest = root / "checkpoints" / "mha" / "latest.json"
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _checkpointed(root, 20)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)  # the stage alone, as a scheduler's SIGTERM to its job
    out, err = proc.communicate(timeout=120)
    assert time.time() - sent < 30  # within the default grace period (compute.preempt_grace_s)
    assert proc.returncode == 143, out[-2000:] + err[-3000:]
    step = json.loads(latest.read_text())["step"]
    assert 20 <= step <= 80  # room for the two runs below
    assert (f"[train] PREEMPTED run mha at step {step}: preempted (SIGINT): its step-{step} checkpoint is "
            f"written; the next make repro resumes it from step {step}") in err, err[-3000:]
    assert f"[train] preempted (SIGTERM): 1 run(s) stopped with a checkpoint: mha (step {step}); " \
           "make repro resumes them" in err
    metrics = _metrics(root)["variants"]["mha"]
    assert metrics["status"] == "preempted" and metrics["step"] == step

    # the run's worker alone gets SIGTERM (its node going away), sent by itself 5 steps on (a test
    # hook: from outside, a few dozen tiny steps can end before a signal lands)
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, text=True,
                            env=stage_env_for(root, "train", KVF_FAULT=f"mha:{step + 5}:sigterm"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    second = json.loads(latest.read_text())["step"]
    assert second == step + 5
    assert f"[train] PREEMPTED run mha at step {second}: preempted (SIGTERM): its step-{second} checkpoint" in err

    # the worker dies 10 steps on (os._exit: as kill -9, out of memory, its node gone; once)
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, text=True,
                            env=stage_env_for(root, "train", KVF_FAULT=f"mha:{second + 10}:kill"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert (root / "checkpoints" / ".mha.fault-fired").exists()  # it did die
    _ends_as(root, uninterrupted)


def test_a_full_disk_stops_the_run_naming_the_file_then_it_resumes(tiny_project, uninterrupted, tmp_path_factory):
    """checkpoints/ on a tmpfs with room for one step checkpoint (a mount namespace of the stage's
    own: `unshare`): the second checkpoint's write fails; the run stops at that step naming the
    file, the bytes it needed and those free, leaves no half-written file, and keeps its last
    checkpoint; with room again the next run resumes there and ends as an uninterrupted run."""
    root, kept = tiny_project, tmp_path_factory.mktemp("kept")
    _long(root)
    (root / "checkpoints").mkdir()
    size = (uninterrupted[3] * 3 // 2 // 4096 + 1) * 4096  # one step's pair fits, a second does not
    script = (f"mount -t tmpfs -o size={size} kvf-full checkpoints && {sys.executable} -m stages.train; "
              f"rc=$?; cp -a checkpoints/. {kept}/; exit $rc")  # what the small disk held, kept
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=root,
                            env=stage_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    line = next((x for x in result.stderr.splitlines() if x.startswith("[train] FAILED run mha at step 40: ")),
                result.stderr[-3000:])
    assert re.fullmatch(r"\[train\] FAILED run mha at step 40: \S*checkpoints/mha/step-000040\.safetensors: no space "
                        r"left on its device \(it needs about [\d,]+ bytes; [\d,]+ free there\): free some space, "
                        r"then run it again \(make repro resumes from the last checkpoint\)", line), line
    assert sorted(p.name for p in (kept / "mha").iterdir()) == ["latest.json", "step-000020.json",
                                                                "step-000020.safetensors"]  # no temp file
    shutil.rmtree(root / "checkpoints")
    shutil.copytree(kept, root / "checkpoints")  # the space freed: the same files, on a disk with room

    result = run_stage(root, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    _ends_as(root, uninterrupted)


def test_a_second_stage_beside_a_running_one_is_refused_at_once(tiny_project):
    """While a stage holds the study (here a process holding its lock the way a stage does), any
    other stage of it stops before any work with one line naming the holder; once it ends, the
    study is free again (the kernel drops the lock, whatever way the holder ended)."""
    root = tiny_project
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from stages import study_lock; "
                               "study_lock('train'); print('held', flush=True); time.sleep(300)"],
                              cwd=root, env=stage_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
        for stage in ("prepare", "train"):
            result = run_stage(root, stage, timeout=60)
            assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith(f"[{stage}] another stage of this study is running (train, pid {holder.pid}, since ")
            assert last.endswith("; runs/stage.lock): wait for it to end or stop it; nothing was changed"), last
        assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()
    result = run_stage(root, "prepare")
    assert result.returncode == 0, result.stderr[-3000:]


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
