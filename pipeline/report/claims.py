"""The seed papers' claims, computed on the study's own points.

Each claim compares two points on one measure: the difference of their means over seeds, its
95 % bootstrap interval (each point's seeds resampled, the shared evaluation examples resampled
once for both: `stats.difference_interval`) and a verdict: *supported* when the whole interval
lies on the side the claim predicts, *contradicted* when it lies on the other side,
*inconclusive* when it holds zero; *not converged*, whatever the interval, when either point was
still learning on the claim's measure (recall or bits per byte) when its training stopped
(`pipeline.report.convergence`). With one seed the
interval covers evaluation examples only, not training noise: the table says so.

1. Tensor Cache beats the sliding window of the same width at recall beyond the window
   (the L2 memory is what it adds): MQAR far, every window both families have.
2. The exact write beats the chunk-mean shortcut at the same window: MQAR far.
3. Tensor Cache beats the best bounded baseline (sliding window, linear attention, Infini, or an
   inference-time cache policy on a full-attention checkpoint) whose cache is no larger: MQAR far,
   for every Tensor Cache point with such a baseline.
4. TPA reaches lower bits per byte than MHA at the trained length, with a smaller cache (T6).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.report import stats

if TYPE_CHECKING:
    from pipeline.report.points import Point

BOUNDED_BASELINES = ("swa", "linear", "infini")


def _is_tc(p: "Point", write: str) -> bool:
    return p.kind == "tensor_cache" and p.attention.get("write", "exact") == write


def _claim(text: str, a: "Point", b: "Point", column: str, higher_supports: bool) -> dict | None:
    found = a.difference(b, column)
    if found is None:
        return None
    difference, interval = found
    return {"claim": text, "a": a.name, "b": b.name, "measure": column,
            "a_mean": a.mean(column), "b_mean": b.mean(column), "difference": difference,
            "interval": interval,
            "verdict": "not converged" if "still learning" in (a.training(column), b.training(column))
            else stats.verdict(interval, higher_supports),
            "cache_ratio": a.cache_bytes / b.cache_bytes if b.cache_bytes else None}


def evaluate_claims(pts: list["Point"]) -> list[dict]:
    out = []
    swa = {p.attention.get("window"): p for p in pts if p.kind == "swa" and not p.attention.get("sinks")}
    chunk_mean = {p.attention.get("window"): p for p in pts if _is_tc(p, "chunk_mean")}
    exact = [p for p in pts if _is_tc(p, "exact")]
    for tc in exact:
        w = tc.attention.get("window")
        if w in swa:
            out.append(_claim(f"Tensor Cache > SWA at W={w}, beyond-window recall", tc, swa[w], "mqar_beyond", True))
        if w in chunk_mean:
            out.append(_claim(f"exact write > chunk_mean at W={w}, beyond-window recall", tc, chunk_mean[w],
                              "mqar_beyond", True))
    for tc in exact:
        rivals = [p for p in pts if (p.kind in BOUNDED_BASELINES or p.attention.get("cache_policy"))
                  and p.cache_bytes <= tc.cache_bytes
                  and p.mean("mqar_beyond") is not None]
        if rivals:
            best = max(rivals, key=lambda p: p.mean("mqar_beyond"))
            out.append(_claim(f"Tensor Cache ({tc.name}) > best bounded baseline with no more cache bytes",
                              tc, best, "mqar_beyond", True))
    mha = [p for p in pts if p.kind == "mha"]
    for tpa in (p for p in pts if p.kind == "tpa"):
        for ref in mha:
            out.append(_claim(f"TPA ({tpa.name}) < MHA in bits per byte", tpa, ref, "bpb", False))
    return [c for c in out if c is not None]


def claims_table(claims: list[dict], seeds: int) -> list[str]:
    if not claims:
        return ["No claim applies to this study's points (it needs the families the claims compare)."]
    note = ("Intervals: bootstrap over seeds and evaluation examples." if seeds > 1 else
            "One seed: the intervals cover evaluation examples only, not the spread between training "
            "runs, so a verdict here is weaker than it looks.")
    lines = [note, "", "| claim | measure | a | b | difference a - b [95 % CI] | cache a / b | verdict |",
             "|---|---|---|---|---|---:|---|"]
    for c in claims:
        lo, hi = c["interval"]
        ratio = "-" if c["cache_ratio"] is None else f"{c['cache_ratio']:.3g}"
        lines.append(f"| {c['claim']} | {c['measure']} | {c['a']} ({c['a_mean']:.3f}) | {c['b']} ({c['b_mean']:.3f}) | "
                     f"{c['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {ratio} | **{c['verdict']}** |")
    return lines
