"""Convergence flags: a run still learning over its last fifth (recall, bits per byte), the points
table and the claims."""
import csv

import numpy as np
import pytest

from pipeline.core.results import rows_from_results
from pipeline.report import convergence
from pipeline.report.claims import evaluate_claims
from pipeline.report.frontier import write_report
from pipeline.report.points import points

from .test_report import CONTEXT, TRAINED, _study

STEPS = 300


def _history(bpb, far, every=50):
    """Validation records every `every` steps (and training records between, which carry no
    val/ keys), with the given bits per byte and MQAR far accuracy at each validation; the
    objective falls throughout (the rule does not read it)."""
    out = []
    for i, (b, acc) in enumerate(zip(bpb, far), start=1):
        out.append({"step": i * every - 10, "train/loss": 9.0})
        out.append({"step": i * every, "val/bpb": b, "val/objective": 9.0 - i, "val/mqar_acc_far": acc,
                    "val/mqar_acc_near": 0.5})
    return out


@pytest.mark.parametrize("bpb,far,recall,bits", [
    ([9, 8, 7.5, 7.4, 7.39, 7.389], [.1, .2, .3, .3, .3, .3], False, False),  # flat over steps 200-300
    ([9, 8, 7.5, 7.4, 7.3, 7.2], [.1, .2, .3, .3, .3, .3], False, True),      # bpb still falling 2.7 %
    ([9, 8, 7.5, 7.4, 7.4, 7.4], [.1, .1, .1, .1, .2, .4], True, False),      # recall forming at the end
    ([9, 8, 7.5, 7.4, 7.3, 7.2], [.1, .1, .1, .1, .2, .4], True, True),
])
def test_learning_reads_the_last_fifth(bpb, far, recall, bits):
    flag = convergence.learning(_history(bpb, far), STEPS)
    assert (flag["from_step"], flag["to_step"]) == (200, 300)  # the last validation at or before 240
    assert flag["bpb_drop"] == pytest.approx((bpb[3] - bpb[5]) / bpb[3])
    assert flag["recall_rise"] == pytest.approx(max(far[5] - far[3], 0.0))
    assert (flag["recall_learning"], flag["bpb_learning"], flag["still_learning"]) == (recall, bits, recall or bits)


def test_one_validation_says_nothing():
    assert convergence.learning(_history([9.0], [0.1]), STEPS) is None


def test_a_claim_on_a_point_still_learning_is_not_converged(tmp_path):
    rng = np.random.default_rng()
    results = _study(rng)
    flat = _history([9, 8, 7.5, 7.4, 7.39, 7.389], [.3] * 6)
    rising = _history([9, 8, 7.5, 7.4, 7.4, 7.4], [.1, .1, .2, .2, .3, .4])
    runs = {r["run"]: (rising if r["variant"] == "swa.window16" else flat, STEPS) for r in results}
    paths = write_report(results, CONTEXT, TRAINED, tmp_path, runs=runs)
    md = paths["md"].read_text()
    claim = next(line for line in md.splitlines() if line.startswith("| Tensor Cache > SWA at W=16"))
    assert "**not converged**" in claim  # supported on its numbers (test_report), but SWA is still learning
    rows = {line.split("|")[1].strip(): line.split("|")[9].strip() for line in md.splitlines()
            if line.startswith("| ") and line.count("|") > 10}
    assert rows["swa.window16"] == "recall learning, bpb settled" and rows["tensor_cache.window16"] == "converged"
    assert paths["learning"].read_bytes()[:4] == b"\x89PNG"
    # without histories there is no flag, and the verdicts are the interval's
    pts = points(rows_from_results(results, CONTEXT, TRAINED))
    assert {p.training() for p in pts} == {None}
    assert "not converged" not in {c["verdict"] for c in evaluate_claims(pts)}


def test_a_claim_waits_only_for_its_own_measure(tmp_path):
    """Every point's bits per byte still fall and its recall is flat: the recall claims keep the
    interval's verdict, the bits-per-byte claim (TPA vs MHA) is not converged."""
    rng = np.random.default_rng()
    results = _study(rng)
    bpb_falling = _history([9, 8, 7.5, 7.4, 7.2, 7.0], [.3, .5, .6, .6, .6, .61])
    runs = {r["run"]: (bpb_falling, STEPS) for r in results}
    paths = write_report(results, CONTEXT, TRAINED, tmp_path, runs=runs)
    lines = paths["md"].read_text().splitlines()
    verdict = {line.split("|")[1].strip(): line.split("**")[-2] for line in lines
               if line.startswith("| ") and line.rstrip().endswith("** |")}
    assert verdict["Tensor Cache > SWA at W=16, beyond-window recall"] == "supported"  # as in test_report
    assert verdict["TPA (tpa.rank_k1) < MHA in bits per byte"] == "not converged"
    rows = {line.split("|")[1].strip(): line.split("|")[9].strip() for line in lines
            if line.startswith("| ") and line.count("|") > 10}
    assert {cell for name, cell in rows.items() if name != "point"} == {"recall settled, bpb learning"}
    with paths["csv"].open() as f:
        flags = {(r["recall_learning"], r["bpb_learning"], r["still_learning"]) for r in csv.DictReader(f)}
    assert flags == {("False", "True", "True")}
