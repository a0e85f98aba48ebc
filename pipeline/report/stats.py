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
