"""`params.yaml`, parsed once into typed blocks; an invalid file fails before any work, naming the field.

Blocks: `data`, `model` (widths shared by every variant), `variants` (name -> attention config),
`train`, `eval`, `compute` (Ray), `tracking` (MLflow). Every block forbids unknown keys.
Each variant is checked by building `models.ModelConfig(**model, attention=variant)`, so the
models package stays the one authority on what an attention config may hold.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import tokenizer


class ParamsError(ValueError):
    """A malformed params file; the message names the field path (`variants.tpa.rank_k: ...`)."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- data
class MQARConfig(_Block):
    """Token-level multi-query associative recall (zoology): pairs `k v` scattered in noise, then
    queries `k v` at the end; each key sits `gap` tokens before its query."""

    seq_len: int = Field(256, ge=16)
    num_pairs: int = Field(8, ge=1)
    num_keys: int = Field(64, ge=2, description="size of the key alphabet")
    num_values: int = Field(64, ge=2, description="size of the value alphabet")
    num_fillers: int = Field(64, ge=1, description="size of the noise alphabet between pairs")
    pair_tokens: Literal[1, 2] = Field(
        2, description="2: a stored pair is `k v` (zoology); 1: one token per (key, value)"
    )
    train_gaps: tuple[int, int] = Field((2, 200), description="gap range of the training pool")
    eval_gaps: dict[str, tuple[int, int]] = Field(
        default_factory=lambda: {"near": (2, 24), "far": (96, 200)},
        description="named gap buckets, one validation file each",
    )
    num_train: int = Field(8192, ge=1)
    num_eval: int = Field(256, ge=1, description="examples per eval gap bucket")

    @model_validator(mode="after")
    def _check(self) -> "MQARConfig":
        joint = self.num_keys * self.num_values if self.pair_tokens == 1 else 0
        if self.num_keys + self.num_values + joint + self.num_fillers > 256:
            raise ValueError(
                "num_fillers: keys + values + fillers (+ keys * values when pair_tokens is 1) "
                "must fit in the 256 byte ids"
            )
        if self.num_pairs > min(self.num_keys, self.num_values):
            raise ValueError(f"num_pairs: {self.num_pairs} exceeds the key/value alphabet")
        max_gap = self.seq_len - 2 * self.num_pairs - 1
        for name, (lo, hi) in [("train_gaps", self.train_gaps)] + [
            (f"eval_gaps.{k}", v) for k, v in self.eval_gaps.items()
        ]:
            if not 2 <= lo <= hi <= max_gap:
                raise ValueError(
                    f"{name}: need 2 <= lo <= hi <= seq_len - 2*num_pairs - 1 = {max_gap}, "
                    f"got [{lo}, {hi}]"
                )
            if hi - lo + 1 < self.pair_tokens * self.num_pairs:
                raise ValueError(f"{name}: range [{lo}, {hi}] too narrow for {self.num_pairs} pairs")
        return self


class RetrievalConfig(_Block):
    """Text episodes over held-out plays: evidence at a controlled distance before the question."""

    tasks: list[Literal["passkey", "kv_retrieval", "multi_needle"]] = Field(
        default_factory=lambda: ["passkey", "kv_retrieval", "multi_needle"]
    )
    context_lengths: list[int] = Field(default_factory=lambda: [512, 1024])
    distances: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 0.9],
        description="evidence distance from the question, as a fraction of the context length",
    )
    episodes_per_cell: int = Field(4, ge=1, description="episodes per (task, length, distance)")
    num_distractors: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "RetrievalConfig":
        for i, d in enumerate(self.distances):
            if not 0.0 < d < 1.0:
                raise ValueError(f"distances.{i}: must lie in (0, 1), got {d}")
        for i, n in enumerate(self.context_lengths):
            if n < 256:
                raise ValueError(f"context_lengths.{i}: must be >= 256, got {n}")
        return self


class DataConfig(_Block):
    seed: int = 1234
    validation_plays: list[str] = Field(default_factory=lambda: ["julius_caesar", "twelfth_night"])
    heldout_plays: list[str] = Field(default_factory=lambda: ["hamlet", "macbeth"])
    mqar: MQARConfig = Field(default_factory=MQARConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        from pipeline.data import list_plays  # the package data is the authority on names

        known = set(list_plays())
        for field in ("validation_plays", "heldout_plays"):
            for i, name in enumerate(getattr(self, field)):
                if name not in known:
                    raise ValueError(f"{field}.{i}: unknown play {name!r}")
        both = set(self.validation_plays) & set(self.heldout_plays)
        if both:
            raise ValueError(f"heldout_plays: {sorted(both)} also in validation_plays")
        if not self.validation_plays:
            raise ValueError("validation_plays: needs at least one play")
        return self


# --------------------------------------------------------------------------- train / eval
class MixtureConfig(_Block):
    """Loss weights of the task mixture; each task has its own batch every step."""

    lm: float = Field(1.0, ge=0.0)
    mqar: float = Field(1.0, ge=0.0)


class TrainConfig(_Block):
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        description="one training run per seed (init and batch order); the first is the variant's "
                    "primary run, the others give the report its error bars",
    )
    steps: int = Field(300, ge=1)
    seq_len: int = Field(256, ge=8, description="LM context length T")
    batch_size: int = Field(8, ge=1, description="LM sequences per step")
    mqar_batch_size: int = Field(16, ge=1, description="MQAR sequences per step")
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    lr: float = Field(3e-3, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor, fraction of lr")
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0.0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    val_batches: int = Field(4, ge=1, description="LM validation batches (of batch_size) per eval")
    checkpoint_every: int = Field(50, ge=1)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = autocast, CUDA only")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not self.seeds:
            raise ValueError("seeds: needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: repeats a seed ({self.seeds})")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} must be < steps={self.steps}")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas.{i}: must lie in [0, 1), got {b}")
        if self.checkpoint_every % self.log_every:
            # a resumed run must average its logged losses over the same windows
            raise ValueError(
                f"checkpoint_every: {self.checkpoint_every} must be a multiple of "
                f"log_every={self.log_every}"
            )
        if self.mixture.lm == 0 and self.mixture.mqar == 0:
            raise ValueError("mixture: at least one task needs a positive weight")
        return self


# The context at which every variant's cache is stated (bounded caches have no per-token size):
# the report's x axis, the model card and the `*_at_32k` metrics.
REPORT_CONTEXT = 32768


class EvalConfig(_Block):
    """Read by the evaluate stage (pipeline/evaluate.py)."""

    context_lengths: list[int] = Field(default_factory=lambda: [256, 1024],
                                       description="held-out bits-per-byte context lengths")
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    seed: int = Field(4321, description="fresh MQAR sets and lm-eval task data")
    bpb_tokens: int = Field(8192, ge=1, description="held-out tokens scored per context length")
    mqar_pairs: list[int] = Field(default_factory=lambda: [2, 4], description="MQAR pair counts")
    mqar_examples: int = Field(128, ge=1, description="MQAR sequences per (pairs, gap bucket)")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="pipeline/tasks names")
    task_context_lengths: list[int] = Field(default_factory=lambda: [512, 1024],
                                            description="lm-eval task context lengths (bytes)")
    limit: Optional[int] = Field(None, ge=1, description="episodes per task (None: all)")
    decode_lengths: list[int] = Field(default_factory=lambda: [1024, 4096],
                                      description="prefill this many tokens, then decode")
    decode_new_tokens: int = Field(32, ge=1, description="decode steps timed after each prefill")
    generate_kinds: list[str] = Field(default_factory=lambda: ["tensor_cache"],
                                      description="kinds whose memory is checked while generating")
    generate_lengths: list[int] = Field(default_factory=list,
                                        description="tokens generated from a short prompt")
    report_context: int = Field(REPORT_CONTEXT, ge=1, description="context of the frontier's cache bytes")

    @field_validator("lm_eval_tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from pipeline.evaluation.harness import task_names  # the task YAMLs are the authority

        known = task_names()
        for i, name in enumerate(tasks):
            if name not in known:
                raise ValueError(f"{i}: unknown task {name!r} (known: {', '.join(sorted(known))})")
        return tasks


# --------------------------------------------------------------------------- compute / tracking
class ComputeConfig(_Block):
    ray_address: Optional[str] = Field(
        None, description="None: a local Ray (or the cluster of a `ray job submit` job)"
    )
    num_cpus: Optional[int] = Field(None, ge=1, description="local Ray only; None = all cores")
    cpus_per_job: int = Field(1, ge=1, description="CPUs (and torch threads) per variant job")
    gpus_per_job: Union[Literal["auto"], int] = Field(
        "auto", description="auto: 1 when the cluster has GPUs, else 0"
    )
    temp_dir: str = Field("runs/ray", description="local Ray temp dir, relative to the repo (Ray is "
                          "handed a short link to it when the path is too deep for its sockets)")

    @field_validator("gpus_per_job", mode="before")
    @classmethod
    def _gpus(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError(f"must be 'auto' or an integer >= 0, got {value!r}")


class TrackingConfig(_Block):
    uri: Optional[str] = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db"
    )
    experiment: str = Field("kv-frontier", min_length=1)


# --------------------------------------------------------------------------- the file
_VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Run(NamedTuple):
    """One trained model: a variant at one seed. `name` names its checkpoint, export, results
    and MLflow run: the variant's name for the first seed, `<variant>.seed<k>` for the others."""

    name: str
    variant: str
    seed: int


class Params(_Block):
    data: DataConfig = Field(default_factory=DataConfig)
    model: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]]
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def model_config_for(self, variant: str):
        """The resolved `models.ModelConfig` of one variant."""
        from models import ModelConfig

        return ModelConfig(**self.model, attention=self.variants[variant])

    def runs(self) -> list[Run]:
        """Every (variant, seed) of the study, variants in file order."""
        first = self.train.seeds[0]
        return [Run(name if seed == first else f"{name}.seed{seed}", name, seed)
                for name in self.variants for seed in self.train.seeds]


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


def _check_variants(params: Params) -> None:
    """Each variant through `models.ModelConfig`, the one authority on attention configs."""
    from models import ModelConfig

    fields = set(ModelConfig.model_fields) - {"attention"}
    for key in params.model:
        if key not in fields:
            raise ParamsError(f"model.{key}: unknown field (known: {', '.join(sorted(fields))})")
    if not params.variants:
        raise ParamsError("variants: needs at least one variant")
    vocab = params.model.get("vocab_size", ModelConfig.model_fields["vocab_size"].default)
    if vocab < tokenizer.VOCAB_SIZE:
        raise ParamsError(
            f"model.vocab_size: {vocab} is smaller than the byte tokenizer's {tokenizer.VOCAB_SIZE}"
        )
    for name, attention in params.variants.items():
        if not _VARIANT_NAME.match(name):
            raise ParamsError(f"variants.{name}: names must match {_VARIANT_NAME.pattern}")
        if not isinstance(attention, dict) or "kind" not in attention:
            raise ParamsError(f"variants.{name}.kind: required (an attention kind)")
        try:
            cfg = ModelConfig(**params.model, attention=attention)
        except ValidationError as err:
            raise _variant_error(name, attention, err) from None
        window = getattr(cfg.attention, "window", None)
        for field, length in (("train.seq_len", params.train.seq_len),
                              ("data.mqar.seq_len", params.data.mqar.seq_len)):
            if window is not None and window >= length:
                raise ParamsError(f"variants.{name}.window: {window} is not shorter than {field}={length}")


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
    _check_variants(params)
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
