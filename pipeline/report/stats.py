"""The report's arithmetic: intervals over seeds, bootstrap intervals over evaluation examples,
intervals of a difference between two points, and the Pareto front.

Two intervals answer two questions and are kept apart:
- over seeds (`seed_interval`): would another training run land elsewhere? Student's t on the
  per-seed means; needs two seeds or more.
- over examples (`example_interval`): would other evaluation examples of the same kind give
  another number? A percentile bootstrap that resamples the examples. Every model is scored on
  the same examples (fixed seeds), so the resampled indices are shared across seeds and, in a
  difference, across the two points (a paired bootstrap).
A difference between two points (`difference_interval`) resamples both: the seeds of each point
(independently: seeds of two architectures are not paired) and the shared examples.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 2000


class Interval(NamedTuple):
    low: float
    high: float


def seed_interval(means: Sequence[float], level: float = LEVEL) -> Interval | None:
    """mean ± t_{n-1} * s / sqrt(n) over per-seed values; None with fewer than two."""
    from scipy.stats import t

    x = np.asarray(means, dtype=np.float64)
    if x.size < 2:
        return None
    half = t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return Interval(float(x.mean() - half), float(x.mean() + half))


def _examples(per_seed: Sequence[Sequence[float]]) -> np.ndarray:
    x = np.asarray(per_seed, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError("need one equally long row of example values per seed")
    return x


def example_interval(per_seed: Sequence[Sequence[float]], level: float = LEVEL, n_boot: int = N_BOOT,
                     seed: int = 0) -> Interval:
    """Percentile bootstrap of the mean over seeds of each seed's mean over examples, the
    examples resampled (one index draw shared by every seed: they saw the same examples)."""
    x = _examples(per_seed)
    idx = np.random.default_rng(seed).integers(0, x.shape[1], size=(n_boot, x.shape[1]))
    stats = x[:, idx].mean(axis=2).mean(axis=0)  # (n_boot,)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(lo), float(hi))


def difference_interval(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], level: float = LEVEL,
                        n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Bootstrap interval of mean(a) - mean(b): each side's seeds resampled on their own, the
    examples (the same for both sides) with one shared draw."""
    x, y = _examples(a), _examples(b)
    if x.shape[1] != y.shape[1]:
        raise ValueError("the two points were scored on different numbers of examples")
    rng = np.random.default_rng(seed)
    n = x.shape[1]
    stats = np.empty(n_boot)
    for i in range(n_boot):
        ex = rng.integers(0, n, size=n)
        sa = rng.integers(0, x.shape[0], size=x.shape[0])
        sb = rng.integers(0, y.shape[0], size=y.shape[0])
        stats[i] = x[np.ix_(sa, ex)].mean() - y[np.ix_(sb, ex)].mean()
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(lo), float(hi))


def _capacity_draws(per_seed: Sequence[dict[int, Sequence[int]]], idx: dict[int, np.ndarray],
                    seeds: np.ndarray) -> np.ndarray:
    """Capacity (`pipeline.core.results.capacity_at`) of each bootstrap draw: per count the drawn
    examples of the drawn seeds, each seed's curve, its capacity, the mean over the drawn seeds."""
    from pipeline.core.results import capacity_at

    counts = sorted(idx)
    curves = np.stack([np.stack([np.asarray(per_seed[s][c], dtype=np.float64)[idx[c]].mean(axis=1)
                                 for c in counts], axis=-1) for s in range(len(per_seed))])  # (S, B, C)
    capacity = capacity_at(counts, curves)  # (S, B)
    return np.take_along_axis(capacity, seeds, axis=0).mean(axis=0)


def capacity_interval(per_seed: Sequence[dict[int, Sequence[int]]], level: float = LEVEL, n_boot: int = N_BOOT,
                      seed: int = 0) -> Interval:
    """Percentile bootstrap of the capacity (mean over seeds): each count's examples resampled
    (one draw shared by every seed), the seeds resampled when there are several."""
    rng = np.random.default_rng(seed)
    idx = {c: rng.integers(0, len(h), size=(n_boot, len(h))) for c, h in per_seed[0].items()}
    seeds = rng.integers(0, len(per_seed), size=(len(per_seed), n_boot)) if len(per_seed) > 1 else \
        np.zeros((1, n_boot), dtype=int)
    lo, hi = np.quantile(_capacity_draws(per_seed, idx, seeds), [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(lo), float(hi))


def capacity_difference_interval(a: Sequence[dict[int, Sequence[int]]], b: Sequence[dict[int, Sequence[int]]],
                                 level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Bootstrap interval of capacity(a) - capacity(b): the examples of each count (the same for
    both points) with one shared draw, each side's seeds on their own (as `difference_interval`)."""
    if set(a[0]) != set(b[0]) or any(len(a[0][c]) != len(b[0][c]) for c in a[0]):
        raise ValueError("the two points were scored on different capacity examples")
    rng = np.random.default_rng(seed)
    idx = {c: rng.integers(0, len(h), size=(n_boot, len(h))) for c, h in a[0].items()}
    sa = rng.integers(0, len(a), size=(len(a), n_boot))
    sb = rng.integers(0, len(b), size=(len(b), n_boot))
    stats = _capacity_draws(a, idx, sa) - _capacity_draws(b, idx, sb)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(lo), float(hi))


def verdict(interval: Interval, higher_supports: bool) -> str:
    """supported: the whole interval lies on the claimed side of zero; contradicted: on the other
    side; inconclusive: it holds zero."""
    lo, hi = interval
    if lo > 0 or hi < 0:
        return "supported" if (lo > 0) == higher_supports else "contradicted"
    return "inconclusive"


def pareto_front(costs: Sequence[float], values: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates (no more cost and no worse value, and better
    in one of the two), ordered by cost."""
    sign = 1.0 if higher_is_better else -1.0
    pts = [(float(c), sign * float(v)) for c, v in zip(costs, values)]
    front = []
    for i, (c, v) in enumerate(pts):
        dominated = any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for j, (c2, v2) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1]))
