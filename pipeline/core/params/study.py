"""The params file as a whole: `Params` (the blocks, every point of the study, its runs and result
keys) and the checks that read across blocks (variants through `models.ModelConfig`, parameter
matching, retrofits, cache policies, MQAR pair counts against the gaps); `load_params` and
`parse_params` turn a file into it or into a `ParamsError` naming the first bad field."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple, Optional

import yaml
from pydantic import Field, PrivateAttr, ValidationError

from pipeline.core import sweep, tokenizer
from pipeline.core.params.block import ParamsError, _Block
from pipeline.core.params.data import DataConfig, PretrainedTokenizer
from pipeline.core.params.run import ComputeConfig, EvalConfig, TrackingConfig, TrainConfig
from pipeline.core.sweep import Point

_VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Run(NamedTuple):
    """One trained model: a point of the study at one learning rate and one seed. `name` names
    its checkpoint, export, results and MLflow run: `<point>[.lr<lr>][.seed<k>]`, the lr part for
    every rate but the first of `train.lr`, the seed part for every seed but the first (so adding
    a rate or a seed renames nothing and retrains nothing already trained)."""

    name: str
    variant: str  # the point's name (`swa.window16`; the family's name when nothing is swept)
    seed: int
    lr: float
    family: str
    key: str  # the name without its lr part: the learning rates of one key compete


class MatchConfig(_Block):
    """Size every point's SwiGLU width so that its parameter count equals the reference's."""

    reference: str = Field(description="a variant without a sweep, e.g. mha")
    tolerance: float = Field(0.05, gt=0.0, lt=1.0, description="largest relative difference allowed")


class Params(_Block):
    data: DataConfig = Field(default_factory=DataConfig)
    model: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]]
    match_params: Optional[MatchConfig] = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    # resolved by _check_variants: every point of every family, the SwiGLU widths matched, and
    # each pretrained point's config (read from its checkpoint)
    _points: dict[str, Point] = PrivateAttr(default_factory=dict)
    _mlp_hidden: dict[str, int] = PrivateAttr(default_factory=dict)
    _pretrained: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def points(self) -> dict[str, Point]:
        """Every point of the study, families in file order, each family's sweep in list order."""
        return self._points

    @property
    def lrs(self) -> list[float]:
        return list(self.train.lr) if isinstance(self.train.lr, list) else [self.train.lr]

    def model_config_for(self, point: str):
        """The resolved `models.ModelConfig` of one point (its matched SwiGLU width included): a
        pretrained point's is its checkpoint's, and a retrofit of one keeps its every width."""
        from models import ModelConfig

        p = self._points[point]
        if p.pretrained is not None:
            return self._pretrained[point]
        if p.init_from in self._pretrained:
            widths = self._pretrained[p.init_from].model_dump(exclude={"attention"})
            return ModelConfig(**widths, attention=p.attention)
        extra = {"mlp_hidden": self._mlp_hidden[point]} if point in self._mlp_hidden else {}
        return ModelConfig(**self.model_for(p), **extra, attention=p.attention)

    def model_for(self, point: Point) -> dict[str, Any]:
        """The `model` block with the widths a point sets for itself (`POINT_WIDTHS`)."""
        return {**self.model, **(point.widths or {})}

    def train_for(self, point: str) -> TrainConfig:
        """The train block of one point: `train`, with a retrofit's own `steps`, validated at least
        ten times (`eval_every` cut to a multiple of `log_every` near steps / 10) so the report's
        last fifth of it holds validations of its own. A pretrained point trains no step: its run
        reads the checkpoint and validates it once."""
        if self._points[point].pretrained is not None:
            return TrainConfig.model_validate({**self.train.model_dump(), "steps": 0, "warmup_steps": 0})
        steps = self._points[point].steps
        if steps is None:
            return self.train
        log = self.train.log_every
        every = min(self.train.eval_every, max(log, steps // 10 // log * log))
        return TrainConfig.model_validate({**self.train.model_dump(), "steps": steps, "eval_every": every})

    def parent_runs(self, run: Run) -> list[Run]:
        """A retrofit run's candidate parents: its parent point's runs of the same seed (every rate);
        a pretrained parent's one run, whatever the seed."""
        parent = self._points[run.variant].init_from
        return [r for r in self.runs() if r.variant == parent
                and (r.seed == run.seed or self._points[parent].pretrained is not None)]

    def policy_points(self) -> list[tuple[str, Any]]:
        """(point, `models.CachePolicy`) of every `eval.cache_policies` entry and window, in file order."""
        from models import FULL_KINDS

        out = []
        for spec in self.eval.cache_policies:
            on = spec.points if spec.points is not None else [p.name for p in self._points.values()
                                                     if p.attention["kind"] in FULL_KINDS]
            out += [(point, policy) for point in on for policy in spec.expand()]
        return out

    def result_keys(self) -> list[str]:
        """Every evaluation result: `<point>[.seed<k>]` per trained key, and `<point>+<policy>
        [.seed<k>]` per cache policy on each of its point's keys."""
        keys = list(dict.fromkeys(run.key for run in self.runs()))
        by_point = {run.key: run.variant for run in self.runs()}
        return keys + [policy_key(key, point, policy) for point, policy in self.policy_points()
                       for key in keys if by_point[key] == point]

    def runs(self) -> list[Run]:
        """Every (point, lr, seed) of the study: points in file order, then rates, then seeds. A
        pretrained point has one run (the first rate and seed: nothing of it is trained or drawn)."""
        first_seed, first_lr = self.train.seeds[0], self.lrs[0]
        runs = []
        for point in self._points.values():
            once = point.pretrained is not None
            for lr in self.lrs[:1] if once else self.lrs:
                for seed in self.train.seeds[:1] if once else self.train.seeds:
                    key = point.name if seed == first_seed else f"{point.name}.seed{seed}"
                    name = point.name + (sweep.lr_suffix(lr) if lr != first_lr else "") + key[len(point.name):]
                    runs.append(Run(name, point.name, seed, float(lr), point.family, key))
        return runs


def policy_key(key: str, point: str, policy) -> str:
    """The result key of a cache policy on a trained key: `mha.seed1` -> `mha+window16.seed1`."""
    return point + "+" + policy.name + key[len(point):]


def _fmt_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _first_error(err: ValidationError, prefix: tuple = ()) -> tuple[str, str]:
    e = err.errors()[0]
    msg = e["msg"].removeprefix("Value error, ")
    loc = prefix + tuple(e["loc"])
    return _fmt_loc(loc), msg


def _split_path(msg: str) -> tuple[str, str]:
    """Validators raise `field: message`; lift that field into the path."""
    m = re.match(r"^([A-Za-z_0-9][\w.]*): (.*)$", msg, re.S)
    return (m.group(1), m.group(2)) if m else ("", msg)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _variant_error(name: str, attention: dict, err: ValidationError) -> ParamsError:
    """Where an error of `models.ModelConfig(**model, attention=variants.<name>)` lives in the file."""
    e = err.errors()[0]
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "union_tag_invalid":
        return ParamsError(f"variants.{name}.kind: unknown attention kind {attention['kind']!r} "
                           f"(expected one of {e['ctx']['expected_tags']})")
    loc, suffix = [str(p) for p in e["loc"]], ""
    if not loc:  # a model-level validator names its field in the message: "attention.x: ..."
        field, msg = _split_path(msg)
        loc, suffix = (field.split(".") if field else []), f" (variant {name})"
    if loc[:1] == ["attention"]:  # ("attention", [<kind tag>,] field...) -> variants.<name>.field
        rest = loc[2:] if loc[1:2] == [attention.get("kind")] else loc[1:]
        return ParamsError(f"{_join('variants', name, *rest)}: {msg}")
    return ParamsError(f"{_join('model', *loc)}: {msg}{suffix}")


def _describe_tokenizer(cfg) -> str:
    if cfg == "bytes":
        return "bytes"
    if hasattr(cfg, "train"):
        return f"BPE trained to {cfg.train.vocab_size} ids"
    return f"{cfg.pretrained}'s tokenizer" if hasattr(cfg, "pretrained") else f"the tokenizer in {cfg.path}"


PRETRAINED_FIELDS = ("pretrained",)  # all a pretrained point says: the rest is its checkpoint's


def _pretrained_points(params: Params) -> dict[str, Point]:
    """The pretrained points (`variants.<name>: {pretrained: <checkpoint>}`), each config read from
    its checkpoint (`models.pretrained.read_config`: no weights); the study's tokenizer follows
    them: `data.tokenizer` unset becomes theirs, and one set otherwise is refused."""
    from models.pretrained import read_config

    out = {}
    for name, entry in params.variants.items():
        if not (isinstance(entry, dict) and "pretrained" in entry):
            continue
        extra = sorted(set(entry) - set(PRETRAINED_FIELDS))
        if extra:
            raise ParamsError(f"variants.{name}.{extra[0]}: a pretrained point takes its config from its checkpoint "
                              "(give it only `pretrained`; retrofit it with init_from to change it)")
        source = entry["pretrained"]
        if not isinstance(source, str) or not source:
            raise ParamsError(f"variants.{name}.pretrained: names a checkpoint (a packaged name, a .gguf file or a "
                              f"Hugging Face folder), got {source!r}")
        try:
            cfg = read_config(source)
        except (ValueError, OSError) as err:
            raise ParamsError(f"variants.{name}.pretrained: {str(err).removeprefix('source: ')}") from None
        params._pretrained[name] = cfg
        out[name] = Point(name, name, cfg.attention.model_dump(mode="json"), {}, pretrained=source)
    sources = sorted({p.pretrained for p in out.values()})
    if len(sources) > 1:
        raise ParamsError(f"variants: pretrained points from {sources}: a study has one tokenizer, so one checkpoint "
                          "family (split them into studies)")
    if sources:
        form = params.data.tokenizer
        if "tokenizer" not in params.data.model_fields_set:
            params.data.tokenizer = PretrainedTokenizer(pretrained=sources[0])
        elif getattr(form, "pretrained", None) != sources[0]:
            raise ParamsError(f"data.tokenizer: the study's tokenizer is its pretrained point's ({sources[0]}); "
                              f"remove data.tokenizer ({_describe_tokenizer(form)})")
    return out


def _check_variants(params: Params) -> None:
    """Each point of each variant through `models.ModelConfig`, the one authority on attention
    configs; then the parameter matching."""
    from models import ModelConfig

    fields = set(ModelConfig.model_fields) - {"attention"}
    for key in params.model:
        if key not in fields:
            raise ParamsError(f"model.{key}: unknown field (known: {', '.join(sorted(fields))})")
    if not params.variants:
        raise ParamsError("variants: needs at least one variant")
    pretrained = _pretrained_points(params)
    need = tokenizer.vocab_size(params.data.tokenizer)
    mqar_end = params.data.mqar.end_id or 0  # MQAR ids of their own, after the tokenizer's (or among them: vocab)
    if params.data.mqar.alphabet == "vocab" and mqar_end > need:
        raise ParamsError(f"data.mqar.first_id: {params.data.mqar.first_id} + {params.data.mqar.n_ids} MQAR ids "
                          f"reach past the {need} ids of data.tokenizer ({_describe_tokenizer(params.data.tokenizer)})")
    if "vocab_size" not in params.model:
        params.model["vocab_size"] = max(need, mqar_end)  # the model's embedding follows the tokenizer and MQAR
    elif params.model["vocab_size"] < need:
        raise ParamsError(f"model.vocab_size: {params.model['vocab_size']} is smaller than the {need} ids of "
                          f"data.tokenizer ({_describe_tokenizer(params.data.tokenizer)}); remove it (the model "
                          "follows the tokenizer) or raise it")
    elif params.model["vocab_size"] < mqar_end:
        raise ParamsError(f"model.vocab_size: {params.model['vocab_size']} does not reach data.mqar's own ids "
                          f"({params.data.mqar.first_id}..{mqar_end - 1}); remove it (the model follows the "
                          "tokenizer and MQAR) or raise it")
    points: dict[str, Point] = {}
    for name, attention in params.variants.items():
        if not _VARIANT_NAME.match(name):
            raise ParamsError(f"variants.{name}: names must match {_VARIANT_NAME.pattern}")
        if name in pretrained:
            points[name] = pretrained[name]
            continue
        if not isinstance(attention, dict) or "kind" not in attention:
            raise ParamsError(f"variants.{name}.kind: required (an attention kind)")
        if isinstance(attention.get("init_from"), list):
            raise ParamsError(f"variants.{name}.init_from: cannot be swept (one family has one parent)")
        try:
            family = sweep.expand(name, attention)
        except ValueError as err:
            raise ParamsError(str(err)) from None
        for point in family:
            where = f" (sweep point {point.name})" if point.knobs else ""
            point = _split_retrofit(name, point)
            root = params._pretrained.get(point.init_from)  # a retrofit of a pretrained point: its widths
            widths = params.model_for(point) if root is None else root.model_dump(exclude={"attention"})
            try:
                cfg = ModelConfig(**widths, attention=point.attention)
            except ValidationError as err:
                raise ParamsError(str(_variant_error(name, point.attention, err)) + where) from None
            window = getattr(cfg.attention, "window", None)
            for field, length in (("train.seq_len", params.train.seq_len),
                                  ("data.mqar.seq_len", params.data.mqar.seq_len)):
                if window is not None and window >= length:
                    raise ParamsError(f"variants.{name}.window: {window} is not shorter than "
                                      f"{field}={length}{where}")
            points[point.name] = point
    params._points = points
    _check_parents(params)
    _inherit_kv_heads(params)
    if params.match_params is not None:
        _match(params)
    _check_retrofits(params)


RETROFIT_FIELDS = ("init_from", "steps")  # a variant's fields that are not its attention's
POINT_WIDTHS = ("n_heads", "d_head")  # model widths a variant may set (sweep) for its own points: h, d_h


def _split_retrofit(family: str, point: Point) -> Point:
    """`init_from` and `steps` move from the point's attention config to its own fields, and so do
    the widths it sets for itself (`POINT_WIDTHS`: e.g. a sweep of d_head for a fixed state)."""
    attention = {k: v for k, v in point.attention.items() if k not in RETROFIT_FIELDS + POINT_WIDTHS}
    widths = {k: v for k, v in point.attention.items() if k in POINT_WIDTHS}
    point = point._replace(widths=widths or None)
    init_from, steps = point.attention.get("init_from"), point.attention.get("steps")
    if "steps" in point.attention and init_from is None:
        raise ParamsError(f"variants.{family}.steps: only with init_from (a retrofit's own training length; "
                          "the others train train.steps)")
    if init_from is not None and not isinstance(init_from, str):
        raise ParamsError(f"variants.{family}.init_from: names a point, got {init_from!r}")
    if "steps" in point.attention and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ParamsError(f"variants.{family}.steps: must be an integer >= 1, got {steps!r}")
    return point._replace(attention=attention, init_from=init_from, steps=steps)


def _check_parents(params: Params) -> None:
    """Each retrofit names a point of the study trained from scratch (no chains)."""
    for point in params.points.values():
        if point.init_from is None:
            continue
        parent = params.points.get(point.init_from)
        if parent is None:
            raise ParamsError(f"variants.{point.family}.init_from: unknown point {point.init_from!r} "
                              f"(points: {', '.join(params.points)})")
        if parent.init_from is not None:
            raise ParamsError(f"variants.{point.family}.init_from: {parent.name} is itself a retrofit (from "
                              f"{parent.init_from}); start from a point trained from scratch")


def _inherit_kv_heads(params: Params) -> None:
    """A retrofit into a window (swa, tensor_cache) that does not set `n_kv_heads` keeps its
    parent's: a GQA parent's 3 KV heads stay 3 (the kinds' own default, one per query head, would
    ask the map to split heads it only pools)."""
    for name, point in params.points.items():
        if point.init_from is None or "n_kv_heads" in point.attention:
            continue
        if point.attention.get("kind") in ("swa", "tensor_cache") and not point.attention.get("factors"):
            g = params.model_config_for(point.init_from).attention.n_kv_heads
            params._points[name] = point._replace(attention={**point.attention, "n_kv_heads": g})


def _check_retrofits(params: Params) -> None:
    """Each retrofit's map exists (`models.retrofit.check`), its steps make a valid train block, and
    its runs train in one process at a path (what the train stage supports)."""
    from models.retrofit import WIDTHS, RetrofitError, check

    for point in params.points.values():
        if point.init_from is None:
            continue
        where = f"variants.{point.family}"
        try:
            check(params.model_config_for(point.init_from), params.model_config_for(point.name))
        except RetrofitError as err:
            field, msg = _split_path(str(err))
            field = "init_from" if field in WIDTHS else field
            raise ParamsError(f"{where}.{field}: {msg} (parent {point.init_from})") from None
        try:
            params.train_for(point.name)
        except ValidationError as err:
            raise ParamsError(f"{where}.steps: {_first_error(err)[1]}") from None
        if params.compute.workers_per_run > 1:
            raise ParamsError(f"compute.workers_per_run: a study with init_from ({point.family}) trains each run "
                              "in one process; set 1")


def _match(params: Params) -> None:
    """Every point's SwiGLU width sized to the reference variant's parameter count."""
    match = params.match_params
    reference = [p for p in params.points.values() if p.family == match.reference]
    if reference and reference[0].pretrained is not None:
        raise ParamsError(f"match_params.reference: {match.reference} is pretrained: its width is its own; "
                          "name a point trained from scratch")
    if len(reference) != 1:
        raise ParamsError(f"match_params.reference: {match.reference!r} must name a variant without a "
                          f"sweep (variants: {', '.join(params.variants)})")
    if "mlp_hidden" in params.model:
        raise ParamsError("model.mlp_hidden: set by match_params; remove one of the two")
    target = sweep.count_parameters(params.model_for(reference[0]), reference[0].attention)
    for point in params.points.values():
        if point.init_from is not None or point.pretrained is not None:  # its MLP is its parent's, or its own
            continue
        try:
            hidden = sweep.matched_mlp_hidden(params.model_for(point), point.attention, target)
        except ValueError as err:
            raise ParamsError(f"match_params: cannot match {point.name}: {err}") from None
        count = sweep.count_parameters(params.model_for(point) | {"mlp_hidden": hidden}, point.attention)
        if abs(count - target) > match.tolerance * target:
            raise ParamsError(f"match_params.tolerance: {point.name} has {count:,} parameters at the "
                              f"closest width, {abs(count / target - 1):.1%} from {target:,}")
        params._mlp_hidden[point.name] = hidden
    for point in params.points.values():
        if point.init_from is not None and point.init_from in params._mlp_hidden:
            params._mlp_hidden[point.name] = params._mlp_hidden[point.init_from]


def _check_policies(params: Params) -> None:
    """Each cache policy names full-attention points and builds a valid `models.CachePolicy`."""
    from models import FULL_KINDS

    for i, spec in enumerate(params.eval.cache_policies):
        where = f"eval.cache_policies.{i}"
        try:
            spec.expand()
        except ValidationError as err:
            loc, msg = _first_error(err)
            field, msg = _split_path(msg)
            raise ParamsError(f"{_join(where, loc, field)}: {msg}") from None
        for j, name in enumerate(spec.points or []):
            point = params.points.get(name)
            if point is None:
                raise ParamsError(f"{where}.points.{j}: unknown point {name!r} (points: {', '.join(params.points)})")
            if point.attention["kind"] not in FULL_KINDS:
                raise ParamsError(f"{where}.points.{j}: {name} is {point.attention['kind']}; cache policies "
                                  f"apply to full attention ({', '.join(FULL_KINDS)})")
        if not any(p.attention["kind"] in FULL_KINDS for p in params.points.values()):
            raise ParamsError(f"{where}: the study has no full-attention point to apply it to")
    names = [f"{point}+{policy.name}" for point, policy in params.policy_points()]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice:
        raise ParamsError(f"eval.cache_policies: {twice} is listed twice")


def parse_params(raw: Any) -> Params:
    """A loaded YAML document -> Params, or ParamsError naming the first bad field."""
    if not isinstance(raw, dict):
        raise ParamsError("the file must hold a mapping of blocks")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        field, msg = _split_path(e["msg"].removeprefix("Value error, "))
        raise ParamsError(f"{_join(_fmt_loc(tuple(e['loc'])), field)}: {msg}") from None
    if params.train.steps < 1:
        raise ParamsError(f"train.steps: must be >= 1, got {params.train.steps}")
    _check_variants(params)
    mqar = params.data.mqar
    checks = [(f"eval.mqar_pairs.{i}", p, list(mqar.eval_gaps)) for i, p in enumerate(params.eval.mqar_pairs)]
    checks += [(f"eval.capacity_pairs.{i}", p, [mqar.farthest_bucket])
               for i, p in enumerate(params.eval.capacity_pairs)]
    for field, pairs, buckets in checks:
        for bucket in buckets:
            lo, hi = mqar.eval_gaps[bucket]
            why = "must be >= 1" if pairs < 1 else mqar.misfit(pairs, (lo, hi))
            if why:
                raise ParamsError(f"{field}: {pairs} pairs do not fit data.mqar.eval_gaps.{bucket} [{lo}, {hi}] "
                                  f"in data.mqar.seq_len={mqar.seq_len}: {why}")
    _check_policies(params)
    workers = params.compute.workers_per_run
    if workers > 1 and params.train.loss_chunk:
        raise ParamsError(f"train.loss_chunk: the loss in chunks reads the model past DDP's forward; with "
                          f"compute.workers_per_run={workers} set 0")
    for field in ("batch_size", "mqar_batch_size"):
        if getattr(params.train, field) % workers:
            raise ParamsError(f"train.{field}: {getattr(params.train, field)} is not divisible by "
                              f"compute.workers_per_run={workers} (each worker takes an equal share)")
    if params.train.seq_len not in params.eval.context_lengths:
        raise ParamsError(f"eval.context_lengths: must include train.seq_len={params.train.seq_len} "
                          "(bits per byte at the trained length is the frontier's quality axis)")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"file not found ({path})") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"not valid YAML ({err})".replace("\n", " ")) from None
    return parse_params(raw)
