"""Faults where studies run, timed on this machine: for each, how long until the stage notices and
stops (or carries on), how long the recovery takes, and what was lost, against one uninterrupted
run of the same study (the tiny study of the tests: one MHA run of 100 steps, checkpoints every 20).

    .venv/bin/python benchmarks/faults.py            # a markdown table on stdout, ~4 minutes

Each fault starts from a fresh copy of the prepared data; "lost" compares the final weights (every
tensor, bit for bit) and validation metrics with the uninterrupted run's. The stages start their
own local Ray, as a user's do.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safetensors.torch import load_file  # noqa: E402

from tests.studies import stage_env, write_params  # noqa: E402

LONG = {"steps": 100, "checkpoint_every": 20, "log_every": 5, "eval_every": 50}
VAL = ("val/bpb", "val/loss", "val/mqar_acc_near", "val/mqar_acc_far")
RAY_DIRS: list[Path] = []


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

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
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
