"""Faults where studies run, timed on this machine: for each, how long until the stage notices and
stops (or carries on), how long the recovery takes, and what was lost, against one uninterrupted
run of the same study (the tiny study of the tests: one MHA run of 100 steps, checkpoints every 20).

    .venv/bin/python benchmarks/faults.py            # a markdown table on stdout, ~6 minutes

Each fault starts from a fresh copy of the prepared data; "lost" compares the final weights (every
tensor, bit for bit) and validation metrics with the uninterrupted run's. The stages start their
own local Ray, as a user's do.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safetensors.torch import load_file  # noqa: E402

from tests.ray_node import free_port  # noqa: E402
from tests.studies import stage_env, write_params  # noqa: E402

LONG = {"steps": 100, "checkpoint_every": 20, "log_every": 5, "eval_every": 50}
VAL = ("val/bpb", "val/loss", "val/mqar_acc_near", "val/mqar_acc_far")
RAY_DIRS: list[Path] = []
OUTAGE_S = 30  # the tracking server's outage (the issue's: "stopped for 30 s in the middle of training")


import yaml  # noqa: E402


def project(base: Path, name: str, data: Path | None, tracking: str | None = None) -> Path:
    """A tiny study at base/name: LONG's training of the mha point, the prepared `data` linked."""
    root = base / name
    root.mkdir()
    if data is not None:
        (root / "data").symlink_to(data)
    params = write_params(root, {"train": LONG})
    RAY_DIRS.append(Path(params["compute"]["temp_dir"]))  # a short /tmp folder of its own: removed at the end
    params["variants"] = {"mha": {"kind": "mha"}}
    if tracking:
        params["tracking"]["uri"] = tracking
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def stage(root: Path, name: str = "train", argv: list[str] | None = None) -> tuple[subprocess.Popen, float]:
    argv = argv or [sys.executable, "-m", f"stages.{name}"]
    return subprocess.Popen(argv, cwd=root, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True), time.perf_counter()


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


def checkpointed(root: Path, at_least: int) -> None:
    latest = root / "checkpoints" / "mha" / "latest.json"
    while not (latest.exists() and json.loads(latest.read_text())["step"] >= at_least):
        time.sleep(0.02)


def worker_of(task: str, older: set[int]) -> int:
    """The Ray worker running `task`, not one of the `older` processes."""
    while True:
        for proc in Path("/proc").iterdir():
            try:
                if (proc.name.isdigit() and int(proc.name) not in older
                        and (proc / "cmdline").read_bytes().startswith(f"ray::{task}".encode())):
                    return int(proc.name)
            except OSError:
                continue
        time.sleep(0.05)


def ending(root: Path) -> tuple[dict, dict]:
    metrics = json.loads((root / "metrics" / "train.json").read_text())["variants"]["mha"]
    return {k: metrics[k] for k in VAL}, load_file(root / "checkpoints" / "mha" / "model.safetensors")


def lost(root: Path, reference: tuple[dict, dict]) -> str:
    metrics, weights = ending(root)
    same = metrics == reference[0] and all(weights[k].equal(reference[1][k]) for k in reference[1])
    return "nothing (weights and metrics bit-exact)" if same else "DIFFERS from the uninterrupted run"


def resume(root: Path) -> float:
    proc, t0 = stage(root)
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    return time.perf_counter() - t0


def _server(port: int, state: Path) -> subprocess.Popen:
    """`make mlflow-server`'s server on `port`, its store in `state`, answering."""
    state.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "tools.mlflow_server", "--port", str(port), "--dir", str(state)],
                            cwd=REPO, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            return proc
        except OSError:
            assert proc.poll() is None
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def _logged_steps(url: str) -> list[int]:
    def get(endpoint: str, **query) -> dict:
        with urllib.request.urlopen(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
            return json.loads(r.read())

    experiment = get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="tiny")["experiment"]
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode())
    with urllib.request.urlopen(request, timeout=30) as r:
        run = json.loads(r.read())["runs"][0]
    history = get("/api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"], metric_key="train/loss")
    return sorted(m["step"] for m in history["metrics"])


def server_outages(base: Path, data: Path, reference) -> list[tuple[str, str, str, str]]:
    """The train stage against a tracking server, uninterrupted and with the server stopped for
    OUTAGE_S once the run has a checkpoint (then started again on the same store)."""
    rows, times = [], {}
    for name, outage in (("tracked", 0), ("outage", OUTAGE_S)):
        port = free_port()
        server = _server(port, base / f"{name}-store")
        root = project(base, name, data, tracking=f"http://127.0.0.1:{port}")
        proc, t0 = stage(root)
        if outage:
            checkpointed(root, 20)
            _stop(server)
            time.sleep(outage)
            server = _server(port, base / f"{name}-store")
            back = time.perf_counter()
        code, log = finish(proc)
        assert code == 0, log[-3000:]
        times[name] = time.perf_counter() - t0
        steps = _logged_steps(f"http://127.0.0.1:{port}")
        _stop(server)
        if outage:
            every = steps == list(range(LONG["log_every"], LONG["steps"] + 1, LONG["log_every"]))
            rows.append((f"the tracking server stopped {outage} s mid-train, then started again",
                         "the workers' log calls stall while MLflow's client retries (no line)",
                         f"{time.perf_counter() - back:.1f} s from the restart to the stage's end "
                         f"({times['outage'] - times['tracked']:+.1f} s against the same stage with the server up, "
                         f"{times['tracked']:.1f} s)",
                         lost(root, reference) + ("; every step logged once" if every else f"; LOGGED {steps}")))
    return rows


def main() -> None:
    (REPO / "runs").mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="kvffaults", dir=REPO / "runs"))
    rows = []
    try:
        first = project(base, "prepared", None)  # prepared once; the others link its data
        proc, _ = stage(first, "prepare")
        assert finish(proc)[0] == 0
        data = first / "data"

        root = project(base, "uninterrupted", data)
        proc, t0 = stage(root)
        code, log = finish(proc)
        assert code == 0, log[-3000:]
        clean = time.perf_counter() - t0
        reference = ending(root)
        rows.append(("none: the uninterrupted train stage", "-", f"{clean:.1f} s (the whole stage)", "-"))

        root = project(base, "sigterm", data)
        proc, _ = stage(root)
        checkpointed(root, 20)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code, log = finish(proc)
        assert code == 143, log[-3000:]
        stopped = time.perf_counter() - sent
        again = resume(root)
        rows.append(("SIGTERM to the train stage (preemption)",
                     f"{stopped:.1f} s from SIGTERM to exit 143, the step's checkpoint written",
                     f"{again:.1f} s (the resumed stage)", lost(root, reference)))

        root = project(base, "worker", data)
        older = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
        proc, t0 = stage(root)
        checkpointed(root, 20)
        os.kill(worker_of("train:mha", older), signal.SIGKILL)
        killed = time.perf_counter()
        code, log = finish(proc)
        assert code == 0, log[-3000:]
        rows.append(("kill -9 to the run's Ray worker", "Ray notices the dead worker and runs the task again",
                     f"{time.perf_counter() - killed:.1f} s from the kill to the stage's end "
                     f"({time.perf_counter() - t0 - clean:+.1f} s against uninterrupted)", lost(root, reference)))

        root = project(base, "disk", data)
        (root / "checkpoints").mkdir()
        size = ((base / "uninterrupted" / "checkpoints" / "mha" / "step-000100.safetensors").stat().st_size
                * 3 // 2 // 4096 + 1) * 4096
        kept = base / "disk-kept"
        kept.mkdir()
        script = (f"mount -t tmpfs -o size={size} kvf-full checkpoints && {sys.executable} -m stages.train; "
                  f"rc=$?; cp -a checkpoints/. {kept}/; exit $rc")
        proc, t0 = stage(root, argv=["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script])
        code, log = finish(proc)
        assert code == 1 and "no space left on its device" in log, log[-3000:]
        failed = time.perf_counter() - t0
        shutil.rmtree(root / "checkpoints")
        shutil.copytree(kept, root / "checkpoints")
        again = resume(root)
        rows.append(("the disk fills at a checkpoint (checkpoints/ on a small tmpfs)",
                     f"at the step-40 write; the stage exits 1 after {failed:.1f} s, naming the file",
                     f"{again:.1f} s (the resumed stage, room made)", lost(root, reference)))

        rows += server_outages(base, data, reference)

        port = free_port()
        root = project(base, "server", data, tracking=f"http://127.0.0.1:{port}")
        proc, t0 = stage(root)
        code, log = finish(proc)
        assert code == 2 and "no MLflow server answers" in log, log[-3000:]
        rows.append(("no tracking server at tracking.uri", f"{time.perf_counter() - t0:.1f} s to exit 2, one line",
                     "-", "nothing (nothing was written)"))

        root = project(base, "busy", data)
        holder = subprocess.Popen([sys.executable, "-c", "import time; from stages import study_lock; "
                                   "study_lock('train'); print('held', flush=True); time.sleep(120)"],
                                  cwd=root, env=stage_env(), stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
        proc, t0 = stage(root)
        code, log = finish(proc)
        holder.kill()
        holder.wait()
        assert code == 2 and "another stage of this study is running" in log, log[-3000:]
        rows.append(("a second stage beside a running one", f"{time.perf_counter() - t0:.1f} s to exit 2, one line",
                     "-", "nothing (nothing was written)"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for path in RAY_DIRS:
            shutil.rmtree(path, ignore_errors=True)

    print("| fault | detected | recovered | lost |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
