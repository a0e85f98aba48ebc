"""Convergence pilot (issue 25): how many steps until validation stops moving, at a study's size?

Trains a few points of a study's params for a long budget (every validation logged), then prints
each run's learning curve (with the capacity validation sets, `val/mqar_capacity_p<k>`, when the
study has them) and, per measure, the step after which it stays within the report's
convergence tolerances (pipeline/report/convergence.py): recall, every MQAR accuracy within
RECALL_RISE of its final value; bpb, bits per byte within BPB_DROP of their final value. The
cosine schedule spans the whole budget, so a study trained for fewer steps anneals sooner: read
the settle step as a lower bound for the study's `train.steps`, not as its value.

    .venv/bin/python benchmarks/convergence_pilot.py --steps 1500 --eval-every 100 \\
        --points mha tensor_cache.window6 linear mla.kv_lora_rank8
Runs prepare + train in a work folder (default runs/pilot, resumable), then prints a markdown
table per run and one JSON line with every curve.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.sweep import expand  # noqa: E402
from pipeline.report.convergence import BPB_DROP, RECALL_RISE  # noqa: E402


def pilot_params(study: dict, points: list[str], steps: int, eval_every: int) -> dict:
    """The study's params, its variants cut to `points` (swept fields fixed at the point's
    value), trained `steps` steps with a validation every `eval_every`, one seed, one rate."""
    params = yaml.safe_load(yaml.safe_dump(study))
    expanded = {p.name: p for family, attention in params["variants"].items() for p in expand(family, attention)}
    missing = sorted(set(points) - set(expanded))
    if missing:
        raise SystemExit(f"--points: {', '.join(missing)} not in the study (it has {', '.join(expanded)})")
    families = [expanded[p].family for p in points]
    if len(set(families)) < len(families):
        raise SystemExit("--points: one point per family (each trains under its family's name)")
    params["variants"] = {expanded[p].family: expanded[p].attention for p in points}
    params["match_params"]["reference"] = families[0]
    lr = params["train"]["lr"]
    params["train"].update(steps=steps, eval_every=eval_every, checkpoint_every=eval_every,
                           seeds=[params["train"]["seeds"][0]], lr=lr[0] if isinstance(lr, list) else lr)
    params["tracking"] = {"uri": None, "experiment": "pilot"}
    params["compute"]["temp_dir"] = "runs/ray"
    return params


def settle_step(evals: list[dict], measure: str) -> int | None:
    """The first validation step after which every later validation stays within the report's
    tolerance of the final one on `measure` ("recall": every MQAR accuracy, "bpb"); None when
    only the final one does."""
    end = evals[-1]
    recall = [k for k in end if k.startswith("val/mqar_acc_")]

    def within(h: dict) -> bool:
        if measure == "bpb":
            return h["val/bpb"] - end["val/bpb"] <= BPB_DROP * abs(end["val/bpb"])
        return all(end[k] - h[k] <= RECALL_RISE for k in recall if k in h)

    for i, r in enumerate(evals[:-1]):
        if all(within(h) for h in evals[i:]):
            return r["step"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"), help="the study to pilot")
    ap.add_argument("--points", nargs="+", required=True, help="point names, the first one the size reference")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--workdir", default=str(REPO / "runs" / "pilot"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    params = pilot_params(yaml.safe_load(Path(args.params).read_text()), args.points, args.steps, args.eval_every)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{work.resolve()}/mlflow.db"}
    for stage in ("prepare", "train"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, check=True)
    curves = {}
    for point in args.points:
        meta = json.loads((work / "checkpoints" / point.split(".")[0] / "model.json").read_text())
        evals = [h for h in meta["history"] if "val/objective" in h]
        curves[point] = evals
        capacity = sorted((k for k in evals[-1] if k.startswith("val/mqar_capacity_p")), key=lambda k: int(k[19:]))
        keys = ["val/objective", "val/bpb", *sorted(k for k in evals[-1] if k.startswith("val/mqar_acc_")), *capacity]
        print(f"\n### {point}: within the report's tolerances of its final value from step "
              f"{settle_step(evals, 'recall')} (recall) and {settle_step(evals, 'bpb')} (bpb) of {args.steps}\n")
        print("| step | " + " | ".join(k.removeprefix("val/") for k in keys) + " |")
        print("|---:|" + "---:|" * len(keys))
        for h in evals:
            print(f"| {h['step']} | " + " | ".join(f"{h[k]:.3f}" for k in keys) + " |")
    print(json.dumps({"bench": "convergence_pilot", "steps": args.steps, "points": args.points,
                      "settle_step": {p: {m: settle_step(e, m) for m in ("recall", "bpb")} for p, e in curves.items()},
                      "curves": curves}))


if __name__ == "__main__":
    main()
