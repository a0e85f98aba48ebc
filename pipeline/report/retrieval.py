"""What the lm-eval retrieval tasks found, and how much of a Tensor Cache comes through its L2.

- Retrieval heatmaps (`report/retrieval.png`): per point, the mean score of the study's lm-eval
  tasks in each cell of (context length, evidence depth), depth 0 the context's start and 1 its
  end: the picture KV-compression papers draw (a window keeps the cells near depth 1, loses the
  rest as the context outgrows it).
- L2 switched off: each Tensor Cache point measured again with every gate at 0 (the window alone);
  what it loses is what comes through L2 (a window + linear-memory conversion may learn to
  bypass the memory: arXiv 2510.05901).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.report.points import Point


def cells(p: Point) -> dict[tuple[int, float], float]:
    """(context length, depth) -> the mean score over the point's tasks and seeds."""
    scores: dict[tuple[int, float], list[float]] = {}
    for row in p.rows:
        for c in row.get("_cells", []):
            scores.setdefault((c["context_len"], c["depth"]), []).append(c["score"])
    return {k: float(np.mean(v)) for k, v in sorted(scores.items())}


def by_task(p: Point) -> dict[str, dict[int, float]]:
    """task -> context length -> the mean score over depths and seeds."""
    out: dict[str, dict[int, list[float]]] = {}
    for row in p.rows:
        for c in row.get("_cells", []):
            out.setdefault(c["task"], {}).setdefault(c["context_len"], []).append(c["score"])
    return {t: {n: float(np.mean(v)) for n, v in sorted(by.items())} for t, by in out.items()}


def plot_heatmaps(pts: list[Point], path: Path) -> None:
    """One depth x length heatmap per point that ran lm-eval tasks (a figure that says so when none did)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = {p.name: cells(p) for p in pts}
    maps = {k: v for k, v in maps.items() if v}
    if not maps:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.text(0.5, 0.5, "no retrieval heatmap: set eval.lm_eval_tasks", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    lengths = sorted({n for m in maps.values() for n, _ in m})
    depths = sorted({d for m in maps.values() for _, d in m})
    cols = min(4, len(maps))
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.flat, maps.items()):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (n, d), s in m.items():
            grid[depths.index(d), lengths.index(n)] = s
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("context (bytes)", fontsize=7)
        ax.set_ylabel("evidence depth", fontsize=7)
    for ax in list(axes.flat)[len(maps):]:
        ax.set_axis_off()
    fig.suptitle("lm-eval retrieval: mean score by context length and evidence depth (0: start, 1: end)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retrieval_table(pts: list[Point]) -> list[str]:
    """Each point's score per task and context length (mean over depths and seeds)."""
    tasks = {p.name: by_task(p) for p in pts}
    tasks = {k: v for k, v in tasks.items() if v}
    if not tasks:
        return []
    lengths = sorted({n for t in tasks.values() for by in t.values() for n in by})
    lines = ["| point | task | " + " | ".join(f"{n:,} bytes" for n in lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    for name, t in tasks.items():
        for task, by in t.items():
            lines.append(f"| {name} | {task} | " + " | ".join(
                "-" if by.get(n) is None else f"{by[n]:.2f}" for n in lengths) + " |")
    return lines


def l2_table(pts: list[Point]) -> list[str]:
    """Each Tensor Cache point with L2 on and off: beyond-window recall and bits per byte, and what
    comes through L2 (recall lost, bits per byte gained, when it is switched off)."""
    lines = []
    for p in pts:
        on_r, off_r = p.mean("mqar_beyond"), p.mean("mqar_beyond_l2_off")
        on_b, off_b = p.mean("bpb"), p.mean("bpb_l2_off")
        if off_r is None and off_b is None:
            continue
        fmt = lambda v, s="+.3f": "-" if v is None else format(v, s)  # noqa: E731
        lines.append(f"| {p.name} | {fmt(on_r, '.3f')} | {fmt(off_r, '.3f')} | "
                     f"{fmt(None if None in (on_r, off_r) else on_r - off_r)} | {fmt(on_b, '.3f')} | "
                     f"{fmt(off_b, '.3f')} | {fmt(None if None in (on_b, off_b) else off_b - on_b)} |")
    if not lines:
        return []
    return ["| point | mqar_beyond | L2 off | through L2 | bpb | L2 off | through L2 |",
            "|---|---:|---:|---:|---:|---:|---:|", *lines]
