"""`ray job submit` against a real local cluster (its own temp dir), stopped by its own pids."""
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_node import free_port
from tests.studies import REPO, kill_ray_in, short_tmp, stage_env, write_params

RAY = str(Path(sys.executable).with_name("ray"))




@pytest.fixture
def local_cluster():
    temp_dir = short_tmp("kvfrc")
    port, dash, agent = free_port(), free_port(), free_port()
    env = stage_env()  # RAY_AUTH_MODE=disabled: `ray job submit` needs no token
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    # its own job-agent port: the default (52365) may belong to another local Ray
                    "--dashboard-agent-listen-port", str(agent),
                    "--temp-dir", str(temp_dir), "--num-cpus", "2", "--num-gpus", "0",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        kill_ray_in(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_on_the_cluster(local_cluster, tiny_data, tmp_path):
    address, env = local_cluster
    work = tmp_path / "work"  # what `--working-dir` uploads: the code + a tiny params file + data
    for folder in ("pipeline", "stages", "models", "kernels"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_data, work / "data")
    out = tmp_path / "out"  # a local cluster shares our filesystem: outputs are copied back here
    write_params(work, {"variants": {"mha": {"kind": "mha"}}})
    params = (work / "params.yaml").read_text().replace(f"sqlite:///{work}/mlflow.db", f"sqlite:///{out}/mlflow.db")
    (work / "params.yaml").write_text(params)
    out.mkdir()
    cmd = f"python -m stages.train && cp -r metrics checkpoints {out}/"
    deadline = time.monotonic() + 120  # the job agent comes up a little after `ray start` returns
    while True:
        result = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(work),
                                 "--", "bash", "-c", cmd], env=env, capture_output=True, text=True,
                                timeout=300)
        if "No available agent to submit job" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    assert "on Ray (" in result.stdout and "(local)" not in result.stdout  # the cluster, not a new Ray
    metrics = json.loads((out / "metrics" / "train.json").read_text())["variants"]["mha"]
    assert metrics["status"] == "ok" and metrics["step"] == 30
    assert (out / "checkpoints" / "mha" / "model.safetensors").stat().st_size > 1000
    with sqlite3.connect(out / "mlflow.db") as db:
        rows = db.execute("select run_uuid, status from runs").fetchall()
    assert (metrics["run_id"], "FINISHED") in rows, rows
