"""The validation curves a study's checkpoints keep (`checkpoints/<run>/model.json`, `history`;
one record every `train.eval_every` steps), read two ways.

Is a run still learning when its training stops (`learning`: the points table's `training`
column, the CSV's flags, `learning.png`; for reading, not a gate)? Over the last fifth of a run's
steps (from the last validation at or before 80 % of its steps to the final one), per measure:
- *recall still learning*: any MQAR validation accuracy rose by more than `RECALL_RISE`;
- *bpb still learning*: validation bits per byte fell by more than `BPB_DROP` of their value.
A run is still learning when either is; a point, when any of its seeds is. Per measure, because
at a study's size recall settles long before bits per byte do (BENCHMARKS.md, "Convergence
pilot").

Has the difference a claim states settled (`track`, read by `pipeline.report.claims`)? The
difference on its own measure's validation curve (`claim_curves`), with a 95 % interval at every
validation of the last `SPAN` of training and the change it still made over that span
(docs/design.md, "A claim's verdict, from its own curve"). Until issue 34 a claim was gated on
`learning` instead, any bucket of either point: too strict (the design doc says why).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.report import stats

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


# --------------------------------------------------------------------------- a claim's own curve
SPAN = 0.4  # a claim must hold over the last 40 % of training
MOVE = {"mqar": 0.05, "bpb": 0.02, "capacity90": 0.10}  # "still moves": recall, bits per byte, capacity (relative)
N_DRAWS = 1000


def claim_curves(mqar, reach: tuple[int, int] | None) -> dict:
    """Which validation curve stands for each measure a claim can compare (`mqar`: the params'
    MQARConfig; `reach`: the study's shortest and longest window reach). `mqar_beyond` (recall
    beyond every window) -> the farthest validation bucket, when its nearest gap lies beyond the
    longest reach (else none: a bucket some window reaches measures something else);
    `capacity90` -> the capacity validation sets (`data.mqar.capacity_pairs`, at that bucket's
    gaps), when there are two or more; `bpb` -> validation bits per byte (at train.seq_len, as the
    claim's). `answers`: each curve's number of scored answers (its sampling error)."""
    far = mqar.farthest_bucket
    beyond = reach is not None and mqar.eval_gaps[far][0] > reach[1]
    answers = {f"val/mqar_acc_{b}": mqar.num_eval * mqar.queries(mqar.num_pairs) for b in mqar.eval_gaps}
    capacity = {p: f"val/mqar_capacity_p{p}" for p in sorted(mqar.capacity_pairs)} if beyond else {}
    answers |= {key: mqar.num_eval * mqar.queries(p) for p, key in capacity.items()}
    return {"mqar_beyond": f"val/mqar_acc_{far}" if beyond else None,
            "capacity90": capacity if len(capacity) > 1 else None, "bpb": "val/bpb", "answers": answers}


def _measure_kind(column: str) -> str:
    return "capacity90" if column == "capacity90" else "bpb" if column.startswith("bpb") else "mqar"


def _seed_draws(column: str, curve, history: list[dict], steps: int, fractions: np.ndarray, answers: dict,
                rng, z: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """One trained run on the claim's curve at `fractions` of its training: the values (F,) and
    draws of their sampling error (N_DRAWS, F): binomial for recall (its answers), `val/bpb_se`
    times the standard normals `z` for bits per byte, binomial per count then `capacity_at` for
    capacity."""
    from pipeline.core.results import capacity_at

    evals = [h for h in history if "val/bpb" in h]
    keys = list(curve.values()) if isinstance(curve, dict) else [curve]
    evals = [h for h in evals if all(k in h for k in keys)]
    if len(evals) < 2:
        return None
    f = np.array([h["step"] / steps for h in evals])
    at = np.stack([np.interp(fractions, f, [h[k] for h in evals]) for k in keys], axis=-1)  # (F, K)
    if column == "capacity90":
        n = np.array([answers[k] for k in keys])
        draws = rng.binomial(n, np.clip(at, 0, 1), size=(N_DRAWS, *at.shape)) / n
        return capacity_at(list(curve), at), capacity_at(list(curve), draws)
    if _measure_kind(column) == "mqar":
        n = answers[keys[0]]
        return at[:, 0], rng.binomial(n, np.clip(at[:, 0], 0, 1), size=(N_DRAWS, len(fractions))) / n
    se = np.interp(fractions, f, [h.get("val/bpb_se", 0.0) for h in evals])
    return at[:, 0], at[:, 0] + se * z


def _side(point, column: str, curve, fractions: np.ndarray, answers: dict, rng, z: np.ndarray):
    """A point's mean over its seeds at each fraction (F,) and its draws (N_DRAWS, F): each seed's
    sampling error (bits per byte: the normals `z`, shared by its seeds, which read the same
    validation windows), the seeds resampled with replacement. A cache policy has no validation
    curve of its own (validation runs the parallel forward, not the policy): it stays at its
    evaluated mean, drawn from its examples' interval."""
    if point.attention.get("cache_policy"):
        mean, iv = point.mean(column), point.example_interval(column)
        if mean is None:
            return None
        sd = 0.0 if iv is None else (iv.high - iv.low) / (2 * 1.96)
        draws = mean + sd * rng.standard_normal((N_DRAWS, 1))
        return np.full(len(fractions), mean), np.repeat(draws, len(fractions), axis=1)
    seeds = []
    for r in point.rows:
        if not r.get("_history") or not r.get("steps"):
            return None
        got = _seed_draws(column, curve, r["_history"], r["steps"], fractions, answers, rng, z)
        if got is None:
            return None
        seeds.append(got)
    values = np.mean([v for v, _ in seeds], axis=0)
    draws = np.stack([d for _, d in seeds])  # (S, N_DRAWS, F)
    pick = rng.integers(0, len(seeds), size=(len(seeds), N_DRAWS)) if len(seeds) > 1 else \
        np.zeros((1, N_DRAWS), dtype=int)
    return values, np.take_along_axis(draws, pick[:, :, None], axis=0).mean(axis=0)


def window_correlation(a, b) -> float:
    """The correlation of two points' bits per byte over the same held-out windows (means over
    seeds, at the trained length): how much of each window's difficulty the two share. Validation
    logs its windows' mean and standard error, not each window, so a step's bits-per-byte draws
    take their pairing from here (the same number of windows of the same length); 0 (unpaired)
    when either point lacks them."""
    ea, eb = a.examples("bpb"), b.examples("bpb")
    if ea is None or eb is None or len(ea[0]) != len(eb[0]) or len(ea[0]) < 3:
        return 0.0
    rho = np.corrcoef(np.mean(ea, axis=0), np.mean(eb, axis=0))[0, 1]
    return float(np.clip(rho, 0.0, 1.0)) if np.isfinite(rho) else 0.0


def track(a, b, column: str, curves: dict | None, higher_supports: bool, shift: float, final: str,
          seed: int = 0) -> dict | None:
    """The claim's difference a - b on its own validation curve (`claim_curves`) over the last
    `SPAN` of training (from the last validation at or before 1 - SPAN of a's steps, or b's when a
    is a cache policy; the other side read at the same fractions of its own training), each
    step's 95 % interval from the draws of `_side`; None when a curve or a history is missing.
    `final`: the verdict of the report's interval at the end; `holds`: every step's interval
    gives the same one; `moved`: the least-squares change of the difference over the span."""
    curve = None if curves is None else curves.get(column)
    if curve is None:
        return None
    grid_from = next((p for p in (a, b) if not p.attention.get("cache_policy")), None)
    row = grid_from.rows[0] if grid_from else None
    if not row or not row.get("_history") or not row.get("steps"):
        return None
    f = np.array([h["step"] / row["steps"] for h in row["_history"] if "val/bpb" in h])
    start = f[f <= 1 - SPAN + 1e-9].max(initial=f.min(initial=0.0))
    fractions = f[f >= start]
    if len(fractions) < 2:
        return None
    rng = np.random.default_rng(seed)
    za = rng.standard_normal((N_DRAWS, len(fractions)))
    rho = window_correlation(a, b) if column.startswith("bpb") else 0.0
    zb = rho * za + np.sqrt(1 - rho ** 2) * rng.standard_normal(za.shape)
    sides = [_side(p, column, curve, fractions, curves["answers"], rng, z) for p, z in ((a, za), (b, zb))]
    if None in sides:
        return None
    (va, da), (vb, db) = sides
    diff = va - vb
    lo, hi = np.quantile(da - db, [0.025, 0.975], axis=0)
    steps = [stats.verdict((lo_ + shift, hi_ + shift), higher_supports) for lo_, hi_ in zip(lo, hi)]
    slope = np.polyfit(fractions, diff, 1)[0] if np.ptp(fractions) > 0 else 0.0
    moved = float(slope * (fractions[-1] - fractions[0]))
    kind = _measure_kind(column)
    tolerance = MOVE[kind] * (max(abs(a.mean(column) or 0), abs(b.mean(column) or 0), 1.0) if kind == "capacity90"
                              else 1.0)
    return {"from": float(fractions[0]), "steps": len(fractions), "difference": diff.tolist(),
            "intervals": list(zip(lo.tolist(), hi.tolist())), "step_verdicts": steps,
            "holds": sum(v == final for v in steps), "moved": moved, "tolerance": tolerance}
