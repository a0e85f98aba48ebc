"""The report stage: the memory-quality frontier from results/eval/*.json.

Writes report/frontier.png (one panel per quality measure, x = cache bytes at
`eval.report_context` tokens, log scale; one point per variant, error bars over seeds when a
variant has several results), report/frontier.md (every variant, memory and quality), and
report/frontier.csv (the `dvc plots` data); logs them to a parent MLflow run.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

QUALITY = [  # (column, label, higher is better)
    ("mqar_far", "MQAR accuracy, gaps beyond the window", True),
    ("mqar_near", "MQAR accuracy, gaps inside the window", True),
    ("bpb_max", "held-out bits/byte at the longest context", False),
    ("lm_eval", "lm-eval tasks (mean score)", True),
]


def rows_from_results(results: list[dict], report_context: int) -> list[dict]:
    """One row per result (variant x seed): memory and quality numbers."""
    rows = []
    for r in results:
        mq = r.get("mqar", {})
        # split by each query's own gap against the window (evaluate.py), whatever the buckets' names
        far = [v["acc_beyond_window"] for v in mq.values() if v.get("acc_beyond_window") is not None]
        near = [v["acc_inside_window"] for v in mq.values() if v.get("acc_inside_window") is not None]
        bpb = r.get("bpb", {})
        scores = [next(iter(s.values())) for s in r.get("lm_eval", {}).get("scores", {}).values() if s]
        decode = {f"{d['mode']}_{d['context_len']}": d for d in r.get("decode", [])}
        longest = max(decode.values(), key=lambda d: d["tokens_held"]) if decode else None
        rows.append({
            "variant": r["variant"], "kind": r["kind"], "seed": r.get("seed", 0), "params": r["params"],
            "cache_bytes": r["cache_bytes_per_token_analytic"] * report_context,
            "mqar_far": float(np.mean(far)) if far else None,
            "mqar_near": float(np.mean(near)) if near else None,
            "bpb_max": bpb[max(bpb, key=int)] if bpb else None,
            "lm_eval": float(np.mean(scores)) if scores else None,
            "decode_tokens_per_s": longest["decode_tokens_per_s"] if longest else None,
            "peak_rss_mib": longest["peak_rss_bytes"] / 2**20 if longest else None,
            "measured_context": longest["tokens_held"] if longest else None,
        })
    return rows


def _by_variant(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["variant"], []).append(row)
    return out


def plot_frontier(rows: list[dict], report_context: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [q for q in QUALITY if any(r[q[0]] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (col, label, higher) in zip(axes[0], panels):
        for variant, group in sorted(_by_variant(rows).items()):
            ys = [g[col] for g in group if g[col] is not None]
            if not ys:
                continue
            x = group[0]["cache_bytes"]
            ax.errorbar([x], [np.mean(ys)], yerr=[np.std(ys)] if len(ys) > 1 else None, fmt="o", capsize=3)
            ax.annotate(variant, (x, np.mean(ys)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(f"cache bytes at {report_context:,} tokens (batch 1)")
        ax.set_ylabel(label + ("" if higher else " (lower is better)"))
        ax.grid(alpha=0.3)
    fig.suptitle("kv-frontier: memory-quality frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[dict], report_context: int) -> str:
    lines = [f"# Memory-quality frontier\n",
             f"Cache bytes at {report_context:,} tokens (analytic, batch 1); quality means over seeds.\n",
             "| variant | kind | params | cache bytes | MQAR far | MQAR near | bpb (longest) | lm-eval | "
             "decode tok/s | peak RSS MiB (at tokens) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, group in sorted(_by_variant(rows).items(), key=lambda kv: kv[1][0]["cache_bytes"]):
        mean = lambda col: (float(np.mean([g[col] for g in group if g[col] is not None]))  # noqa: E731
                            if any(g[col] is not None for g in group) else None)
        g = group[0]
        lines.append(f"| {variant} | {g['kind']} | {g['params']:,} | {g['cache_bytes']:,.0f} | "
                     f"{_fmt(mean('mqar_far'))} | {_fmt(mean('mqar_near'))} | {_fmt(mean('bpb_max'))} | "
                     f"{_fmt(mean('lm_eval'))} | {_fmt(mean('decode_tokens_per_s'), '.0f')} | "
                     f"{_fmt(mean('peak_rss_mib'), '.0f')} ({g['measured_context']}) |")
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

    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))
               if p.stem in params.variants]
    if not results:
        raise FileNotFoundError(f"{results_dir}: no evaluation results; run the evaluate stage")
    paths = write_report(results, params.eval.report_context, out_dir)
    tracker = tracking.Tracker(tracking.tracking_uri(params.tracking.uri, root), params.tracking.experiment)
    run = tracker.client.create_run(tracker.experiment_id, run_name="frontier",
                                    tags={"kvf.report": "frontier", tracking.TAG_COMMIT: tracking.git_commit(root)})
    children = {r["variant"]: r.get("run_id") for r in results}
    for name, run_id in children.items():
        if run_id:
            tracker.client.set_tag(run_id, "mlflow.parentRunId", run.info.run_id)
    for path in paths.values():
        tracker.client.log_artifact(run.info.run_id, str(path), "report")
    tracker.client.set_terminated(run.info.run_id, "FINISHED")
    print(f"[report] {len(results)} variant(s) -> {paths['png']}, {paths['md']} (MLflow run {run.info.run_id})",
          flush=True)
    return 0
