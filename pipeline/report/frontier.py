"""The report stage: the memory-quality frontier from results/eval/*.json (one per point and seed).

- report/frontier.png: one panel per quality measure, x = cache bytes at `eval.report_context`
  tokens (log scale); per family a line through its sweep at the mean over seeds, bars of the 95 %
  interval (over seeds when there are several, else over evaluation examples); the Pareto front
  across families as a dashed step line.
- report/frontier.md: every point (memory, parameters, the rate that won, each measure with both
  intervals), the front per measure, the budget table (`eval.byte_budgets`) and the seeds' claims
  with the interval of each difference and a verdict (`pipeline.report.claims`).
- report/frontier.csv: one row per evaluated run (the `dvc plots` data).
- report/capacity.png: recall beyond every window as the stored pairs grow (`eval.capacity_pairs`).
- report/learning.png: validation curves per family, from the checkpoints' histories; a point
  still learning at its last step is flagged in the tables (`pipeline.report.convergence`).
Logged to an MLflow run `frontier` that names the runs it summarises.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline.core.results import CAPACITY_LEVEL, MEASURES, rows_from_results
from pipeline.report import stats
from pipeline.report.convergence import BPB_DROP, RECALL_RISE, claim_curves, histories, learning, plot_learning
from pipeline.report.points import Point, by_distance, capacity, front, points
from pipeline.report.retrieval import l2_table, plot_heatmaps, retrieval_table


# --------------------------------------------------------------------------- the figure
def _style(i: int, p: Point) -> dict:
    """The i-th family's look: ten colours, then squares; a retrofit hollow diamonds on a dotted
    line, labelled with where it came from (`tensor_cache<-mha`)."""
    if p.init_from:
        return {"fmt": "D:", "color": f"C{i % 10}", "mfc": "none", "label": f"{p.family} ({p.kind}<-{p.init_from})"}
    return {"fmt": "o-" if i < 10 else "s--", "color": f"C{i % 10}", "label": p.family}


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
            ax.errorbar(xs, ys, yerr=np.clip(yerr, 0, None), capsize=3, lw=1.2, ms=4, **_style(i, mine[0]))
        on_front = front(pts, m)
        if on_front:
            fx = [p.cache_bytes for p in on_front]
            fy = [p.mean(m.column) for p in on_front]
            ax.step(fx, fy, where="post", color="k", ls="--", lw=1, alpha=0.6, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(f"cache bytes at {report_context:,} tokens (batch 1)")
        ax.set_ylabel(m.unit)
        ax.set_title(m.title + ("\n(a point never below it reads the largest count tested: a lower bound)"
                                if m.column == "capacity90" else ""), fontsize=10)
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
    for d_head, states in state_scales(pts).items():  # the fixed states' scale: d_h orthogonal keys per head
        ax.axvline(d_head, color="0.35", ls=":", lw=1.2, zorder=0)
        elements = sorted({s.rsplit("= ", 1)[1].rstrip(")") for s in states})
        ax.text(d_head * 1.04, 0.3, f"d_h = {d_head}\nh d_h^2 = {', '.join(elements)}", fontsize=7, color="0.25",
                va="center", ha="left", bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.8})
    ax.axhline(CAPACITY_LEVEL, color="0.6", lw=0.8, ls="--", zorder=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("stored (key, value) pairs")
    ax.set_ylabel("MQAR recall, keys beyond every window's reach")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    ax.set_title(f"memory capacity (mean over seeds); dashed: recall {CAPACITY_LEVEL:g}, capacity at "
                 f"{CAPACITY_LEVEL * 100:.0f} % where a curve crosses it\ndotted: d_h of the fixed states (linear, "
                 "Tensor Cache's L2): a d_h x d_h state per head holds about d_h orthogonal keys", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIXED_STATE_KINDS = ("linear", "tensor_cache", "infini")  # a d_h x d_h matrix per head beyond any window


def state_scales(pts: list[Point]) -> dict[int, list[str]]:
    """Each head width d_h of the study's fixed-state points -> "<point>: h d_h^2 = <elements>"
    (per layer): a d_h x d_h state holds about d_h orthogonal keys per head, the scale at which
    its recall must start to fall."""
    out: dict[int, list[str]] = {}
    for p in pts:
        if p.kind in FIXED_STATE_KINDS and p.widths and not p.attention.get("cache_policy"):
            h, d = p.widths["n_heads"], p.widths["d_head"]
            out.setdefault(d, []).append(f"{p.name} (h d_h^2 = {h * d * d:,})")
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- the tables
def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _mean(p: Point, column: str) -> str:
    """A point's mean on a measure; the capacity marked when it is a bound (>= the largest count
    tested, < the smallest)."""
    if column != "capacity90":
        return _fmt(p.mean(column))
    mark = {"above": ">=", "below": "<"}.get(p.censored(), "")
    if p.censored() == "below":
        return "<" + format(min(min(r["_capacity"]) for r in p.rows), "g")
    return mark + _fmt(p.mean(column), ".1f")


def _iv(iv: stats.Interval | None, spec=".3f") -> str:
    return "-" if iv is None else f"[{format(iv.low, spec)}, {format(iv.high, spec)}]"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _lrs(p: Point) -> str:
    if p.steps == 0:  # a pretrained point (or a cache policy on one): no rate was tried
        return "-"
    won = [r["lr"] for r in p.rows if r.get("lr") is not None]
    tried = len(p.rows[0]["_lr_candidates"]) if p.rows[0]["_lr_candidates"] else 1
    if not won:
        return "-"
    counts = {lr: won.count(lr) for lr in dict.fromkeys(won)}
    text = ", ".join(f"{lr:g}" + (f" ({c}/{len(won)})" if len(won) > 1 else "") for lr, c in counts.items())
    return text + (f" of {tried}" if tried > 1 else "")


def _steps(p: Point) -> str:
    """Its training steps; a retrofit's after its parent's (`60 from mha`)."""
    if p.steps is None:
        return "-"
    if p.steps == 0:
        return "0 (pretrained)"
    return f"{p.steps} from {p.init_from}" if p.init_from else str(p.steps)


def points_table(pts: list[Point], report_context: int) -> list[str]:
    cols = MEASURES
    lines = ["| point | family | kind | params | cache bytes | seeds | lr (won) | steps | training | "
             + " | ".join(f"{m.column}: mean, seeds CI, examples CI" for m in cols) + " |",
             "|---|---|---|---:|---:|---:|---|---|---|" + "---|" * len(cols)]
    for p in pts:
        cells = [f"{_mean(p, m.column)} {_iv(p.seed_interval(m.column))} {_iv(p.example_interval(m.column))}"
                 for m in cols]
        lines.append(f"| {p.name} | {p.family} | {p.kind} | {p.params:,} | {_bytes(p.cache_bytes)} | "
                     f"{len(p.rows)} | {_lrs(p)} | {_steps(p)} | {p.training_cell()} | " + " | ".join(cells) + " |")
    return lines


def front_table(pts: list[Point]) -> list[str]:
    lines = ["| measure | points on the front, by cache bytes |", "|---|---|"]
    for m in MEASURES:
        if m.panel and any(p.mean(m.column) is not None for p in pts):
            lines.append(f"| {m.column} | " + " -> ".join(
                f"{p.name} ({_bytes(p.cache_bytes)}, {_mean(p, m.column)})" for p in front(pts, m)) + " |")
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
                lines.append(f"| {_bytes(budget)} | {m.column} | {best.name} ({_mean(best, m.column)}) | - | - |")
                continue
            other = max(others, key=lambda p: sign * p.mean(m.column))
            d = best.difference(other, m.column)
            lines.append(f"| {_bytes(budget)} | {m.column} | {best.name} ({_mean(best, m.column)}) | "
                         f"{other.name} ({_mean(other, m.column)}) | "
                         + ("-" if d is None else f"{d[0]:+.3f} {_iv(d[1])}") + " |")
    return lines


def markdown(pts: list[Point], report_context: int, budgets: list[int], claims: list[dict],
             trained_len: int | None = None) -> str:
    seeds = max(len(p.rows) for p in pts)
    lines = ["# Memory-quality frontier\n",
             f"{len(pts)} points, {seeds} seed(s) each. Cache bytes: analytic, at {report_context:,} tokens, "
             "batch 1. Each measure: the mean over seeds, its 95 % interval over seeds (t, needs two seeds "
             "or more) and its 95 % bootstrap interval over evaluation examples. MQAR by what a model can "
             "reach: one_hop, the key within the smallest window (one layer attends to it); reach, "
             "past it but within n_layers (W_min - 1) tokens (every model, by composing layers); "
             "beyond, past every model's reach n_layers (W_max - 1). bpb: held-out bits per "
             "byte at the trained length; bpb_longest: at the longest evaluated context "
             "(extrapolation). lm-eval: too few episodes to rank models; shown here, not on the figure. "
             "lr (won): the learning rate chosen on validation for each seed, of how many tried. "
             f"capacity90: the stored pairs at which beyond-window recall falls below {CAPACITY_LEVEL:g} "
             "(Memory capacity, below). "
             f"training (for reading, not a gate): per measure, still learning when, over the last fifth of "
             f"its steps, a seed's MQAR validation accuracy rose by more than {RECALL_RISE:g} (recall) or its "
             f"validation bits per byte fell by more than {BPB_DROP:.0%} (bpb); learning.png draws the curves. "
             "The claims are judged on their own differences' curves (the claims table).\n",
             "## Points\n", *points_table(pts, report_context), "",
             "## Pareto front\n", *front_table(pts), ""]
    if budgets:
        lines += ["## Budgets\n", "The best point whose cache fits each budget, the best point of any "
                  "other family within it, and their difference (bootstrap over seeds and examples).\n",
                  *budget_table(pts, budgets), ""]
    dist = {p.name: by_distance(p) for p in pts}
    if any(dist.values()):
        d0 = next(d for d in dist.values() if d)
        past = any(d.get("past_trained") is not None for d in dist.values() if d)
        lines += ["## Bits per byte by distance into the context\n",
                  f"Held-out text in windows of {d0['context']:,} tokens"
                  + (" (the trained length: what each design remembers, with no position it was not trained "
                     "at)" if d0["context"] == trained_len else "") +
                  f", split by the token's position t in its window, W = {d0['window']} (the study's smallest "
                  "window)."
                  + (f" Last column, on its own: extrapolation, the tokens past the trained length T = "
                     f"{trained_len:,} in windows of {d0['longest']:,} (full attention meets positions it "
                     "never trained at; not a memory effect)." if past else "") + "\n",
                  "| point | t < W | t >= W | t >= 4W |" + (" t >= T (extrapolation) |" if past else ""),
                  "|---|---:|---:|---:|" + ("---:|" if past else "")]
        lines += [f"| {n} | {_fmt(d.get('lt_W'))} | {_fmt(d.get('ge_W'))} | {_fmt(d.get('ge_4W'))} |"
                  + (f" {_fmt(d.get('past_trained'))} |" if past else "") for n, d in dist.items() if d] + [""]
    curves = {p.name: capacity(p) for p in pts}
    pairs = sorted({k for c in curves.values() for k in c})
    if pairs:
        by_name = {p.name: p for p in pts}
        lines += ["## Memory capacity\n", "MQAR recall beyond every window's reach as the number of "
                  f"stored pairs grows (report/capacity.png), and the capacity at {CAPACITY_LEVEL * 100:.0f} %: "
                  f"the count at which recall first falls below {CAPACITY_LEVEL:g}, interpolated in log2 of the "
                  "count between "
                  "the last count at or above it and the first below (>= n: never below up to n; <n: below at "
                  "the smallest count). Fixed states (h d_h^2 elements per layer) must fall past about d_h "
                  "pairs: the figure marks each d_h.\n",
                  "| point | " + " | ".join(f"{k} pairs" for k in pairs) + " | capacity at 90 % |",
                  "|---|" + "---:|" * (len(pairs) + 1)]
        lines += [f"| {n} | " + " | ".join(_fmt(c.get(k)) for k in pairs)
                  + f" | {_mean(by_name[n], 'capacity90')} |" for n, c in curves.items() if c]
        lines += [""]
    from pipeline.report.claims import claims_table

    retrieval = retrieval_table(pts)
    if retrieval:
        lines += ["## Retrieval (lm-eval)\n", "Each point's lm-eval task scores by context length (mean over "
                  "evidence depths and seeds); report/retrieval.png draws each point's depth x length "
                  "heatmap.\n", *retrieval, ""]
    l2 = l2_table(pts)
    if l2:
        lines += ["## Does L2 carry anything?\n", "Each Tensor Cache point evaluated again with L2 switched off "
                  "(every gate at 0: the window alone). Through L2: the beyond-window recall it loses and the "
                  "bits per byte it gains without L2.\n", *l2, ""]
    lines += ["## The seeds' claims\n", *claims_table(claims, seeds), ""]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["key", "run", "point", "family", "kind", "seed", "lr", "params", "cache_bytes", "mqar_beyond",
              "mqar_one_hop", "mqar_reach", "bpb", "bpb_longest", "capacity90", "capacity_censored", "lm_eval",
              "mqar_beyond_decode",
              "decode_tokens_per_s", "peak_rss_mib", "measured_context", "steps", "init_from", "still_learning",
              "recall_learning", "bpb_learning", "mqar_beyond_l2_off", "bpb_l2_off"]


def report_paths(out_dir: Path) -> dict[str, Path]:
    """The files the report stage writes (dvc.yaml lists the same)."""
    return {"png": out_dir / "frontier.png", "md": out_dir / "frontier.md", "csv": out_dir / "frontier.csv",
            "capacity": out_dir / "capacity.png", "learning": out_dir / "learning.png",
            "retrieval": out_dir / "retrieval.png"}


def write_report(results: list[dict], report_context: int, trained_len: int, out_dir: Path,
                 budgets: list[int] = (), runs: dict[str, tuple[list[dict], int]] | None = None,
                 curves: dict | None = None) -> dict[str, Path]:
    """`runs`: each trained run's validation history and step count (`convergence.histories`);
    without it no point has a convergence flag. `curves`: the validation curve of each measure a
    claim compares (`convergence.claim_curves`); without it every claim reads "not tracked"."""
    from pipeline.report.claims import evaluate_claims

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = runs or {}
    rows = rows_from_results(results, report_context, trained_len)
    for row, r in zip(rows, results):
        trained = runs.get(r.get("checkpoint_run") or r["run"])
        row["_learning"] = learning(*trained) if trained else None
        row["steps"] = trained[1] if trained else None
        row["_history"] = [h for h in trained[0] if "val/bpb" in h] if trained else None
        for flag in ("still_learning", "recall_learning", "bpb_learning"):
            row[flag] = None if row["_learning"] is None else row["_learning"][flag]
    pts = points(rows)
    paths = report_paths(out_dir)
    plot_frontier(pts, report_context, paths["png"])
    plot_capacity(pts, paths["capacity"])
    plot_learning(results, runs, paths["learning"])
    plot_heatmaps(pts, paths["retrieval"])
    paths["md"].write_text(markdown(pts, report_context, list(budgets), evaluate_claims(pts, curves), trained_len))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return paths


def run_report(params, root: Path, results_dir: Path, out_dir: Path, ckpt_root: Path) -> int:
    keys = params.result_keys()
    missing = [key for key in keys if not (results_dir / f"{key}.json").exists()]
    if missing:
        raise FileNotFoundError(f"{results_dir}: no evaluation results for {', '.join(missing)}; "
                                "run the evaluate stage")
    results = [json.loads((results_dir / f"{key}.json").read_text()) for key in keys]
    for r in results:  # a retrofit's parent point, from the params (the result names its point)
        point = params.points.get(r["variant"])
        r["init_from"] = point.init_from if point is not None else None
    reach = next((r["reach"] for r in results if r.get("reach")), None)  # the evaluate stage's, as it measured
    paths = write_report(results, params.eval.report_context, params.train.seq_len, out_dir,
                         params.eval.byte_budgets, histories(results, ckpt_root),
                         claim_curves(params.data.mqar, tuple(reach) if reach else None))
    run_id = log_report(params, root, results, paths)
    print(f"[report] {len(results)} run(s), {len(params.points)} point(s) -> {paths['png']}, {paths['md']} "
          f"(MLflow run {run_id})", flush=True)
    return 0


def log_report(params, root: Path, results: list[dict], paths: dict[str, Path]) -> str:
    """A new MLflow run `frontier` with the figure and tables, tagged with the runs it summarises
    (`kvf.summarises`). The evaluated runs stay top-level, so the UI lists them without expanding
    anything (`family` and `kind` group them); nesting left by older versions (a family run under
    the frontier, a run under its family) is undone. The experiment's frontier view is refreshed
    (`pipeline.report.mlflow_view`). Returns the frontier run's id."""
    from pipeline.core import tracking
    from pipeline.report.mlflow_view import write_view

    tracker = tracking.Tracker.for_study(params, root)
    client, experiment = tracker.client, tracker.experiment_id
    for stale in client.search_runs([experiment], "tags.`kvf.report` = 'frontier' and attributes.status = 'RUNNING'"):
        client.set_terminated(stale.info.run_id, "KILLED")  # a report killed mid-way: not current
    run = client.create_run(experiment, run_name="frontier",
                            tags={"kvf.report": "frontier", **tracking.source_tags(root)})
    ids = {}
    for r in results:  # the evaluated runs, by name (the newest finished run of that name)
        found = client.search_runs([experiment], f"tags.`{tracking.TAG_RUN}` = '{r['run']}' "
                                   "and attributes.status = 'FINISHED'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            ids[r["run"]] = found[0].info.run_id
            if "mlflow.parentRunId" in found[0].data.tags:
                client.delete_tag(found[0].info.run_id, "mlflow.parentRunId")
    for family_run in client.search_runs([experiment], "tags.`kvf.family_run` != ''"):
        client.delete_run(family_run.info.run_id)  # older versions' grouping runs: nothing of their own
    client.set_tag(run.info.run_id, "kvf.summarises", ",".join(ids.values()))
    for path in paths.values():
        client.log_artifact(run.info.run_id, str(path), "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    write_view(client, experiment)
    return run.info.run_id
