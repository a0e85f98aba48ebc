"""Pipeline benchmarks: default `dvc repro` wall time, no-op `dvc repro`, training tokens/s per
variant relative to MHA at T = 1024.

    .venv/bin/python benchmarks/pipeline_timing.py repro      # fresh copy of the repo, then dvc repro twice
    .venv/bin/python benchmarks/pipeline_timing.py speed      # tokens/s per variant, params.yaml widths
Prints one JSON object per measurement.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def bench_repro() -> None:
    """Copy the tracked tree to a fresh temp repo (no data, checkpoints, mlflow.db), run the
    Makefile's steps (`python -m tools.dvc_setup; dvc repro`), then a no-op `dvc repro`."""
    work = Path(tempfile.mkdtemp(prefix="kvfbench"))
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([*git, "add", "-A"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=work, check=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.core.dvc_setup"], cwd=work, env=env, check=True)
    log = open(work / "repro.log", "w")
    subprocess.run(["dvc", "repro"], cwd=work, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro"], cwd=work, env=env, check=True, capture_output=True)
    noop = time.perf_counter() - t0
    metrics = json.loads((work / "metrics" / "train.json").read_text())["variants"]
    print(json.dumps({"bench": "dvc_repro", "cpus": os.cpu_count(), "full_s": round(full, 1),
                      "noop_s": round(noop, 2), "loadavg_1m_after": os.getloadavg()[0], "workdir": str(work),
                      "val": {k: {m: round(v[m], 4) for m in ("val/bpb", "val/mqar_acc_near",
                                                                "val/mqar_acc_far") if m in v}
                              for k, v in metrics.items()}}), flush=True)


def bench_speed(T: int = 1024, batch: int = 4, rounds: int = 6, threads: int = 1) -> None:
    """Training tokens/s (forward + backward + AdamW) per variant at context T, one thread.
    Rounds are interleaved (every variant steps once per round) so that drift in the box's
    load hits all variants alike; the median over rounds after a warm-up round."""
    import statistics

    import torch
    import torch.nn.functional as F

    from models import build_model
    from pipeline.core.params import load_params
    from pipeline.train.loop import make_optimizer

    torch.set_num_threads(threads)
    params = load_params(REPO / "params.yaml")
    models = {}
    train = params.train.model_copy(update={"lr": params.lrs[0]})
    for name in params.points:
        torch.manual_seed(0)
        model = build_model(params.model_config_for(name))
        models[name] = (model, make_optimizer(model, train))
    x = torch.randint(3, 259, (batch, T + 1))
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(rounds + 1):
        for name, (model, opt) in models.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times[name].append(time.perf_counter() - t0)
    out = {name: batch * T / statistics.median(ts) for name, ts in times.items()}
    mha = out["mha"]
    print(json.dumps({"bench": "train_tokens_per_s", "T": T, "batch": batch, "threads": threads,
                      "rounds": rounds, "tokens_per_s": {k: round(v) for k, v in out.items()},
                      "relative_to_mha": {k: round(v / mha, 3) for k, v in out.items()}}), flush=True)


if __name__ == "__main__":
    which = sys.argv[1:] or ["speed", "repro"]
    if "speed" in which:
        bench_speed()
    if "repro" in which:
        bench_repro()
