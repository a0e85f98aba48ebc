"""Points: a study's result rows grouped by point (one row per seed), with their means,
intervals, differences and Pareto fronts."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline.core.results import Measure
from pipeline.report import stats


class Point(NamedTuple):
    name: str
    family: str
    kind: str
    attention: dict
    params: int
    cache_bytes: float
    rows: list[dict]  # one per seed

    @property
    def widths(self) -> dict | None:
        """n_layers, n_heads, d_head of its model (None for results written before they were kept)."""
        return self.rows[0].get("_widths")

    @property
    def init_from(self) -> str | None:
        """A retrofit's parent point (None for a point trained from scratch or a cache policy)."""
        return self.rows[0].get("init_from")

    @property
    def steps(self) -> int | None:
        """The training steps of its runs (a cache policy: its checkpoint's), None when unread."""
        return self.rows[0].get("steps")

    def mean(self, col: str) -> float | None:
        ys = [r[col] for r in self.rows if r.get(col) is not None]
        return float(np.mean(ys)) if ys else None

    def seed_interval(self, col: str) -> stats.Interval | None:
        return stats.seed_interval([r[col] for r in self.rows if r.get(col) is not None])

    def examples(self, col: str) -> list[list[float]] | None:
        per_seed = [r["_examples"][col] for r in self.rows if col in r["_examples"]]
        if not per_seed or len(per_seed) != len(self.rows) or len({len(x) for x in per_seed}) != 1:
            return None
        return per_seed

    def capacity_hits(self) -> list[dict[int, list[int]]] | None:
        """Per seed, the beyond-window hits at each stored-pair count (the capacity's examples);
        None unless every seed kept them for the same counts."""
        per_seed = [r.get("_capacity_hits") for r in self.rows]
        if not all(per_seed) or len({tuple(sorted(h)) for h in per_seed}) != 1 or len(per_seed[0]) < 2:
            return None
        return per_seed

    def example_interval(self, col: str) -> stats.Interval | None:
        if col == "capacity90":
            hits = self.capacity_hits()
            return stats.capacity_interval(hits) if hits else None
        ex = self.examples(col)
        return stats.example_interval(ex) if ex else None

    def difference(self, other: "Point", col: str) -> tuple[float, stats.Interval] | None:
        """mean(self) - mean(other) and its bootstrap interval over both points' seeds and the
        shared examples; None when the two were not scored on the same examples."""
        if col == "capacity90":
            ha, hb = self.capacity_hits(), other.capacity_hits()
            if ha is None or hb is None or set(ha[0]) != set(hb[0]) \
                    or any(len(ha[0][c]) != len(hb[0][c]) for c in ha[0]):
                return None
            return self.mean(col) - other.mean(col), stats.capacity_difference_interval(ha, hb)
        ea, eb = self.examples(col), other.examples(col)
        if ea is None or eb is None or len(ea[0]) != len(eb[0]):
            return None
        return self.mean(col) - other.mean(col), stats.difference_interval(ea, eb)

    def censored(self) -> str | None:
        """The capacity's bound, when every seed's is one: "above" (recall never fell below the
        level: at least the largest count), "below" (below already at the smallest count)."""
        flags = {r.get("capacity_censored") for r in self.rows}
        return flags.pop() if len(flags) == 1 else None

    def training(self, column: str | None = None) -> str | None:
        """On the measure `column` (recall for an mqar_* column, bits per byte for a bpb* one,
        either when None): "still learning" when any seed's run was still learning on it at its
        last step (`pipeline.report.convergence`), "converged" when every seed's run was read and
        none was, None when a run's history is missing."""
        key = ("still_learning" if column is None else
               "recall_learning" if column.startswith("mqar") else "bpb_learning")
        flags = [r.get("_learning") for r in self.rows]
        if any(f and f[key] for f in flags):
            return "still learning"
        return "converged" if flags and all(flags) else None

    def training_cell(self) -> str:
        """The points table's cell: recall and bits per byte, each converged or still learning."""
        recall, bpb = self.training("mqar"), self.training("bpb")
        if recall is None:
            return "-"
        if recall == bpb:
            return recall
        settled = {m: "settled" if v == "converged" else "learning" for m, v in (("recall", recall), ("bpb", bpb))}
        return f"recall {settled['recall']}, bpb {settled['bpb']}"

    def interval(self, col: str) -> stats.Interval | None:
        """What the plot's bars show: over seeds when there are several, else over examples."""
        return self.seed_interval(col) or self.example_interval(col)


def points(rows: list[dict]) -> list[Point]:
    """Rows grouped by point, in order of cache bytes (then name)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["point"], []).append(r)
    out = [Point(name, g[0]["family"], g[0]["kind"], g[0]["_attention"], g[0]["params"], g[0]["cache_bytes"],
                 sorted(g, key=lambda r: r["seed"])) for name, g in groups.items()]
    return sorted(out, key=lambda p: (p.cache_bytes, p.name))


def capacity(p: Point) -> dict[int, float]:
    """Mean over seeds of recall beyond every window, per number of stored pairs."""
    pairs = sorted({k for r in p.rows for k, v in r["_capacity"].items() if v is not None})
    return {k: float(np.mean([r["_capacity"][k] for r in p.rows if r["_capacity"].get(k) is not None]))
            for k in pairs}


def by_distance(p: Point) -> dict[str, float] | None:
    parts = [r["_by_distance"] for r in p.rows if r.get("_by_distance")]
    if not parts:
        return None
    means = {k: float(np.mean([d[k] for d in parts])) for k in ("lt_W", "ge_W", "ge_4W", "past_trained")
             if all(d.get(k) is not None for d in parts)}
    return means | {k: parts[0].get(k) for k in ("window", "context", "longest")}


def front(pts: list[Point], measure: Measure) -> list[Point]:
    have = [p for p in pts if p.mean(measure.column) is not None]
    idx = stats.pareto_front([p.cache_bytes for p in have], [p.mean(measure.column) for p in have],
                             measure.higher_is_better)
    return [have[i] for i in idx]

