"""Is a run still learning when its training stops? Read from the validation records its
checkpoint keeps (`checkpoints/<run>/model.json`, `history`; one every `train.eval_every` steps).

Over the last fifth of a run's steps (from the last validation at or before 80 % of its steps to
the final one), per measure the claims compare:
- *recall still learning*: any MQAR validation accuracy rose by more than `RECALL_RISE`;
- *bpb still learning*: validation bits per byte fell by more than `BPB_DROP` of their value.
A run is still learning when either is. A point is still learning on a measure when any of its
seeds is; a claim on a measure between points of which one is still learning on it gets the
verdict "not converged": the difference could be where each model stands on its learning curve
rather than what its design can do. Per measure, because at a study's size recall settles long
before bits per byte do (BENCHMARKS.md, "Convergence pilot"): a claim on recall need not wait
for the language model to finish, and a claim on bits per byte must.
"""
from __future__ import annotations

from pathlib import Path

BPB_DROP = 0.01      # relative fall of val/bpb over the last fifth of training
RECALL_RISE = 0.02   # absolute rise of any val/mqar_acc_<bucket> over the last fifth
LAST_FIFTH = 0.2


def learning(history: list[dict], steps: int) -> dict | None:
    """What the last fifth of training did, or None with fewer than two validations."""
    evals = [r for r in history if "val/bpb" in r]
    if len(evals) < 2:
        return None
    end = evals[-1]
    before = [r for r in evals[:-1] if r["step"] <= steps * (1 - LAST_FIFTH)]
    start = before[-1] if before else evals[0]
    drop = (start["val/bpb"] - end["val/bpb"]) / abs(start["val/bpb"])
    rise = max((end[k] - start[k] for k in end if k.startswith("val/mqar_acc_") and k in start), default=0.0)
    recall, bpb = rise > RECALL_RISE, drop > BPB_DROP
    return {"from_step": start["step"], "to_step": end["step"], "bpb_drop": drop, "recall_rise": rise,
            "recall_learning": recall, "bpb_learning": bpb, "still_learning": recall or bpb}


def histories(results: list[dict], ckpt_root: Path) -> dict[str, tuple[list[dict], int]]:
    """Each result's training run -> (its validation history, its step count), from its final
    checkpoint's metadata; runs without one are left out."""
    from pipeline.core import checkpoint

    out = {}
    for r in results:
        run = r.get("checkpoint_run") or r["run"]
        if run in out:
            continue
        meta = checkpoint.load_final_meta(ckpt_root / run, check=False)
        if meta is not None:
            out[run] = (meta["history"], meta["train"]["steps"])
    return out


def plot_learning(results: list[dict], runs: dict[str, tuple[list[dict], int]], path: Path) -> None:
    """Validation bits per byte and MQAR far recall against steps: a column per family, a line
    per trained run the report draws, dashed where that measure is still learning, the last
    fifth of training shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[str]] = {}
    for r in results:
        run = r.get("checkpoint_run") or r["run"]
        if run in runs and run not in families.setdefault(r.get("family", r["variant"]).split("+")[0], []):
            families[r.get("family", r["variant"]).split("+")[0]].append(run)
    families = {f: v for f, v in families.items() if v}
    per_row = 5
    grid = max(-(-len(families) // per_row), 1)
    cols = min(max(len(families), 1), per_row)
    fig, axes = plt.subplots(2 * grid, cols, figsize=(3.2 * cols, 5.2 * grid + 0.4), squeeze=False)
    used = set()
    for k, (family, names) in enumerate(families.items()):
        top, bottom = axes[2 * (k // per_row)][k % per_row], axes[2 * (k // per_row) + 1][k % per_row]
        used |= {id(top), id(bottom)}
        for i, name in enumerate(names):
            history, steps = runs[name]
            evals = [h for h in history if "val/bpb" in h]
            flag = learning(history, steps)
            xs = [h["step"] for h in evals]
            top.plot(xs, [h["val/bpb"] for h in evals], "--" if flag and flag["bpb_learning"] else "-",
                     color=f"C{i % 10}", lw=1.2, label=name)
            far = [h.get("val/mqar_acc_far") for h in evals]
            if any(v is not None for v in far):
                bottom.plot(xs, far, "--" if flag and flag["recall_learning"] else "-", color=f"C{i % 10}", lw=1.2)
            if flag:
                for ax in (top, bottom):
                    ax.axvspan(flag["from_step"], flag["to_step"], color="0.92", zorder=0)
        top.set_title(family, fontsize=9)
        top.legend(fontsize=5.5, loc="upper right")
        bottom.set_xlabel("step", fontsize=8)
        top.set_ylabel("validation bits per byte", fontsize=7)
        bottom.set_ylabel("MQAR far recall (validation)", fontsize=7)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    for ax in axes.flat:
        if id(ax) not in used:
            ax.set_visible(False)
    fig.suptitle("Validation curves per family (dashed: still learning over the shaded last fifth of training)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
