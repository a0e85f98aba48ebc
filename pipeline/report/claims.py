"""The seed papers' claims, computed on the study's own points, each judged on the curve of the
difference it states.

Each claim compares two points on one measure: the difference of their means over seeds and its
95 % bootstrap interval on the evaluation examples (each point's seeds resampled, the shared
examples resampled once for both: `stats.difference_interval`; for capacity,
`stats.capacity_difference_interval`). Its verdict (docs/design.md, "Claims"):
- *supported* / *contradicted*: that interval lies wholly on the predicted / the other side of
  zero (of the margin, for a non-inferiority claim), and so did the interval of the same
  difference on its own validation curve at every validation of the last 40 % of training
  (`convergence.track`: `mqar_beyond` on the validation bucket beyond every window, `capacity90`
  on the capacity validation sets, `bpb` on validation bits per byte), in every seed's run;
- *not settled*: otherwise, when the difference itself still moved by more than
  `convergence.MOVE` over that span;
- *inconclusive*: otherwise;
- *not tracked*: no validation curve for the measure, or no history (the rule cannot be read).
A claim on bits per byte is made at the steps both points trained ("at N steps (equal
budget)"): at these sizes bits per byte never stop falling, so no such claim is about where
training ends. With one seed the interval covers evaluation examples only, not training noise:
the table says so.

1. Tensor Cache beats the sliding window of the same width at recall beyond the window
   (the L2 memory is what it adds): MQAR far, every window both families have (at the same
   head widths, as every pairing below but the cache policies').
2. The exact write beats the chunk-mean shortcut at the same window: MQAR far.
3. Tensor Cache beats the best bounded baseline (sliding window, linear attention, Infini, or an
   inference-time cache policy on a full-attention checkpoint) whose cache is no larger: MQAR far,
   for every Tensor Cache point with such a baseline.
4. Tensor Cache holds more pairs beyond its window than linear attention, whose d_h x d_h state
   per head is the size of its L2 (capacity at 90 %), for every Tensor Cache and linear point
   of the same head width.
5. TPA reaches lower bits per byte than MHA at the trained length, with a smaller cache (T6).
Beyond the seeds (docs/design.md, "A factored window" and "Retrofit"); 6 and 7 are
*non-inferiority* claims: supported when the interval lies above -margin (below +margin for bits
per byte: a loses at most the margin), contradicted when it lies wholly past the margin,
inconclusive otherwise (margins `RECALL_MARGIN`, `BPB_MARGIN`):
6. A factored window loses no more than the margin of MQAR far recall against the Tensor Cache
   of the same window and write, with the cache ratio beside it.
7. A retrofit loses no more than the margin against the same design trained from scratch (MQAR
   far where the design has a memory beyond its window, and bits per byte), with the share of
   the steps it trained.
8. A retrofit beats the zero-step answer, its parent's checkpoint under the window cache policy
   of the same window (MQAR far where the design has a memory, bits per byte).
Points trained from scratch only enter claims 1-5 (and cache policies, 3 and 8).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.report import stats
from pipeline.report.convergence import track

if TYPE_CHECKING:
    from pipeline.report.points import Point

BOUNDED_BASELINES = ("swa", "linear", "infini")
RECALL_MARGIN = 0.05  # non-inferiority margin on MQAR recall (accuracy)
BPB_MARGIN = 0.05     # and on bits per byte (about 1.5 % of a miniature's 3 bits per byte)
MEMORY_KINDS = ("tensor_cache",)  # retrofit kinds with a memory beyond the window: far recall is theirs


def _scratch(p: "Point") -> bool:
    return p.init_from is None and not p.attention.get("cache_policy")


def _is_tc(p: "Point", write: str) -> bool:
    return (p.kind == "tensor_cache" and p.attention.get("write", "exact") == write
            and not p.attention.get("factors") and _scratch(p))


def _budget(a: "Point", b: "Point") -> str:
    """The steps a bits-per-byte claim is made at (they never settle at these sizes)."""
    if a.steps is None and b.steps is None:
        return ""
    if a.steps and a.steps == b.steps:
        return f" at {a.steps} steps (equal budget)"
    a_steps, b_steps = ("?" if s is None else s for s in (a.steps, b.steps))  # 0: a pretrained point
    return f" at {a_steps} vs {b_steps} steps"


def _claim(text: str, a: "Point", b: "Point", column: str, higher_supports: bool,
           margin: float = 0.0, curves: dict | None = None) -> dict | None:
    """a against b on `column`; with a margin, the claim is that a is worse by at most it."""
    found = a.difference(b, column)
    if found is None:
        return None
    difference, interval = found
    shift = margin if higher_supports else -margin
    final = stats.verdict((interval[0] + shift, interval[1] + shift), higher_supports)
    tracked = track(a, b, column, curves, higher_supports, shift, final)
    if tracked is None:
        verdict = "not tracked"
    elif final != "inconclusive" and tracked["holds"] == tracked["steps"]:
        verdict = final
    else:
        verdict = "not settled" if abs(tracked["moved"]) > tracked["tolerance"] else "inconclusive"
    return {"claim": text + (_budget(a, b) if column.startswith("bpb") else ""), "a": a.name, "b": b.name,
            "measure": column, "a_mean": a.mean(column), "b_mean": b.mean(column), "difference": difference,
            "interval": interval, "final": final, "tracked": tracked, "verdict": verdict,
            "cache_ratio": a.cache_bytes / b.cache_bytes if b.cache_bytes else None}


def _same_design(a: "Point", b: "Point") -> bool:
    return {k: v for k, v in a.attention.items() if k != "cache_policy"} == \
        {k: v for k, v in b.attention.items() if k != "cache_policy"}


def beyond_the_seeds(pts: list["Point"], curves: dict | None = None) -> list[dict | None]:
    """Claims 6-8: the factored window, and each retrofit against scratch and the zero-step policy."""
    out = []
    for f in (p for p in pts if p.kind == "tensor_cache" and p.attention.get("factors") and _scratch(p)):
        w, write = f.attention.get("window"), f.attention.get("write", "exact")
        for tc in (p for p in pts if _is_tc(p, write) and p.attention.get("window") == w
                   and p.attention.get("sinks") == f.attention.get("sinks") and p.widths == f.widths):
            out.append(_claim(f"factored window ({f.name}) loses <= {RECALL_MARGIN:g} far recall vs Tensor Cache "
                              f"at W={w}", f, tc, "mqar_beyond", True, RECALL_MARGIN, curves))
    steps = {p.name: p.steps for p in pts}
    for r in (p for p in pts if p.init_from is not None):
        w, parent_steps = r.attention.get("window"), steps.get(r.init_from)
        share = f"{r.steps / parent_steps:.0%} of the steps" if r.steps and parent_steps else "its own steps"
        columns = (["mqar_beyond"] if r.kind in MEMORY_KINDS else []) + ["bpb"]
        for scratch in (p for p in pts if _scratch(p) and _same_design(p, r) and p.widths == r.widths):
            for col in columns:
                margin = RECALL_MARGIN if col == "mqar_beyond" else BPB_MARGIN
                out.append(_claim(f"retrofit {r.name} ({share}) loses <= {margin:g} {col} vs from scratch",
                                  r, scratch, col, col != "bpb", margin, curves))
        for policy in (p for p in pts if p.attention.get("cache_policy", {}).get("policy") == "window"
                       and p.attention["cache_policy"].get("window") == w and p.name.split("+")[0] == r.init_from):
            for col in columns:
                out.append(_claim(f"retrofit {r.name} > {policy.name}, the zero-step policy, in {col}",
                                  r, policy, col, col != "bpb", curves=curves))
    return out


def evaluate_claims(pts: list["Point"], curves: dict | None = None) -> list[dict]:
    """Every claim the study's points allow; `curves`: `convergence.claim_curves` (None: every
    verdict reads "not tracked")."""
    out = []
    swa = [p for p in pts if p.kind == "swa" and not p.attention.get("sinks") and _scratch(p)]
    chunk_mean = [p for p in pts if _is_tc(p, "chunk_mean")]
    exact = [p for p in pts if _is_tc(p, "exact")]
    for tc in exact:
        w = tc.attention.get("window")
        for s in (p for p in swa if p.attention.get("window") == w and p.widths == tc.widths):
            out.append(_claim(f"Tensor Cache > SWA at W={w}, beyond-window recall", tc, s, "mqar_beyond", True,
                              curves=curves))
        for cm in (p for p in chunk_mean if p.attention.get("window") == w and p.widths == tc.widths):
            out.append(_claim(f"exact write > chunk_mean at W={w}, beyond-window recall", tc, cm,
                              "mqar_beyond", True, curves=curves))
    for tc in exact:
        rivals = [p for p in pts if ((p.kind in BOUNDED_BASELINES and _scratch(p)) or p.attention.get("cache_policy"))
                  and p.cache_bytes <= tc.cache_bytes
                  and p.mean("mqar_beyond") is not None]
        if rivals:
            best = max(rivals, key=lambda p: p.mean("mqar_beyond"))
            out.append(_claim(f"Tensor Cache ({tc.name}) > best bounded baseline with no more cache bytes",
                              tc, best, "mqar_beyond", True, curves=curves))
    linear = [p for p in pts if p.kind == "linear" and _scratch(p)]
    for tc in exact:
        for lin in (p for p in linear if p.widths == tc.widths):  # the same d_h x d_h state per head
            out.append(_claim(f"Tensor Cache ({tc.name}) > linear attention ({lin.name}) in capacity at 90 %",
                              tc, lin, "capacity90", True, curves=curves))
    mha = [p for p in pts if p.kind == "mha" and _scratch(p)]
    for tpa in (p for p in pts if p.kind == "tpa" and _scratch(p)):
        for ref in mha:
            out.append(_claim(f"TPA ({tpa.name}) < MHA in bits per byte", tpa, ref, "bpb", False, curves=curves))
    out += beyond_the_seeds(pts, curves)
    return [c for c in out if c is not None]


def _tracked(c: dict) -> str:
    t = c["tracked"]
    if t is None:
        return "no validation curve"
    d = t["difference"]
    return (f"{d[0]:+.3f} -> {d[-1]:+.3f} from {t['from']:.0%} of training; interval {c['final']} at "
            f"{t['holds']}/{t['steps']} steps; moved {t['moved']:+.3f} (tolerance {t['tolerance']:.3g})")


def claims_table(claims: list[dict], seeds: int) -> list[str]:
    if not claims:
        return ["No claim applies to this study's points (it needs the families the claims compare)."]
    note = ("Intervals: bootstrap over seeds and evaluation examples." if seeds > 1 else
            "One seed: the intervals cover evaluation examples only, not the spread between training "
            "runs, so a verdict here is weaker than it looks.")
    note += (" Verdict: the interval at the end and the same difference on its validation curve, whose 95 % "
             "interval must give that verdict at every validation of the last 40 % of training (supported, "
             "contradicted); else not settled when the difference still moved by more than the tolerance "
             "over that span, inconclusive when it did not (docs/design.md, \"Claims\").")
    lines = [note, "", "| claim | measure | a | b | difference a - b [95 % CI] | last 40 % of training "
             "(validation difference) | cache a / b | verdict |", "|---|---|---|---|---|---|---:|---|"]
    for c in claims:
        lo, hi = c["interval"]
        ratio = "-" if c["cache_ratio"] is None else f"{c['cache_ratio']:.3g}"
        spec = ".2f" if c["measure"] == "capacity90" else ".3f"
        lines.append(f"| {c['claim']} | {c['measure']} | {c['a']} ({c['a_mean']:{spec}}) | {c['b']} "
                     f"({c['b_mean']:{spec}}) | {c['difference']:+{spec}} [{lo:+{spec}}, {hi:+{spec}}] | "
                     f"{_tracked(c)} | {ratio} | **{c['verdict']}** |")
    return lines
