"""Convergence flags (a run still learning over its last fifth: the points table), and the claims'
rule: a verdict from the difference the claim states, on its own validation curve."""
import csv

import numpy as np
import pytest

from pipeline.core.results import rows_from_results
from pipeline.report import convergence
from pipeline.report.claims import evaluate_claims
from pipeline.report.frontier import write_report
from pipeline.report.points import points

from .test_report import CONTEXT, CURVES, TRAINED, _result, _study, history

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


def test_the_points_table_still_flags_a_run_still_learning(tmp_path):
    rng = np.random.default_rng()
    results = _study(rng)
    flat = _history([9, 8, 7.5, 7.4, 7.39, 7.389], [.3] * 6)
    rising = _history([9, 8, 7.5, 7.4, 7.4, 7.4], [.1, .1, .2, .2, .3, .4])
    runs = {r["run"]: (rising if r["variant"] == "swa.window16" else flat, STEPS) for r in results}
    paths = write_report(results, CONTEXT, TRAINED, tmp_path, runs=runs)
    md = paths["md"].read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[9].strip() for line in md.splitlines()
            if line.startswith("| ") and line.count("|") > 10}
    assert rows["swa.window16"] == "recall learning, bpb settled" and rows["tensor_cache.window16"] == "converged"
    assert paths["learning"].read_bytes()[:4] == b"\x89PNG"
    with paths["csv"].open() as f:
        flags = {r["point"]: (r["recall_learning"], r["bpb_learning"]) for r in csv.DictReader(f)}
    assert flags["swa.window16"] == ("True", "False")
    # no curves for the claims: none can be read by the rule
    assert {c["verdict"] for c in evaluate_claims(points(rows_from_results(results, CONTEXT, TRAINED)))} == \
        {"not tracked"}


# --------------------------------------------------------------------------- the claims' rule
def _pair(tc_far, swa_far, seeds=1, same=False):
    """Tensor Cache and SWA at W = 16 with these far recalls (`same`: SWA answers as the Tensor Cache)."""
    rng = np.random.default_rng()
    out = []
    for seed in range(seeds):
        tc = _result("tensor_cache.window16", "tensor_cache", "tensor_cache", 0.5, tc_far, seed, rng=rng,
                     attention={"window": 16, "write": "exact"})
        swa = _result("swa.window16", "swa", "swa", 0.25, swa_far, seed, rng=rng, attention={"window": 16})
        out += [tc, {**swa, "mqar": tc["mqar"]} if same else swa]
    return out


def _verdict(results, tc_far, swa_far):
    """The Tensor Cache > SWA claim, each run's far recall on the given validation curve."""
    runs = {r["run"]: (history(far=tc_far if r["kind"] == "tensor_cache" else swa_far), 300) for r in results}
    pts = points(rows_from_results(results, CONTEXT, TRAINED))
    for p in pts:
        for row in p.rows:
            row["_history"], row["steps"] = runs[row["run"]][0], 300
    return next(c for c in evaluate_claims(pts, CURVES) if c["claim"].startswith("Tensor Cache > SWA"))


RISE = [0.06] * 5 + list(np.linspace(0.06, 0.9, 5))  # flat, then rising through the last 40 %


@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("case, final, tc_curve, swa_curve, verdict", [
    ("held", (0.9, 0.06), [0.2, 0.5, 0.8] + [0.9] * 7, 0.06, "supported"),
    ("reversed", (0.06, 0.9), 0.06, [0.2, 0.5, 0.8] + [0.9] * 7, "contradicted"),
    ("still rising", (0.9, 0.06), RISE, 0.06, "not settled"),
    ("only at the end", (0.9, 0.06), [0.06] * 9 + [0.9], 0.06, "not settled"),
    ("equal", (0.7, 0.7), 0.7, 0.7, "inconclusive"),
])
def test_a_claim_is_judged_on_its_own_curve(case, final, tc_curve, swa_curve, verdict, seeds):
    c = _verdict(_pair(*final, seeds=seeds, same=case == "equal"), tc_curve, swa_curve)
    assert c["verdict"] == verdict, (case, c["tracked"])
    t = c["tracked"]
    assert t["from"] == pytest.approx(0.6) and t["steps"] == 5  # validations at 180, 210, ..., 300 of 300
    if case in ("still rising", "only at the end"):  # the end's interval excludes zero, the span's did not
        assert c["final"] == "supported" and t["holds"] < t["steps"] and t["step_verdicts"][-1] == "supported"


def test_a_steady_difference_that_never_cleared_zero_is_inconclusive():
    """0.02 of recall apart on 1,024 validation answers a side: inside every step's interval, flat."""
    c = _verdict(_pair(0.9, 0.06), 0.52, 0.5)
    assert c["final"] == "supported" and c["tracked"]["holds"] == 0 and abs(c["tracked"]["moved"]) < 0.05
    assert c["verdict"] == "inconclusive"


def test_each_steps_interval_is_the_two_sides_sampling_error():
    """One seed a side: each validation's interval is the difference's binomial (recall, unpaired)
    or normal (bits per byte, paired) spread, as the normal approximation gives it."""
    rng = np.random.default_rng()
    pa, pb, n = rng.uniform(0.5, 0.8), rng.uniform(0.1, 0.4), CURVES["answers"]["val/mqar_acc_far"]
    c = _verdict(_pair(0.9, 0.06), pa, pb)
    half = 1.96 * np.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n)
    for lo, hi in c["tracked"]["intervals"]:
        assert lo == pytest.approx(pa - pb - half, abs=0.012) and hi == pytest.approx(pa - pb + half, abs=0.012)
    # bits per byte: both points read the same windows, so their errors are paired through the
    # correlation of their held-out windows (validation logs no window of its own)
    tpa, mha = _result("tpa", "tpa", "tpa", 256.0, 0.9, rng=rng), _result("mha", "mha", "mha", 1024.0, 0.9, rng=rng)
    shared = rng.normal(3.0, 0.3, 16)  # each window's difficulty, common to both models
    mha["bpb_windows"]["128"] = (shared + rng.normal(0, 0.1, 16)).tolist()
    tpa["bpb_windows"]["128"] = (shared - 0.1 + rng.normal(0, 0.1, 16)).tolist()
    rho = np.corrcoef(tpa["bpb_windows"]["128"], mha["bpb_windows"]["128"])[0, 1]
    pts = points(rows_from_results([tpa, mha], CONTEXT, TRAINED))
    for p, bpb, se in zip(sorted(pts, key=lambda p: p.name, reverse=True), (2.9, 3.0), (0.02, 0.03)):
        for row in p.rows:
            row["_history"], row["steps"] = history(bpb=bpb, bpb_se=se), 300
    claim = evaluate_claims(pts, CURVES)[0]
    assert claim["claim"] == "TPA (tpa) < MHA in bits per byte at 300 steps (equal budget)"
    half = 1.96 * np.sqrt(0.02 ** 2 + 0.03 ** 2 - 2 * rho * 0.02 * 0.03)
    assert 0.5 < rho < 1 and half < 1.96 * np.sqrt(0.02 ** 2 + 0.03 ** 2) * 0.8  # pairing narrows it
    for lo, hi in claim["tracked"]["intervals"]:
        assert lo == pytest.approx(-0.1 - half, abs=0.006) and hi == pytest.approx(-0.1 + half, abs=0.006)


def test_which_validation_curve_stands_for_which_measure():
    from pipeline.core.params import MQARConfig

    mqar = MQARConfig(seq_len=128, num_pairs=4, pair_tokens=1, num_keys=16, num_values=8, num_fillers=16,
                      train_gaps=(2, 90), eval_gaps={"near": (2, 10), "far": (40, 90)}, num_eval=50,
                      num_queries=8, capacity_pairs=[4, 16])
    curves = convergence.claim_curves(mqar, (10, 30))
    assert curves["mqar_beyond"] == "val/mqar_acc_far" and curves["bpb"] == "val/bpb"
    assert curves["capacity90"] == {4: "val/mqar_capacity_p4", 16: "val/mqar_capacity_p16"}
    assert curves["answers"] == {"val/mqar_acc_far": 200, "val/mqar_acc_near": 200, "val/mqar_capacity_p4": 200,
                                 "val/mqar_capacity_p16": 400}
    # a far bucket some window reaches (gap 40 <= reach 60) is not beyond every window: no curve
    assert convergence.claim_curves(mqar, (10, 60))["mqar_beyond"] is None
    assert convergence.claim_curves(mqar, (10, 60))["capacity90"] is None
