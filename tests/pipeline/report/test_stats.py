"""The report's interval arithmetic against values computed independently here."""
import math

import numpy as np
import pytest

from pipeline.report import stats

T_975_DF2 = 4.302652729749464  # Student's t, 97.5 % quantile, 2 degrees of freedom (tables)
Z_975 = 1.959963984540054


def test_seed_interval_is_students_t():
    rng = np.random.default_rng()
    x = rng.normal(0.6, 0.1, size=3)
    half = T_975_DF2 * x.std(ddof=1) / math.sqrt(3)
    lo, hi = stats.seed_interval(x)
    assert lo == pytest.approx(x.mean() - half, rel=1e-9) and hi == pytest.approx(x.mean() + half, rel=1e-9)
    assert stats.seed_interval([0.5]) is None


@pytest.mark.parametrize("seeds", [1, 2])
def test_example_interval_matches_the_normal_approximation(seeds):
    rng = np.random.default_rng()
    n = 4000
    x = (rng.random((seeds, n)) < rng.uniform(0.2, 0.8)).astype(float)
    per_example = x.mean(axis=0)  # the seeds' average, example by example
    half = Z_975 * per_example.std(ddof=1) / math.sqrt(n)
    lo, hi = stats.example_interval(x, seed=int(rng.integers(1 << 30)))
    assert lo == pytest.approx(per_example.mean() - half, abs=0.004)
    assert hi == pytest.approx(per_example.mean() + half, abs=0.004)


def test_difference_interval_is_paired_over_examples():
    """One seed each: the interval of mean(a - b) over shared examples (normal approximation)."""
    rng = np.random.default_rng()
    n = 4000
    base = rng.random(n)
    a = (base < 0.6).astype(float)[None]
    b = ((base + rng.normal(0, 0.2, n)) < 0.5).astype(float)[None]  # correlated with a: pairing matters
    d = a[0] - b[0]
    half = Z_975 * d.std(ddof=1) / math.sqrt(n)
    lo, hi = stats.difference_interval(a, b, seed=int(rng.integers(1 << 30)))
    assert lo == pytest.approx(d.mean() - half, abs=0.004) and hi == pytest.approx(d.mean() + half, abs=0.004)
    unpaired_half = Z_975 * math.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    assert (hi - lo) / 2 < 0.9 * unpaired_half  # narrower than if the examples were independent


def test_difference_interval_widens_with_seed_spread():
    rng = np.random.default_rng()
    ex = rng.random(500)
    tight = np.stack([ex + 0.001 * k for k in range(3)])
    loose = np.stack([ex + 0.2 * k for k in range(3)])
    ref = ex[None]
    w = lambda iv: iv.high - iv.low  # noqa: E731
    assert w(stats.difference_interval(loose, np.repeat(ref, 3, 0))) > 5 * w(
        stats.difference_interval(tight, np.repeat(ref, 3, 0)))


def test_verdicts():
    assert stats.verdict(stats.Interval(0.1, 0.3), higher_supports=True) == "supported"
    assert stats.verdict(stats.Interval(-0.3, -0.1), higher_supports=True) == "contradicted"
    assert stats.verdict(stats.Interval(-0.3, -0.1), higher_supports=False) == "supported"
    assert stats.verdict(stats.Interval(-0.1, 0.2), higher_supports=True) == "inconclusive"


@pytest.mark.parametrize("higher", [True, False])
def test_pareto_front_against_a_sweep(higher):
    rng = np.random.default_rng()
    costs, values = rng.random(40), rng.random(40)
    # reference: walk by cost; a point is on the front iff it beats every cheaper point
    order = np.argsort(costs)
    best, expected = -np.inf, []
    for i in order:
        v = values[i] if higher else -values[i]
        if v > best:
            expected.append(int(i))
            best = v
    assert stats.pareto_front(costs, values, higher) == expected
