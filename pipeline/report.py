"""The report stage: the memory-quality frontier from results/eval/*.json (one per point and seed).

- report/frontier.png: one panel per quality measure, x = cache bytes at `eval.report_context`
  tokens (log scale); per family a line through its sweep at the mean over seeds, bars of the 95 %
  interval (over seeds when there are several, else over evaluation examples); the Pareto front
  across families as a dashed step line.
- report/frontier.md: every point (memory, parameters, the rate that won, each measure with both
  intervals), the front per measure, the budget table (`eval.byte_budgets`) and the seeds' claims
  with the interval of each difference and a verdict (`pipeline.claims`).
- report/frontier.csv: one row per evaluated run (the `dvc plots` data).
- report/capacity.png: recall beyond every window as the stored pairs grow (`eval.capacity_pairs`).
Logged to a parent MLflow run that points to the runs it summarises.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline import stats


class Measure(NamedTuple):
    column: str
    title: str
    unit: str
    higher_is_better: bool
    panel: bool = True  # drawn on the frontier (lm-eval: too few episodes to rank, table only)


MEASURES = [
    Measure("mqar_far", "MQAR recall, keys beyond every window's reach", "accuracy", True),
    Measure("bpb", "held-out text at the trained length", "bits per byte (lower is better)", False),
    Measure("mqar_near", "MQAR recall, keys inside every window", "accuracy", True),
    Measure("bpb_longest", "held-out text at the longest context (extrapolation)",
            "bits per byte (lower is better)", False),
    Measure("lm_eval", "lm-eval tasks (mean score)", "score", True, panel=False),
]
BY_COLUMN = {m.column: m for m in MEASURES}


# --------------------------------------------------------------------------- rows: one per result
def _examples(result: dict, trained_len: int) -> dict[str, list[float]]:
    """Per-example values of each measure, in the same order for every run (same eval sets)."""
    out: dict[str, list[float]] = {"mqar_far": [], "mqar_near": []}
    reach = result.get("reach")
    for bucket in result.get("mqar", {}).values():
        if reach is None or "hits" not in bucket:
            continue
        for hit, gap in zip(bucket["hits"], bucket["gaps"]):
            if gap > reach[1]:
                out["mqar_far"].append(float(hit))
            elif gap <= reach[0]:
                out["mqar_near"].append(float(hit))
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
    return {
        "key": result.get("key", result.get("run")), "run": result.get("run"),
        "point": result["variant"], "family": result.get("family", result["variant"]),
        "kind": result["kind"], "seed": result.get("seed", 0), "lr": result.get("lr"),
        "params": result["params"], "cache_bytes": bytes_,
        **{m: (float(np.mean(examples[m])) if m in examples else None)
           for m in ("mqar_far", "mqar_near", "bpb", "bpb_longest")},
        "lm_eval": float(np.mean(scores)) if scores else None,
        "mqar_far_decode": mean_of("acc_beyond_window", decoded),
        "decode_tokens_per_s": longest["decode_tokens_per_s"] if longest else None,
        "peak_rss_mib": longest["peak_rss_bytes"] / 2**20 if longest else None,
        "measured_context": longest["tokens_held"] if longest else None,
        "_examples": examples, "_attention": result.get("attention", {}),
        "_capacity": {int(k): v.get("acc_beyond_window") for k, v in result.get("capacity", {}).items()},
        "_by_distance": result.get("bpb_by_distance"),
        "_lr_candidates": result.get("lr_candidates", {}),
    }


def rows_from_results(results: list[dict], report_context: int, trained_len: int) -> list[dict]:
    return [row(r, report_context, trained_len) for r in results]


# --------------------------------------------------------------------------- points: rows grouped
class Point(NamedTuple):
    name: str
    family: str
    kind: str
    attention: dict
    params: int
    cache_bytes: float
    rows: list[dict]  # one per seed

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

    def example_interval(self, col: str) -> stats.Interval | None:
        ex = self.examples(col)
        return stats.example_interval(ex) if ex else None

    def difference(self, other: "Point", col: str) -> tuple[float, stats.Interval] | None:
        """mean(self) - mean(other) and its bootstrap interval over both points' seeds and the
        shared examples; None when the two were not scored on the same examples."""
        ea, eb = self.examples(col), other.examples(col)
        if ea is None or eb is None or len(ea[0]) != len(eb[0]):
            return None
        return self.mean(col) - other.mean(col), stats.difference_interval(ea, eb)

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
    return {k: float(np.mean([d[k] for d in parts])) for k in ("lt_W", "ge_W", "ge_4W")
            if all(d.get(k) is not None for d in parts)} | {"window": parts[0]["window"], "context": parts[0]["context"]}


def front(pts: list[Point], measure: Measure) -> list[Point]:
    have = [p for p in pts if p.mean(measure.column) is not None]
    idx = stats.pareto_front([p.cache_bytes for p in have], [p.mean(measure.column) for p in have],
                             measure.higher_is_better)
    return [have[i] for i in idx]


# --------------------------------------------------------------------------- the figure
def plot_frontier(pts: list[Point], report_context: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in MEASURES if m.panel and any(p.mean(m.column) is not None for p in pts)]
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.8 * nrows + 0.8), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    families = list(dict.fromkeys(p.family for p in pts))
    seeds = max(len(p.rows) for p in pts)
    for ax, m in zip(axes.flat, panels):
        for i, family in enumerate(families):
            mine = [p for p in pts if p.family == family and p.mean(m.column) is not None]
            if not mine:
                continue
            xs, ys = [p.cache_bytes for p in mine], [p.mean(m.column) for p in mine]
            bars = [p.interval(m.column) for p in mine]
            yerr = np.array([[y - b.low if b else 0.0 for y, b in zip(ys, bars)],
                             [b.high - y if b else 0.0 for y, b in zip(ys, bars)]])
            ax.errorbar(xs, ys, yerr=np.clip(yerr, 0, None), fmt="o-", color=f"C{i % 10}", capsize=3,
                        lw=1.2, ms=4, label=family)
        on_front = front(pts, m)
        if on_front:
            fx = [p.cache_bytes for p in on_front]
            fy = [p.mean(m.column) for p in on_front]
            ax.step(fx, fy, where="post", color="k", ls="--", lw=1, alpha=0.6, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(f"cache bytes at {report_context:,} tokens (batch 1)")
        ax.set_ylabel(m.unit)
        ax.set_title(m.title, fontsize=10)
        if m.unit == "accuracy":
            ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2, loc="best")
    bars = "95 % interval over seeds" if seeds > 1 else "95 % bootstrap interval over evaluation examples (1 seed)"
    fig.suptitle(f"kv-frontier: memory-quality frontier\nmean over up to {seeds} seed(s); bars: {bars}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_capacity(pts: list[Point], path: Path) -> None:
    """Recall beyond every window's reach as the number of stored pairs grows, one line per
    point: where each bounded state saturates (a figure that says so when there is no curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {p.name: capacity(p) for p in pts}
    curves = {k: v for k, v in curves.items() if len(v) > 1}
    fig, ax = plt.subplots(figsize=(8, 5))
    if not curves:
        ax.text(0.5, 0.5, "no memory-capacity curve: set eval.capacity_pairs (two counts or more)",
                ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    families = list(dict.fromkeys(p.family for p in pts))
    styles = ["-", "--", ":", "-."]
    for p in pts:
        if p.name not in curves:
            continue
        i = families.index(p.family)
        rank = [q.name for q in pts if q.family == p.family].index(p.name)
        xs = list(curves[p.name])
        ax.plot(xs, [curves[p.name][x] for x in xs], styles[rank % 4], marker="o", ms=3,
                color=f"C{i % 10}", label=p.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("stored (key, value) pairs")
    ax.set_ylabel("MQAR recall, keys beyond every window's reach")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    ax.set_title("memory capacity (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the tables
def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _iv(iv: stats.Interval | None, spec=".3f") -> str:
    return "-" if iv is None else f"[{format(iv.low, spec)}, {format(iv.high, spec)}]"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _lrs(p: Point) -> str:
    won = [r["lr"] for r in p.rows if r.get("lr") is not None]
    tried = len(p.rows[0]["_lr_candidates"]) if p.rows[0]["_lr_candidates"] else 1
    if not won:
        return "-"
    counts = {lr: won.count(lr) for lr in dict.fromkeys(won)}
    text = ", ".join(f"{lr:g}" + (f" ({c}/{len(won)})" if len(won) > 1 else "") for lr, c in counts.items())
    return text + (f" of {tried}" if tried > 1 else "")


def points_table(pts: list[Point], report_context: int) -> list[str]:
    cols = MEASURES
    lines = ["| point | family | kind | params | cache bytes | seeds | lr (won) | "
             + " | ".join(f"{m.column}: mean, seeds CI, examples CI" for m in cols) + " |",
             "|---|---|---|---:|---:|---:|---|" + "---|" * len(cols)]
    for p in pts:
        cells = [f"{_fmt(p.mean(m.column))} {_iv(p.seed_interval(m.column))} {_iv(p.example_interval(m.column))}"
                 for m in cols]
        lines.append(f"| {p.name} | {p.family} | {p.kind} | {p.params:,} | {_bytes(p.cache_bytes)} | "
                     f"{len(p.rows)} | {_lrs(p)} | " + " | ".join(cells) + " |")
    return lines


def front_table(pts: list[Point]) -> list[str]:
    lines = ["| measure | points on the front, by cache bytes |", "|---|---|"]
    for m in MEASURES:
        if m.panel and any(p.mean(m.column) is not None for p in pts):
            lines.append(f"| {m.column} | " + " -> ".join(
                f"{p.name} ({_bytes(p.cache_bytes)}, {_fmt(p.mean(m.column))})" for p in front(pts, m)) + " |")
    return lines


def budget_table(pts: list[Point], budgets: list[int]) -> list[str]:
    """Per budget and measure: the best point within it, the best of another family, the gap."""
    lines = ["| budget | measure | best point | best of another family | difference [95 % CI] |",
             "|---:|---|---|---|---|"]
    for budget in budgets:
        within = [p for p in pts if p.cache_bytes <= budget]
        for m in MEASURES:
            if not m.panel:
                continue
            have = [p for p in within if p.mean(m.column) is not None]
            if not have:
                continue
            sign = 1 if m.higher_is_better else -1
            best = max(have, key=lambda p: sign * p.mean(m.column))
            others = [p for p in have if p.family != best.family]
            if not others:
                lines.append(f"| {_bytes(budget)} | {m.column} | {best.name} ({_fmt(best.mean(m.column))}) | - | - |")
                continue
            other = max(others, key=lambda p: sign * p.mean(m.column))
            d = best.difference(other, m.column)
            lines.append(f"| {_bytes(budget)} | {m.column} | {best.name} ({_fmt(best.mean(m.column))}) | "
                         f"{other.name} ({_fmt(other.mean(m.column))}) | "
                         + ("-" if d is None else f"{d[0]:+.3f} {_iv(d[1])}") + " |")
    return lines


def markdown(pts: list[Point], report_context: int, budgets: list[int], claims: list[dict]) -> str:
    seeds = max(len(p.rows) for p in pts)
    lines = ["# Memory-quality frontier\n",
             f"{len(pts)} points, {seeds} seed(s) each. Cache bytes: analytic, at {report_context:,} tokens, "
             "batch 1. Each measure: the mean over seeds, its 95 % interval over seeds (t, needs two seeds "
             "or more) and its 95 % bootstrap interval over evaluation examples. MQAR far / near: queries "
             "whose key lies beyond every window's reach / inside every window. bpb: held-out bits per "
             "byte at the trained length; bpb_longest: at the longest evaluated context "
             "(extrapolation). lm-eval: too few episodes to rank models; shown here, not on the figure. "
             "lr (won): the learning rate chosen on validation for each seed, of how many tried.\n",
             "## Points\n", *points_table(pts, report_context), "",
             "## Pareto front\n", *front_table(pts), ""]
    if budgets:
        lines += ["## Budgets\n", "The best point whose cache fits each budget, the best point of any "
                  "other family within it, and their difference (bootstrap over seeds and examples).\n",
                  *budget_table(pts, budgets), ""]
    dist = {p.name: by_distance(p) for p in pts}
    if any(dist.values()):
        d0 = next(d for d in dist.values() if d)
        lines += ["## Bits per byte by distance into the context\n",
                  f"Held-out text at {d0['context']:,} bytes, split by the byte's position t in its window, "
                  f"W = {d0['window']} (the study's smallest window).\n",
                  "| point | t < W | t >= W | t >= 4W |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {_fmt(d.get('lt_W'))} | {_fmt(d.get('ge_W'))} | {_fmt(d.get('ge_4W'))} |"
                  for n, d in dist.items() if d] + [""]
    curves = {p.name: capacity(p) for p in pts}
    pairs = sorted({k for c in curves.values() for k in c})
    if pairs:
        lines += ["## Memory capacity\n", "MQAR recall beyond every window's reach as the number of "
                  "stored pairs grows (report/capacity.png).\n",
                  "| point | " + " | ".join(f"{k} pairs" for k in pairs) + " |", "|---|" + "---:|" * len(pairs)]
        lines += [f"| {n} | " + " | ".join(_fmt(c.get(k)) for k in pairs) + " |" for n, c in curves.items() if c]
        lines += [""]
    from pipeline.claims import claims_table

    lines += ["## The seeds' claims\n", *claims_table(claims, seeds), ""]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["key", "run", "point", "family", "kind", "seed", "lr", "params", "cache_bytes", "mqar_far",
              "mqar_near", "bpb", "bpb_longest", "lm_eval", "mqar_far_decode", "decode_tokens_per_s",
              "peak_rss_mib", "measured_context"]


def report_paths(out_dir: Path) -> dict[str, Path]:
    """The files the report stage writes (dvc.yaml lists the same)."""
    return {"png": out_dir / "frontier.png", "md": out_dir / "frontier.md", "csv": out_dir / "frontier.csv",
            "capacity": out_dir / "capacity.png"}


def write_report(results: list[dict], report_context: int, trained_len: int, out_dir: Path,
                 budgets: list[int] = ()) -> dict[str, Path]:
    from pipeline.claims import evaluate_claims

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_from_results(results, report_context, trained_len)
    pts = points(rows)
    paths = report_paths(out_dir)
    plot_frontier(pts, report_context, paths["png"])
    plot_capacity(pts, paths["capacity"])
    paths["md"].write_text(markdown(pts, report_context, list(budgets), evaluate_claims(pts)))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return paths


def headline(result: dict, report_context: int, trained_len: int) -> dict[str, float]:
    """The report's measures of one run as MLflow metrics, so the UI draws the same frontier
    (`frontier/log10_cache_bytes`: the UI's scatter has no log axis)."""
    r = row(result, report_context, trained_len)
    out = {"frontier/cache_bytes": r["cache_bytes"], "frontier/log10_cache_bytes": float(np.log10(max(r["cache_bytes"], 1)))}
    for m in MEASURES:
        if r[m.column] is not None:
            out[f"frontier/{m.column}"] = r[m.column]
    return out


def _family_run(tracker, family: str, frontier_id: str) -> str:
    """The family's parent run (reused across reports), nested under the latest frontier run."""
    found = tracker.client.search_runs([tracker.experiment_id], f"tags.`kvf.family_run` = '{family}'",
                                       max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = tracker.client.create_run(tracker.experiment_id, run_name=f"family {family}",
                                           tags={"kvf.family_run": family}).info.run_id
        tracker.client.set_terminated(run_id, "FINISHED")
    tracker.client.set_tag(run_id, "mlflow.parentRunId", frontier_id)
    return run_id


def run_report(params, root: Path, results_dir: Path, out_dir: Path) -> int:
    keys = params.result_keys()
    missing = [key for key in keys if not (results_dir / f"{key}.json").exists()]
    if missing:
        raise FileNotFoundError(f"{results_dir}: no evaluation results for {', '.join(missing)}; "
                                "run the evaluate stage")
    results = [json.loads((results_dir / f"{key}.json").read_text()) for key in keys]
    paths = write_report(results, params.eval.report_context, params.train.seq_len, out_dir,
                         params.eval.byte_budgets)
    run_id = log_report(params, root, results, paths)
    print(f"[report] {len(results)} run(s), {len(params.points)} point(s) -> {paths['png']}, {paths['md']} "
          f"(MLflow run {run_id})", flush=True)
    return 0


def log_report(params, root: Path, results: list[dict], paths: dict[str, Path]) -> str:
    """A new MLflow run `frontier` with the figure and tables; each family's parent run nested
    under it and each evaluated run under its family. Returns the frontier run's id."""
    from pipeline import tracking

    tracker = tracking.Tracker(tracking.tracking_uri(params.tracking.uri, root), params.tracking.experiment)
    for stale in tracker.client.search_runs([tracker.experiment_id], "tags.`kvf.report` = 'frontier' and "
                                            "attributes.status = 'RUNNING'"):
        tracker.client.set_terminated(stale.info.run_id, "KILLED")  # a report killed mid-way: not current
    run = tracker.client.create_run(tracker.experiment_id, run_name="frontier",
                                    tags={"kvf.report": "frontier", **tracking.source_tags(root)})
    ids = {}
    for r in results:  # the evaluated runs, by name (the newest finished run of that name)
        found = tracker.client.search_runs([tracker.experiment_id], f"tags.`{tracking.TAG_RUN}` = '{r['run']}' "
                                           "and attributes.status = 'FINISHED'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            ids[r["run"]] = found[0].info.run_id
    tracker.client.set_tag(run.info.run_id, "kvf.summarises", ",".join(ids.values()))
    for family in dict.fromkeys(r.get("family", r["variant"]) for r in results):
        parent = _family_run(tracker, family, run.info.run_id)
        for r in results:
            if r["run"] in ids and r.get("family", r["variant"]) == family:
                tracker.client.set_tag(ids[r["run"]], "mlflow.parentRunId", parent)
    for path in paths.values():
        tracker.client.log_artifact(run.info.run_id, str(path), "report")
    tracker.client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
