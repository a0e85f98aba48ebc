"""The blocks that say how runs train, are evaluated, where they run and where they are recorded:
`train`, `eval` (with its cache policies), `compute` (Ray) and `tracking` (MLflow)."""
from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_serializer, model_validator

from pipeline.core import storage
from pipeline.core.params.block import _Block


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
    steps: int = Field(300, ge=0, description="optimizer steps (0 only in a pretrained point's own train "
                       "block: its run reads the checkpoint and validates it once)")
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
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = autocast, CUDA only (a bf16 matmul "
                                                "is 40x slower than fp32 on these CPUs: "
                                                "benchmarks/pretrained_train.py)")
    loss_chunk: int = Field(0, ge=0, description="> 0: the head and the loss over this many positions at a "
                            "time, recomputed in the backward pass (a large vocabulary's logits never held "
                            "whole); 0: all at once")
    trainable: Literal["all", "attention"] = Field(
        "all", description="what a retrofit trains: every weight, or its attention alone (q, k, v, o and "
        "what the child adds, e.g. Tensor Cache's L2; docs/design.md#retrofit-a-point-initialised-from-a-trained-one); "
        "points trained from scratch train every weight")

    @model_serializer(mode="wrap")
    def _omit_unset_additions(self, handler):
        """Fields added after studies were trained (`trainable`, `loss_chunk`) are left out of the
        dump at their defaults, so a params file that does not set them keeps its fingerprints."""
        out = handler(self)
        for field, default in (("trainable", "all"), ("loss_chunk", 0)):
            if out.get(field, default) == default:
                out.pop(field, None)
        return out

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
        if self.steps and self.warmup_steps >= self.steps:
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
    max_failures: int = Field(2, ge=0, description="a job whose worker dies (killed, out of memory, "
                              "its node gone) is run again this many times, a run from its last "
                              "checkpoint (Ray's task retries; data-parallel runs: Ray Train's worker-group "
                              "restarts) before it fails")
    preempt_grace_s: float = Field(30.0, gt=0, description="train stage: after SIGTERM, how long its "
                                   "runs have to write a checkpoint at their next step before they are "
                                   "cancelled (pipeline/train/preempt.py)")
    stranded_after_s: float = Field(60.0, ge=0, description="a train or evaluate job that no live node "
                                    "of the cluster can run (its node lost and no other with its resources) "
                                    "fails after this many seconds, naming what it needs, instead of waiting "
                                    "forever; 0: wait (an autoscaling cluster that adds nodes)")

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
