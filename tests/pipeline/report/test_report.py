"""The report: points with both intervals, the front, budgets and the claims, from results."""
import csv

import numpy as np
import pytest

from pipeline.core.results import rows_from_results
from pipeline.report import stats
from pipeline.report.frontier import write_report
from pipeline.report.points import points

REACH = [10, 30]  # shortest and longest window reach of the fake study
CONTEXT, TRAINED = 32768, 128


def _result(point, family, kind, per_token, p_far, seed=0, bpb=3.0, rng=None, attention=None, lr=3e-3):
    rng = rng or np.random.default_rng()
    n = 400
    gaps = np.r_[rng.integers(2, REACH[0] + 1, n // 2), rng.integers(REACH[1] + 1, 80, n // 2)]
    hits = np.r_[rng.random(n // 2) < 0.9, rng.random(n // 2) < p_far].astype(int)
    windows = rng.normal(bpb, 0.2, 16)
    return {"variant": point, "family": family, "kind": kind, "seed": seed, "params": 1000,
            "run": point if seed == 0 else f"{point}.seed{seed}", "lr": lr,
            "lr_candidates": {"0.003": 1.0, "0.01": 1.1}, "reach": REACH,
            "attention": {"kind": kind, **(attention or {})},
            "cache_bytes_per_token_analytic": per_token,
            "bpb": {"128": float(windows.mean()), "1024": 3.5},
            "bpb_windows": {"128": windows.tolist(), "1024": [3.5] * 4},
            "mqar": {"p4_all": {"acc": float(hits.mean()), "n": n, "hits": hits.tolist(), "gaps": gaps.tolist(),
                                "decode": {"acc_beyond_window": float(hits[n // 2:].mean())}}},
            "capacity": {str(k): {"acc_beyond_window": float(p_far ** (k / 4))} for k in (1, 2, 4)},
            "bpb_by_distance": {"context": 1024, "window": 16, "lt_W": bpb + 0.5, "ge_W": bpb, "ge_4W": bpb - 0.1},
            "lm_eval": {"scores": {"kvf_passkey_mc": {"acc": 0.5}}},
            "decode": [{"mode": "prefill", "context_len": 1024, "tokens_held": 1056, "cache_bytes": 1,
                        "peak_rss_bytes": 300 * 2**20, "decode_tokens_per_s": 250.0,
                        "prefill_tokens_per_s": 1e4}]}


def _study(rng):
    out = []
    for seed in range(3):
        out += [
            _result("mha", "mha", "mha", 1024.0, 0.95, seed, bpb=3.0, rng=rng),
            _result("tpa.rank_k1", "tpa", "tpa", 256.0, 0.9, seed, bpb=3.0, rng=rng),
            _result("swa.window16", "swa", "swa", 0.25, 0.06, seed, rng=rng, attention={"window": 16}),
            _result("swa.window32", "swa", "swa", 0.5, 0.06, seed, rng=rng, attention={"window": 32}),
            _result("tensor_cache.window16", "tensor_cache", "tensor_cache", 0.5, 0.7, seed, rng=rng,
                    attention={"window": 16, "write": "exact"}),
            _result("cm.window16", "cm", "tensor_cache", 0.5, 0.7, seed, rng=rng,
                    attention={"window": 16, "write": "chunk_mean"}),
        ]
        # chunk_mean: the exact write's answers with 10 hits and 10 misses swapped (difference 0)
        tc, cm = out[-2]["mqar"]["p4_all"], out[-1]["mqar"]["p4_all"]
        hits = np.array(tc["hits"])
        far = np.flatnonzero(np.array(tc["gaps"]) > REACH[1])
        ones, zeros = far[hits[far] == 1][:10], far[hits[far] == 0][:10]
        hits[ones], hits[zeros] = 0, 1
        cm.update(hits=hits.tolist(), gaps=tc["gaps"])
    return out


def test_points_carry_means_and_both_intervals():
    rng = np.random.default_rng()
    results = _study(rng)
    pts = {p.name: p for p in points(rows_from_results(results, CONTEXT, TRAINED))}
    tc = pts["tensor_cache.window16"]
    mine = [r for r in results if r["variant"] == "tensor_cache.window16"]
    far = [np.array(r["mqar"]["p4_all"]["hits"])[np.array(r["mqar"]["p4_all"]["gaps"]) > REACH[1]] for r in mine]
    assert tc.mean("mqar_beyond") == pytest.approx(np.mean([f.mean() for f in far]))
    assert tc.seed_interval("mqar_beyond") == stats.seed_interval([f.mean() for f in far])
    lo, hi = tc.example_interval("mqar_beyond")
    assert lo < tc.mean("mqar_beyond") < hi and hi - lo < 0.2
    assert tc.mean("bpb") == pytest.approx(np.mean([np.mean(r["bpb_windows"]["128"]) for r in mine]))
    assert tc.mean("bpb_longest") == 3.5 and tc.cache_bytes == 0.5 * CONTEXT


def test_claims_budgets_and_files(tmp_path):
    rng = np.random.default_rng()
    results = _study(rng)
    paths = write_report(results, CONTEXT, TRAINED, tmp_path, budgets=[20_000, 10**9])
    md = paths["md"].read_text()
    claims = {line.split("|")[1].strip(): line for line in md.splitlines() if "verdict" not in line
              and line.count("|") == 8 and "**" in line}
    # recall 0.7 vs 0.06 over 200 far queries x 3 seeds: far outside any interval
    assert "**supported**" in claims["Tensor Cache > SWA at W=16, beyond-window recall"]
    # the same recall in both writes, example by example but 20 swapped: the interval holds zero
    assert "**inconclusive**" in claims["exact write > chunk_mean at W=16, beyond-window recall"]
    # both SWA points have no more bytes than the Tensor Cache (window 32 has as many)
    bounded = "Tensor Cache (tensor_cache.window16) > best bounded baseline with no more cache bytes"
    assert "| swa.window" in claims[bounded]
    assert "TPA (tpa.rank_k1) < MHA in bits per byte" in claims
    assert "| 0.25 |" in claims["TPA (tpa.rank_k1) < MHA in bits per byte"]  # cache ratio 256 / 1024
    # budget 20,000 bytes holds only the swa/tc/cm points (8-16 KiB): the two Tensor Cache writes
    # (recall ~0.7, two families) are the best and the best of another family
    budget = next(line for line in md.splitlines() if line.startswith("| 19.5 KiB | mqar_beyond |"))
    best, other = (budget.split("|")[i].split(" (")[0].strip() for i in (3, 4))
    assert {best, other} == {"tensor_cache.window16", "cm.window16"}
    # the front for recall: the cheapest swa point, then the tensor caches, then MHA-family points
    front = next(line for line in md.splitlines() if line.startswith("| mqar_beyond | "))
    assert front.index("swa.window16") < front.index("window16 (") < front.index("mha")
    # the paper's measures: capacity per stored pairs and bits by distance, means over seeds
    def section(title):
        return md.split(f"## {title}")[1].split("\n## ")[0].splitlines()

    cap = next(line for line in section("Memory capacity") if line.startswith("| swa.window16 |"))
    assert cap.split("|")[2:5] == [f" {0.06 ** (k / 4):.3f} " for k in (1, 2, 4)]
    dist = next(line for line in section("Bits per byte by distance") if line.startswith("| mha |"))
    assert [float(x) for x in dist.split("|")[2:5]] == [3.5, 3.0, 2.9]
    assert paths["capacity"].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == len(results) and rows[0]["point"] == "mha"
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
