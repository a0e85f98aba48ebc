"""What an evaluation result (`results/eval/<key>.json`) says, as the report's row and as the
headline metrics MLflow records: the evaluate stage logs them, the report stage draws them."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Measure(NamedTuple):
    column: str
    title: str
    unit: str
    higher_is_better: bool
    panel: bool = True  # drawn on the frontier (lm-eval: too few episodes to rank, table only)


CAPACITY_LEVEL = 0.9  # capacity: the stored pairs at which beyond-window recall falls below this

MEASURES = [
    Measure("mqar_beyond", "MQAR recall, keys beyond every model's reach", "accuracy", True),
    Measure("bpb", "held-out text at the trained length", "bits per byte (lower is better)", False),
    Measure("mqar_one_hop", "MQAR recall, keys within the smallest window (one hop)", "accuracy", True),
    Measure("mqar_reach", "MQAR recall, keys past one hop, within every model's reach", "accuracy", True),
    Measure("bpb_longest", "held-out text at the longest context (extrapolation)",
            "bits per byte (lower is better)", False),
    Measure("capacity90", f"MQAR capacity: stored pairs at which beyond-window recall falls below {CAPACITY_LEVEL:g}",
            "stored pairs", True),
    Measure("lm_eval", "lm-eval tasks (mean score)", "score", True, panel=False),
]


BY_COLUMN = {m.column: m for m in MEASURES}
L2_OFF = ("mqar_beyond", "bpb")  # measured again with a Tensor Cache's L2 switched off


def capacity_at(counts, recall, level: float = CAPACITY_LEVEL) -> np.ndarray:
    """The stored-pair count at which recall first falls below `level` (along the last axis of
    `recall`, one column per entry of the ascending `counts`): interpolated in log2 of the count
    between the last count at or above it and the first below it; 0 when the smallest count is
    already below (no tested count is held); the largest count when none is below (a lower bound:
    `capacity_censored`)."""
    x, r = np.log2(np.asarray(counts, dtype=np.float64)), np.asarray(recall, dtype=np.float64)
    below = r < level
    first = np.argmax(below, axis=-1)  # 0 where nothing is below
    i = np.clip(first, 1, len(x) - 1)
    r1, r2 = np.take_along_axis(r, (i - 1)[..., None], -1)[..., 0], np.take_along_axis(r, i[..., None], -1)[..., 0]
    frac = np.where(r1 > r2, (r1 - level) / np.where(r1 > r2, r1 - r2, 1.0), 0.0)
    out = np.exp2(x[i - 1] + frac * (x[i] - x[i - 1]))
    out = np.where(first == 0, 0.0, out)
    return np.where(below.any(axis=-1), out, 2.0 ** x[-1])


def capacity_censored(counts, recall, level: float = CAPACITY_LEVEL) -> str | None:
    """"above" when recall never falls below `level` (capacity at least the largest count), "below"
    when it is below already at the smallest count, None when it crosses in between."""
    r = np.asarray(recall, dtype=np.float64)
    return "above" if not (r < level).any() else "below" if r[0] < level else None


def _examples(result: dict, trained_len: int) -> dict[str, list[float]]:
    """Per-example values of each measure, in the same order for every run (same eval sets).

    MQAR queries by what a model can reach (`reach`: the study's shortest and longest n_layers
    (W - 1); the smallest window W_min is the one `bpb_by_distance` splits at): one hop, the key
    within W_min - 1 tokens, which one layer of every window attends to directly; reach, past
    that but within n_layers (W_min - 1), which every model reaches only by composing layers;
    beyond, past n_layers (W_max - 1), which no window reaches. Gaps between the two reaches
    are in no bucket."""
    out: dict[str, list[float]] = {"mqar_one_hop": [], "mqar_reach": [], "mqar_beyond": []}
    reach = result.get("reach")
    window = (result.get("bpb_by_distance") or {}).get("window")
    for bucket in result.get("mqar", {}).values():
        if reach is None or "hits" not in bucket:
            continue
        for hit, gap in zip(bucket["hits"], bucket["gaps"]):
            if gap > reach[1]:
                out["mqar_beyond"].append(float(hit))
            elif window is not None and gap < window:
                out["mqar_one_hop"].append(float(hit))
            elif window is not None and gap <= reach[0]:
                out["mqar_reach"].append(float(hit))
    windows = result.get("bpb_windows", {})
    if windows:
        out["bpb"] = windows.get(str(trained_len), [])
        out["bpb_longest"] = windows[max(windows, key=int)]
    return {k: v for k, v in out.items() if v}


def row(result: dict, report_context: int, trained_len: int) -> dict:
    """The scalars of one result, and `_examples` (per measure, per example) for the intervals."""
    examples = _examples(result, trained_len)
    mq = result.get("mqar", {})
    decoded = [v["decode"] for v in mq.values() if "decode" in v]
    scores = [next(iter(s.values())) for s in result.get("lm_eval", {}).get("scores", {}).values() if s]
    decode = result.get("decode", [])
    longest = max(decode, key=lambda d: d["tokens_held"]) if decode else None

    def mean_of(key: str, buckets: list[dict]) -> float | None:
        values = [b[key] for b in buckets if b.get(key) is not None]
        return float(np.mean(values)) if values else None

    bytes_ = result["cache_bytes_per_token_analytic"] * report_context
    same = {k: result.get(k) for k in ("reach", "bpb_by_distance")}  # the buckets of the L2-on measures
    off = _examples({**result["l2_off"], **same}, trained_len) if result.get("l2_off") else {}
    curve = {int(k): v.get("acc_beyond_window") for k, v in result.get("capacity", {}).items()}
    curve = {k: curve[k] for k in sorted(curve) if curve[k] is not None}
    counts = list(curve)
    return {
        "key": result.get("key", result.get("run")), "run": result.get("run"),
        "point": result["variant"], "family": result.get("family", result["variant"]),
        "kind": result["kind"], "seed": result.get("seed", 0), "lr": result.get("lr"),
        "params": result["params"], "cache_bytes": bytes_,
        **{m: (float(np.mean(examples[m])) if m in examples else None)
           for m in ("mqar_beyond", "mqar_one_hop", "mqar_reach", "bpb", "bpb_longest")},
        "lm_eval": float(np.mean(scores)) if scores else None,
        # a Tensor Cache with L2 switched off (its gate at 0): the window alone
        **{f"{m}_l2_off": (float(np.mean(off[m])) if m in off else None) for m in L2_OFF},
        "mqar_beyond_decode": mean_of("acc_beyond_window", decoded),
        "decode_tokens_per_s": longest["decode_tokens_per_s"] if longest else None,
        "peak_rss_mib": longest["peak_rss_bytes"] / 2**20 if longest else None,
        "measured_context": longest["tokens_held"] if longest else None,
        "_examples": examples, "_attention": result.get("attention", {}), "_widths": result.get("widths"),
        "capacity90": float(capacity_at(counts, list(curve.values()))) if len(curve) > 1 else None,
        "capacity_censored": capacity_censored(counts, list(curve.values())) if len(curve) > 1 else None,
        "_capacity": curve,
        "_capacity_hits": {int(k): v["hits_beyond_window"] for k, v in result.get("capacity", {}).items()
                           if v.get("hits_beyond_window")},  # the capacity's bootstrap (pipeline.report.stats)
        "_cells": result.get("lm_eval", {}).get("by_cell", []),  # retrieval by (length, depth)
        "_by_distance": result.get("bpb_by_distance"),
        "_lr_candidates": result.get("lr_candidates", {}),
        "init_from": result.get("init_from"),  # a retrofit's parent point (the report reads it from params)
    }


def rows_from_results(results: list[dict], report_context: int, trained_len: int) -> list[dict]:
    return [row(r, report_context, trained_len) for r in results]


def headline(result: dict, report_context: int, trained_len: int) -> dict[str, float]:
    """The report's measures of one run as MLflow metrics, so the UI draws the same frontier
    (`frontier/log10_cache_bytes`: the UI's scatter has no log axis)."""
    r = row(result, report_context, trained_len)
    out = {"frontier/cache_bytes": r["cache_bytes"],
           "frontier/log10_cache_bytes": float(np.log10(max(r["cache_bytes"], 1)))}
    for m in MEASURES:
        if r[m.column] is not None:
            out[f"frontier/{m.column}"] = r[m.column]
    for m in L2_OFF:  # how much of a Tensor Cache's measure comes through L2
        if r[f"{m}_l2_off"] is not None and r[m] is not None:
            out[f"l2/{m}_off"] = r[f"{m}_l2_off"]
            out[f"l2/{m}_through_l2"] = r[m] - r[f"{m}_l2_off"] if m != "bpb" else r[f"{m}_l2_off"] - r[m]
    return out

