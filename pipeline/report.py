"""The report stage: the memory-quality frontier from results/eval/*.json.

Writes report/frontier.png (one panel per quality measure, x = cache bytes at
`eval.report_context` tokens, log scale; one point per variant at its mean over seeds, error bars
of one standard deviation when `train.seeds` holds several; in the MQAR panels an open marker
where the decode cache's accuracy differs from the parallel forward's), report/frontier.md (every
variant, memory and quality, mean ± std over seeds), and report/frontier.csv (one row per run:
the `dvc plots` data); logs them to a parent MLflow run.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

QUALITY = [  # (column, panel title, y axis)
    ("mqar_far", "MQAR, keys beyond the window's reach", "accuracy"),
    ("mqar_near", "MQAR, keys inside the window", "accuracy"),
    ("bpb_max", "held-out text at the longest context", "bits per byte (lower is better)"),
    ("lm_eval", "lm-eval tasks", "mean score"),
]


def rows_from_results(results: list[dict], report_context: int) -> list[dict]:
    """One row per result (variant x seed): memory and quality numbers."""
    rows = []

    def split(mq: dict, key: str) -> float | None:
        # by each query's own gap against the window (evaluate.py), whatever the buckets' names
        values = [v[key] for v in mq.values() if v.get(key) is not None]
        return float(np.mean(values)) if values else None

    for r in results:
        mq = r.get("mqar", {})
        decoded = {k: v["decode"] for k, v in mq.items() if "decode" in v}
        bpb = r.get("bpb", {})
        scores = [next(iter(s.values())) for s in r.get("lm_eval", {}).get("scores", {}).values() if s]
        decode = {f"{d['mode']}_{d['context_len']}": d for d in r.get("decode", [])}
        longest = max(decode.values(), key=lambda d: d["tokens_held"]) if decode else None
        rows.append({
            "variant": r["variant"], "kind": r["kind"], "seed": r.get("seed", 0),
            "run": r.get("run", r["variant"]), "params": r["params"],
            "cache_bytes": r["cache_bytes_per_token_analytic"] * report_context,
            "mqar_far": split(mq, "acc_beyond_window"),
            "mqar_near": split(mq, "acc_inside_window"),
            "bpb_max": bpb[max(bpb, key=int)] if bpb else None,
            "lm_eval": float(np.mean(scores)) if scores else None,
            "decode_tokens_per_s": longest["decode_tokens_per_s"] if longest else None,
            "peak_rss_mib": longest["peak_rss_bytes"] / 2**20 if longest else None,
            "measured_context": longest["tokens_held"] if longest else None,
            "mqar_far_decode": split(decoded, "acc_beyond_window"),
            "mqar_near_decode": split(decoded, "acc_inside_window"),
        })
    return rows


def _by_variant(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["variant"], []).append(row)
    return out


def _mean_std(group: list[dict], col: str) -> tuple[float | None, float | None]:
    """Mean over seeds, and the standard deviation (ddof 1) when there are several."""
    ys = [g[col] for g in group if g.get(col) is not None]
    if not ys:
        return None, None
    return float(np.mean(ys)), (float(np.std(ys, ddof=1)) if len(ys) > 1 else None)


def plot_frontier(rows: list[dict], report_context: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [q for q in QUALITY if any(r[q[0]] is not None for r in rows)]
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.6 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    seeds = max(len(g) for g in _by_variant(rows).values())
    for ax, (col, title, ylabel) in zip(axes.flat, panels):
        for i, (variant, group) in enumerate(sorted(_by_variant(rows).items())):
            mean, std = _mean_std(group, col)
            if mean is None:
                continue
            x, color = group[0]["cache_bytes"], f"C{i % 10}"
            ax.errorbar([x], [mean], yerr=None if std is None else [std], fmt="o", color=color, capsize=3)
            ax.annotate(variant, (x, mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
            decoded, _ = _mean_std(group, col + "_decode")
            if decoded is not None and abs(decoded - mean) > 0.01:
                ax.plot([x], [decoded], "o", mfc="none", color=color)
                ax.annotate(f"{variant} (decode)", (x, decoded), textcoords="offset points",
                            xytext=(6, -4), fontsize=7, color=color)
        ax.set_xscale("log")
        ax.set_xlabel(f"cache bytes at {report_context:,} tokens (batch 1)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if col.startswith(("mqar", "lm_eval")):
            ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle("kv-frontier: memory-quality frontier"
                 + (f"\nmean ± one std over up to {seeds} seeds" if seeds > 1 else "")
                 + ("\nopen markers: MQAR accuracy through the decode cache" if any(
                     r["mqar_far_decode"] is not None and r["mqar_far"] is not None
                     and abs(r["mqar_far_decode"] - r["mqar_far"]) > 0.01 for r in rows) else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _cell(group: list[dict], col: str, spec: str = ".3f") -> str:
    mean, std = _mean_std(group, col)
    return _fmt(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


def markdown_table(rows: list[dict], report_context: int) -> str:
    lines = ["# Memory-quality frontier\n",
             f"Cache bytes at {report_context:,} tokens (analytic, batch 1). Quality: mean over seeds "
             "(± one standard deviation when there are several). MQAR far / near: accuracy on "
             "queries whose key lies beyond / inside the window's reach, from the parallel forward; "
             "\"(decode)\": the same queries scored token by token through the decode cache.\n",
             "| variant | kind | seeds | params | cache bytes | MQAR far | MQAR far (decode) | MQAR near | "
             "bpb (longest) | lm-eval | decode tok/s | peak RSS MiB (at tokens) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, group in sorted(_by_variant(rows).items(), key=lambda kv: kv[1][0]["cache_bytes"]):
        g = group[0]
        lines.append(f"| {variant} | {g['kind']} | {len(group)} | {g['params']:,} | {g['cache_bytes']:,.0f} | "
                     f"{_cell(group, 'mqar_far')} | {_cell(group, 'mqar_far_decode')} | "
                     f"{_cell(group, 'mqar_near')} | {_cell(group, 'bpb_max')} | {_cell(group, 'lm_eval')} | "
                     f"{_cell(group, 'decode_tokens_per_s', '.0f')} | "
                     f"{_cell(group, 'peak_rss_mib', '.0f')} ({g['measured_context']}) |")
    return "\n".join(lines) + "\n"


def write_report(results: list[dict], report_context: int, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_from_results(results, report_context)
    paths = {"png": out_dir / "frontier.png", "md": out_dir / "frontier.md", "csv": out_dir / "frontier.csv"}
    plot_frontier(rows, report_context, paths["png"])
    paths["md"].write_text(markdown_table(rows, report_context))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return paths


def run_report(params, root: Path, results_dir: Path, out_dir: Path) -> int:
    from pipeline import tracking

    wanted = [run.name for run in params.runs()]
    missing = [key for key in wanted if not (results_dir / f"{key}.json").exists()]
    if missing:
        raise FileNotFoundError(f"{results_dir}: no evaluation results for {', '.join(missing)}; "
                                "run the evaluate stage")
    results = [json.loads((results_dir / f"{key}.json").read_text()) for key in wanted]
    paths = write_report(results, params.eval.report_context, out_dir)
    tracker = tracking.Tracker(tracking.tracking_uri(params.tracking.uri, root), params.tracking.experiment)
    run = tracker.client.create_run(tracker.experiment_id, run_name="frontier",
                                    tags={"kvf.report": "frontier", tracking.TAG_COMMIT: tracking.git_commit(root)})
    children = {r.get("run", r["variant"]): r.get("run_id") for r in results}
    for name, run_id in children.items():
        if run_id:
            tracker.client.set_tag(run_id, "mlflow.parentRunId", run.info.run_id)
    for path in paths.values():
        tracker.client.log_artifact(run.info.run_id, str(path), "report")
    tracker.client.set_terminated(run.info.run_id, "FINISHED")
    print(f"[report] {len(results)} run(s) of {len(params.variants)} variant(s) -> {paths['png']}, {paths['md']} (MLflow run {run.info.run_id})",
          flush=True)
    return 0
