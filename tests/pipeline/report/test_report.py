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


CAPACITY = (4, 8, 16, 32)  # stored pairs of the fake capacity curves, 200 beyond-window answers each
WIDTHS = {"n_layers": 2, "n_heads": 4, "d_head": 16}


def _hits(p: float, n: int, rng) -> np.ndarray:
    """`n` answers of which exactly round(p n) are right, in a random order."""
    return rng.permutation(np.r_[np.ones(round(p * n), dtype=int), np.zeros(n - round(p * n), dtype=int)])


def _result(point, family, kind, per_token, p_far, seed=0, bpb=3.0, rng=None, attention=None, lr=3e-3,
            curve=None):
    rng = rng or np.random.default_rng()
    n = 400
    gaps = np.r_[rng.integers(2, REACH[0] + 1, n // 2), rng.integers(REACH[1] + 1, 80, n // 2)]
    hits = np.r_[rng.random(n // 2) < 0.9, rng.random(n // 2) < p_far].astype(int)
    windows = rng.normal(bpb, 0.2, 16)
    curve = curve or [p_far ** (k / 4) for k in CAPACITY]
    capacity = {str(k): {"hits_beyond_window": _hits(r, 200, rng).tolist()} for k, r in zip(CAPACITY, curve)}
    for v in capacity.values():
        v["acc_beyond_window"] = float(np.mean(v["hits_beyond_window"]))
    return {"variant": point, "family": family, "kind": kind, "seed": seed, "params": 1000,
            "run": point if seed == 0 else f"{point}.seed{seed}", "lr": lr,
            "lr_candidates": {"0.003": 1.0, "0.01": 1.1}, "reach": REACH,
            "attention": {"kind": kind, **(attention or {})}, "widths": WIDTHS,
            "cache_bytes_per_token_analytic": per_token,
            "bpb": {"128": float(windows.mean()), "1024": 3.5},
            "bpb_windows": {"128": windows.tolist(), "1024": [3.5] * 4},
            "mqar": {"p4_all": {"acc": float(hits.mean()), "n": n, "hits": hits.tolist(), "gaps": gaps.tolist(),
                                "decode": {"acc_beyond_window": float(hits[n // 2:].mean())}}},
            "capacity": capacity,
            "bpb_by_distance": {"context": 128, "window": 16, "lt_W": bpb + 0.5, "ge_W": bpb, "ge_4W": bpb - 0.1,
                                "past_trained": bpb + 1.5, "longest": 1024},
            "lm_eval": {"scores": {"kvf_passkey_mc": {"acc": 0.5}}},
            "decode": [{"mode": "prefill", "context_len": 1024, "tokens_held": 1056, "cache_bytes": 1,
                        "peak_rss_bytes": 300 * 2**20, "decode_tokens_per_s": 250.0,
                        "prefill_tokens_per_s": 1e4}]}


# What the claims read their validation curves from (convergence.claim_curves, as a fake study's)
CURVES = {"mqar_beyond": "val/mqar_acc_far", "bpb": "val/bpb",
          "capacity90": {k: f"val/mqar_capacity_p{k}" for k in CAPACITY},
          "answers": {"val/mqar_acc_far": 1024, "val/mqar_acc_near": 1024}  # 256 sequences x 4 queries
          | {f"val/mqar_capacity_p{k}": 200 for k in CAPACITY}}


def history(steps=300, every=30, far=None, bpb=None, capacity=None, bpb_se=0.02):
    """Validation records every `every` steps: MQAR far recall, bits per byte (lists, one value per
    validation, or one number for all) and the capacity curve (one list per validation, or one)."""
    n = steps // every
    def each(v, default):
        v = default if v is None else v
        return list(v) if isinstance(v, (list, tuple, np.ndarray)) and np.ndim(v) == 1 and len(v) == n \
            else [v] * n
    far, bpb = each(far, 0.5), each(bpb, 3.0)
    caps = capacity if capacity is not None and np.ndim(capacity) == 2 else [capacity or [1.0] * len(CAPACITY)] * n
    return [{"step": every * (i + 1), "val/bpb": bpb[i], "val/bpb_se": bpb_se, "val/mqar_acc_far": far[i],
             "val/mqar_acc_near": 0.9, **{f"val/mqar_capacity_p{k}": c for k, c in zip(CAPACITY, caps[i])}}
            for i in range(n)]


def settled(results, steps=300):
    """Each trained result's run with flat validation curves at its own final numbers."""
    runs = {}
    for r in results:
        if "checkpoint_run" in r:
            continue
        hits, gaps = np.array(r["mqar"]["p4_all"]["hits"]), np.array(r["mqar"]["p4_all"]["gaps"])
        curve = [r["capacity"][str(k)]["acc_beyond_window"] for k in CAPACITY]
        runs[r["run"]] = (history(steps, steps // 10, far=float(hits[gaps > REACH[1]].mean()),
                                  bpb=float(np.mean(r["bpb_windows"]["128"])), capacity=curve), steps)
    return runs


def _study(rng):
    out = []
    for seed in range(3):
        out += [
            _result("mha", "mha", "mha", 1024.0, 0.95, seed, bpb=3.0, rng=rng),
            _result("tpa.rank_k1", "tpa", "tpa", 256.0, 0.9, seed, bpb=3.0, rng=rng),
            _result("swa.window16", "swa", "swa", 0.25, 0.06, seed, rng=rng, attention={"window": 16}),
            _result("swa.window32", "swa", "swa", 0.5, 0.06, seed, rng=rng, attention={"window": 32}),
            _result("tensor_cache.window16", "tensor_cache", "tensor_cache", 0.5, 0.7, seed, rng=rng,
                    attention={"window": 16, "write": "exact"}, curve=[1.0, 1.0, 0.95, 0.5]),
            _result("cm.window16", "cm", "tensor_cache", 0.5, 0.7, seed, rng=rng,
                    attention={"window": 16, "write": "chunk_mean"}),
            _result("linear", "linear", "linear", 1.0, 0.5, seed, rng=rng, curve=[1.0, 0.6, 0.3, 0.1]),
        ]
        # chunk_mean: the exact write's answers with 10 hits and 10 misses swapped (difference 0)
        tc, cm = out[-3]["mqar"]["p4_all"], out[-2]["mqar"]["p4_all"]
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


def test_capacity_at_90_percent_with_its_intervals():
    rng = np.random.default_rng()
    results = _study(rng)
    pts = {p.name: p for p in points(rows_from_results(results, CONTEXT, TRAINED))}
    tc, lin = pts["tensor_cache.window16"], pts["linear"]
    # 1.0, 1.0, 0.95, 0.5 at 4..32: 0.9 crossed between 16 and 32, 0.05 / 0.45 of the way in log2
    assert tc.mean("capacity90") == pytest.approx(2 ** (4 + 0.05 / 0.45))
    assert lin.mean("capacity90") == pytest.approx(2 ** (2 + 0.1 / 0.4))
    assert pts["mha"].censored() is None and pts["swa.window16"].censored() == "below"
    assert pts["swa.window16"].mean("capacity90") == 0
    lo, hi = tc.example_interval("capacity90")
    assert lo < tc.mean("capacity90") < hi
    d, (dlo, dhi) = tc.difference(lin, "capacity90")
    assert d == pytest.approx(tc.mean("capacity90") - lin.mean("capacity90")) and 0 < dlo < d < dhi


def test_claims_budgets_and_files(tmp_path):
    rng = np.random.default_rng()
    results = _study(rng)
    paths = write_report(results, CONTEXT, TRAINED, tmp_path, budgets=[20_000, 10**9], runs=settled(results),
                         curves=CURVES)
    md = paths["md"].read_text()
    claims = {line.split("|")[1].strip(): line for line in md.splitlines() if "verdict" not in line
              and line.count("|") == 9 and "**" in line}
    # recall 0.7 vs 0.06 over 200 far queries x 3 seeds: far outside any interval, and so on every
    # validation of the last 40 % (flat curves at those numbers)
    assert "**supported**" in claims["Tensor Cache > SWA at W=16, beyond-window recall"]
    # the same recall in both writes, example by example but 20 swapped: the interval holds zero
    assert "**inconclusive**" in claims["exact write > chunk_mean at W=16, beyond-window recall"]
    # both SWA points have no more bytes than the Tensor Cache (window 32 has as many)
    bounded = "Tensor Cache (tensor_cache.window16) > best bounded baseline with no more cache bytes"
    assert "| swa.window" in claims[bounded]
    tpa = "TPA (tpa.rank_k1) < MHA in bits per byte at 300 steps (equal budget)"
    assert "| 0.25 |" in claims[tpa]  # cache ratio 256 / 1024
    assert "**supported**" in claims["Tensor Cache (tensor_cache.window16) > linear attention (linear) in capacity "
                                     "at 90 %"]
    # budget 20,000 bytes holds only the swa/tc/cm points (8-16 KiB): the two Tensor Cache writes
    # (recall ~0.7, two families) are the best and the best of another family
    budget = next(line for line in md.splitlines() if line.startswith("| 19.5 KiB | mqar_beyond |"))
    best, other = (budget.split("|")[i].split(" (")[0].strip() for i in (3, 4))
    assert {best, other} == {"tensor_cache.window16", "cm.window16"}
    capacity_budget = next(line for line in md.splitlines() if line.startswith("| 19.5 KiB | capacity90 |"))
    assert "tensor_cache.window16 (17.3)" in capacity_budget
    # the front for recall: the cheapest swa point, then the tensor caches, then MHA-family points
    front = next(line for line in md.splitlines() if line.startswith("| mqar_beyond | "))
    assert front.index("swa.window16") < front.index("window16 (") < front.index("mha")
    # the paper's measures: capacity per stored pairs and bits by distance, means over seeds
    def section(title):
        return md.split(f"## {title}")[1].split("\n## ")[0].splitlines()

    cap = next(line for line in section("Memory capacity") if line.startswith("| swa.window16 |"))
    assert cap.split("|")[2:7] == [f" {round(0.06 ** (k / 4) * 200) / 200:.3f} " for k in CAPACITY] + [" <4 "]
    cap = next(line for line in section("Memory capacity") if line.startswith("| tensor_cache.window16 |"))
    assert cap.split("|")[6] == f" {2 ** (4 + 0.05 / 0.45):.1f} "
    dist = section("Bits per byte by distance")
    assert "windows of 128 tokens (the trained length" in dist[2] and "t >= T (extrapolation)" in dist[4]
    mha = next(line for line in dist if line.startswith("| mha |"))
    assert [float(x) for x in mha.split("|")[2:6]] == [3.5, 3.0, 2.9, 4.5]
    assert paths["capacity"].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == len(results) and rows[0]["point"] == "mha"
    tc = next(r for r in rows if r["point"] == "tensor_cache.window16")
    assert float(tc["capacity90"]) == pytest.approx(2 ** (4 + 0.05 / 0.45)) and tc["capacity_censored"] == ""
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_the_capacity_figure_marks_each_head_width():
    from pipeline.report.frontier import state_scales

    rng = np.random.default_rng()
    results = _study(rng)
    results.append({**_result("linear.d_head8", "linear", "linear", 0.1, 0.5, rng=rng),
                    "widths": {"n_layers": 2, "n_heads": 4, "d_head": 8}})
    scales = state_scales(points(rows_from_results(results, CONTEXT, TRAINED)))
    assert list(scales) == [8, 16]  # fixed states only: linear and tensor_cache (cm is one too), not swa or mha
    assert scales[8] == ["linear.d_head8 (h d_h^2 = 256)"]
    assert sorted(scales[16]) == ["cm.window16 (h d_h^2 = 1,024)", "linear (h d_h^2 = 1,024)",
                                  "tensor_cache.window16 (h d_h^2 = 1,024)"]
