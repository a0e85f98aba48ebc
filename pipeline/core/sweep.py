"""A study as a grid: sweeps over each family's memory knob and the learning rate, and models
sized to one parameter count.

- A *family* is one entry of `variants:`. Any field of it may be a list: the family then has one
  *point* per combination (`swa: {kind: swa, window: [8, 16]}` -> points `swa.window8`,
  `swa.window16`). A family without lists is one point named like the family.
- `train.lr` may be a list too: every point trains at each rate (`<point>.lr0.01` for every rate
  but the first), and the
  evaluate stage keeps, per point and seed, the rate with the best validation objective
  (`pipeline.core.selection`).
- `match_params` sizes every point's SwiGLU width so that its parameter count equals the
  reference variant's (within `tolerance`). Sizing the MLP, not the heads, keeps each point's
  cache exactly what its knob says: the x axis of the frontier moves only with the knob.
"""
from __future__ import annotations

import itertools
from typing import Any, NamedTuple


class Point(NamedTuple):
    """One configuration of the study: a family at one value of each of its swept fields."""

    name: str
    family: str
    attention: dict[str, Any]  # single values only
    knobs: dict[str, Any]  # the swept fields and this point's values (empty without a sweep)
    init_from: str | None = None  # a retrofit: the point its weights are mapped from
    steps: int | None = None  # a retrofit's own training length (None: train.steps)
    widths: dict[str, int] | None = None  # model widths the point sets for itself (n_heads, d_head)
    pretrained: str | None = None  # a pretrained point: the checkpoint it is read from (not trained)


def token(value: Any) -> str:
    """A value as it appears in a name: 16, 0.003, none, true."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def expand(family: str, attention: dict[str, Any]) -> list[Point]:
    """Every combination of the listed fields, in the order the lists are written."""
    swept = [k for k, v in attention.items() if isinstance(v, list)]
    if "kind" in swept:
        raise ValueError(f"variants.{family}.kind: cannot be swept (one family has one kind)")
    for key in swept:
        values = attention[key]
        if not values:
            raise ValueError(f"variants.{family}.{key}: an empty sweep")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"variants.{family}.{key}: repeats a value ({values})")
    points = []
    for combo in itertools.product(*(attention[k] for k in swept)):
        knobs = dict(zip(swept, combo))
        name = ".".join([family] + [f"{k}{token(v)}" for k, v in knobs.items()])
        points.append(Point(name, family, {**attention, **knobs}, knobs))
    return points


def lr_suffix(lr: float) -> str:
    return f".lr{token(float(lr))}"


def count_parameters(model: dict[str, Any], attention: dict[str, Any]) -> int:
    """The parameter count of a model, built on the meta device (no memory, no init work)."""
    import torch

    from models import ModelConfig, build_model

    with torch.device("meta"):
        return build_model(ModelConfig(**model, attention=attention)).num_parameters()


def matched_mlp_hidden(model: dict[str, Any], attention: dict[str, Any], target: int) -> int:
    """The SwiGLU width at which `attention`'s model has `target` parameters (nearest integer).

    The count is linear in the width (3 * d_model weights per hidden unit and layer), so two
    counts give it exactly."""
    from models import ModelConfig

    base = ModelConfig(**model, attention=attention)
    h0 = base.mlp_hidden
    p0 = count_parameters(model | {"mlp_hidden": h0}, attention)
    p1 = count_parameters(model | {"mlp_hidden": h0 + 1}, attention)
    hidden = round(h0 + (target - p0) / (p1 - p0))
    if hidden < 1:
        raise ValueError(f"its attention alone has more parameters than the reference's {target:,}")
    return hidden
