"""What Ray Train costs per run on this machine: the default study's MHA run trained as today (one
Ray task) and through Ray Train with 1 and 2 DDP workers (`compute.workers_per_run`), in one
local Ray, rounds interleaved so the box's drift hits every mode alike.

    .venv/bin/python benchmarks/ray_train_overhead.py [--steps 100] [--rounds 2]

Prints one JSON line per trial, then a markdown table: median wall seconds per run and the ratio
to the plain task. Data and Ray state go under runs/bench/ray_train/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "bench" / "ray_train"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray
    from ray.util.queue import Queue

    from pipeline.core import fanout
    from pipeline.core.data import verify_prepared
    from pipeline.core.fingerprint import source_hash
    from pipeline.core.params import load_params
    from pipeline.core.runs import TRAIN_CODE, train_job
    from pipeline.prepare.prepare import prepare
    from pipeline.train.ddp import fit_run
    from pipeline.train.driver import train_task

    params = load_params(REPO / "params.yaml")
    params.train.steps, params.train.checkpoint_every = args.steps, args.steps // 2
    data_dir = WORK / "data"
    if not (data_dir / "manifest.json").exists():
        prepare(params.data, data_dir)
    run = next(r for r in params.runs() if r.variant == "mha")
    base = train_job(params, run, source_hash(TRAIN_CODE), data_dir, WORK / "checkpoints",
                     verify_prepared(data_dir)["files"])
    compute = params.compute.model_copy(update={"num_cpus": 2, "temp_dir": str(WORK / "ray")})
    times: dict[str, list[float]] = {}
    with fanout.cluster(compute, REPO):
        queue = Queue()
        for round_ in range(args.rounds):
            for mode in ("task", "ray_train_1", "ray_train_2"):
                name = f"mha-{mode}-{round_}"
                job = base.model_copy(update={"run": name, "ckpt_dir": str(WORK / "checkpoints" / name)})
                shutil.rmtree(job.ckpt_dir, ignore_errors=True)
                shutil.rmtree(WORK / "storage", ignore_errors=True)
                t0 = time.perf_counter()
                if mode == "task":
                    refs = fanout.submit(train_task, {name: job}, "train", 1, 0, queue)
                else:
                    refs = fanout.submit(fit_run, {name: job}, "train", 0, 0, queue, int(mode[-1]), 1, 0,
                                         str(WORK / "storage"), 0)
                (_, result), = fanout.as_completed(refs)
                seconds = time.perf_counter() - t0
                while not queue.empty():
                    queue.get_nowait_batch(queue.qsize())
                assert result["status"] == "ok", result
                times.setdefault(mode, []).append(seconds)
                print(json.dumps({"mode": mode, "round": round_, "steps": args.steps, "wall_s": round(seconds, 1),
                                  "val_bpb": round(result["metrics"]["val/bpb"], 4),
                                  "loadavg_1m": os.getloadavg()[0]}), flush=True)
        ray.shutdown()
    plain = statistics.median(times["task"])
    print(f"\n| mode | wall per run (median of {args.rounds}) | vs one Ray task |\n|---|---:|---:|")
    for mode, seconds in times.items():
        print(f"| {mode} | {statistics.median(seconds):.1f} s | {statistics.median(seconds) / plain:.2f}x |")


if __name__ == "__main__":
    main()
