"""Claims beyond the seeds: a factored window against its Tensor Cache, a retrofit against the same
design from scratch and against the zero-step cache policy; the points table's steps."""
import numpy as np
import pytest

from pipeline.core.results import rows_from_results
from pipeline.report.claims import BPB_MARGIN, RECALL_MARGIN, evaluate_claims
from pipeline.report.frontier import write_report
from pipeline.report.points import points

from .test_report import CONTEXT, CURVES, TRAINED, _result, settled

TC = {"window": 16, "write": "exact"}
FACTORS = {"rank_q": None, "rank_k": 1, "rank_v": 2}


def _study(rng, factored_far, retrofit_bpb):
    out = []
    for seed in range(1):  # one seed: equal answers give a difference of exactly zero at every resample
        tc = _result("tensor_cache.window16", "tensor_cache", "tensor_cache", 0.5, 0.7, seed, rng=rng, attention=TC)
        same = {"mqar": tc["mqar"]}  # the same answers: a difference of exactly zero
        out += [
            _result("mha", "mha", "mha", 1024.0, 0.95, seed, rng=rng),
            _result("swa.window16", "swa", "swa", 0.25, 0.06, seed, rng=rng, attention={"window": 16}),
            tc,
            {**_result("tc_factored", "tc_factored", "tensor_cache", 0.2, factored_far or 0.7, seed, rng=rng,
                       attention={**TC, "factors": FACTORS}), **({} if factored_far is not None else same)},
            {**_result("tc_from_mha", "tc_from_mha", "tensor_cache", 0.5, 0.7, seed, bpb=retrofit_bpb, rng=rng,
                       attention=TC), **same, "init_from": "mha"},
            {**_result("mha+window16", "mha+window", "mha+window", 0.25, 0.06, seed, bpb=2.5, rng=rng,
                       attention={"cache_policy": {"policy": "window", "window": 16}}), "checkpoint_run":
             "mha" if seed == 0 else f"mha.seed{seed}"},
        ]
    return out


def _verdicts(results, tmp_path):
    """The verdicts, every run's validation curves flat at its own final numbers (the retrofit's
    over its 60 steps, the others' over 300)."""
    runs = settled([r for r in results if r["variant"] != "tc_from_mha"], 300)
    runs |= settled([r for r in results if r["variant"] == "tc_from_mha"], 60)
    paths = write_report(results, CONTEXT, TRAINED, tmp_path, runs=runs, curves=CURVES)
    md = paths["md"].read_text()
    claims = {line.split("|")[1].strip(): line.split("**")[-2] for line in md.splitlines()
              if line.startswith("| ") and line.rstrip().endswith("** |")}
    table = {line.split("|")[1].strip(): line.split("|")[8].strip() for line in md.split("## Points")[1]
             .split("\n## ")[0].splitlines() if line.startswith("| ")}
    return claims, table


def test_factored_retrofit_and_policy_claims(tmp_path):
    rng = np.random.default_rng()
    claims, table = _verdicts(_study(rng, factored_far=None, retrofit_bpb=3.0 + 10 * BPB_MARGIN), tmp_path)
    assert table["tc_from_mha"] == "60 from mha" and table["mha"] == "300" and table["mha+window16"] == "300"
    # equal answers: the factored window loses nothing, so no more than the margin
    assert claims[f"factored window (tc_factored) loses <= {RECALL_MARGIN:g} far recall vs Tensor Cache "
                  "at W=16"] == "supported"
    # the retrofit (a fifth of the steps): the same far recall, bits per byte far past the margin
    assert claims[f"retrofit tc_from_mha (20% of the steps) loses <= {RECALL_MARGIN:g} mqar_beyond "
                  "vs from scratch"] == "supported"
    assert claims[f"retrofit tc_from_mha (20% of the steps) loses <= {BPB_MARGIN:g} bpb vs from scratch at 60 vs "
                  "300 steps"] == "contradicted"
    # against the zero-step policy: far recall 0.7 vs 0.06, bits per byte 3.5 vs 2.5
    assert claims["retrofit tc_from_mha > mha+window16, the zero-step policy, in mqar_beyond"] == "supported"
    # the policy has no validation curve of its own: it stays at its evaluated bits per byte
    assert claims["retrofit tc_from_mha > mha+window16, the zero-step policy, in bpb at 60 vs 300 steps"] \
        == "contradicted"
    # the seeds' claims see only points trained from scratch
    assert [c for c in claims if c.startswith("Tensor Cache > SWA")] == [
        "Tensor Cache > SWA at W=16, beyond-window recall"]
    assert not any("tc_factored" in c or "tc_from_mha" in c for c in claims
                   if c.startswith(("Tensor Cache", "exact", "TPA")))


@pytest.mark.parametrize("far", [0.3, 0.69])
def test_a_factored_window_that_loses_recall(far, tmp_path):
    """0.4 worse: wholly past the margin (contradicted); 0.01 worse on random answers: the interval
    straddles -margin or lies above it, never contradicted."""
    claims, _ = _verdicts(_study(np.random.default_rng(), factored_far=far, retrofit_bpb=3.0), tmp_path)
    verdict = claims[f"factored window (tc_factored) loses <= {RECALL_MARGIN:g} far recall vs Tensor Cache at W=16"]
    assert (verdict == "contradicted") is (far == 0.3)


def test_without_a_partner_there_is_no_claim():
    rng = np.random.default_rng()
    results = [r for r in _study(rng, None, 3.0) if r["variant"] not in ("tensor_cache.window16", "mha+window16")]
    claims = evaluate_claims(points(rows_from_results(results, CONTEXT, TRAINED)))
    assert [c["claim"] for c in claims] == []


def test_a_bits_per_byte_claim_names_each_sides_steps_a_pretrained_zero_included():
    from types import SimpleNamespace as P

    from pipeline.report.claims import _budget

    assert _budget(P(steps=120), P(steps=0)) == " at 120 vs 0 steps"  # a policy on a pretrained point
    assert _budget(P(steps=300), P(steps=300)) == " at 300 steps (equal budget)"
    assert _budget(P(steps=60), P(steps=None)) == " at 60 vs ? steps"
    assert _budget(P(steps=None), P(steps=None)) == ""
