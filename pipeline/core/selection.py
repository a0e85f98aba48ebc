"""Best over learning rate: per point and seed, the rate whose run has the lowest validation
objective (`val/objective` of the train stage: the training mixture's loss on the validation
plays and the MQAR validation sets). The evaluation sets the report shows play no part in the
choice. Ties go to the rate written first in `train.lr`.

The export and evaluate stages work on the selected runs only; each evaluation result is named
by the selection key (`<point>[.seed<k>]`) and records the rate that won and every candidate's
objective, so the report can say which rate won for each point.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from pipeline.core import checkpoint
from pipeline.core.params import Params, Run

OBJECTIVE = "val/objective"


class Selected(NamedTuple):
    run: Run  # the winner
    candidates: dict[float, float]  # lr -> its validation objective


def choose(candidates: dict[float, float]) -> float:
    """The rate with the lowest objective (NaN never wins; ties: the first written)."""
    finite = {lr: v for lr, v in candidates.items() if not math.isnan(v)}
    if not finite:
        raise ValueError("no learning rate has a finite validation objective")
    return min(finite, key=lambda lr: finite[lr])


def select(params: Params, ckpt_root: Path) -> dict[str, Selected]:
    """{selection key: the winning run and every candidate}, keys in `Params.runs()` order."""
    by_key: dict[str, list[Run]] = {}
    for run in params.runs():
        by_key.setdefault(run.key, []).append(run)
    selected = {}
    for key, runs in by_key.items():
        objectives = {}
        for run in runs:
            final = checkpoint.load_final_meta(ckpt_root / run.name, check=False)  # the metrics only
            if final is None:
                raise FileNotFoundError(f"{ckpt_root / run.name}: no completed checkpoint; run the train stage")
            value = final["metrics"].get(OBJECTIVE)
            if value is None and len(runs) > 1:
                raise ValueError(f"{ckpt_root / run.name}: its checkpoint has no {OBJECTIVE}; "
                                 "train it again (make repro)")
            objectives[run.lr] = float("nan") if value is None else float(value)
        best = runs[0].lr if len(runs) == 1 else choose(objectives)
        selected[key] = Selected(next(r for r in runs if r.lr == best), objectives)
    return selected
