"""The jobs the stages hand to Ray workers, typed.

Words used everywhere (job fields, MLflow tags, file names):
- a *variant* is a named attention config of `params.yaml` (`variants.<name>`);
- a *run* is one variant trained at one seed. Its name (`run`) names its checkpoint, export,
  result file and MLflow run: the variant's name for the first seed, `<variant>.seed<k>` for the
  others (`Params.runs()`).
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, model_validator

from models import CachePolicy, ModelConfig
from pipeline.core.params import EvalConfig, MQARConfig, TrainConfig


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str
    variant: str
    seed: int
    device: str = "cpu"
    threads: int = 1


class StorageKeys(BaseModel):
    """Where a run's worker reads and writes when the nodes share no filesystem (`compute.storage`
    is a URI): folders of that storage, never a path of the driver's machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str  # compute.storage
    data: str  # the prepared data: data/<digest of its manifest>
    checkpoints: str  # the run's checkpoint folder: checkpoints/<run>-<fingerprint[:12]>


class EvalStorage(BaseModel):
    """What an evaluation's worker fetches from `compute.storage` (a URI) into its node's cache:
    the prepared data, and the run's checkpoint and export as the driver uploaded them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    data: str  # data/<digest of its manifest>
    run: str  # evaluate/<run>: `checkpoint/` and `export/` below it


class TrainJob(_Job):
    """Train one run to `train.steps`, resuming from its checkpoint when its fingerprint matches:
    at `ckpt_dir`, reading `data_dir` (paths every node sees), or, with `storage`, from storage
    through a copy on the worker's own node (the worker fills in both paths there)."""

    model: ModelConfig
    train: TrainConfig  # `seeds` holds this run's seed alone
    fingerprint: str
    data_dir: Optional[str]
    ckpt_dir: Optional[str]
    storage: Optional[StorageKeys] = None
    fault: Optional[str] = None  # test hook, from $KVF_FAULT: "<run>:<step>:nan|raise|kill|sigterm"
    tracking_uri: Optional[str] = None  # set with a tracking server: the worker logs its own curve
    mlflow_run_id: Optional[str] = None
    init_from: Optional[str] = None  # a retrofit: the parent run it starts from (its selected rate)
    init_from_fingerprint: Optional[str] = None  # that run's fingerprint
    pretrained: Optional[str] = None  # a pretrained point: the checkpoint read instead of training

    @model_validator(mode="after")
    def _paths_or_storage(self):
        if self.storage is None and (self.data_dir is None or self.ckpt_dir is None):
            raise ValueError("a train job needs data_dir and ckpt_dir, or storage")
        return self


class EvalJob(_Job):
    """Measure one trained run: quality, lm-eval tasks, memory and speed."""

    family: str
    lr: float  # the rate that won on validation (pipeline.core.selection)
    lr_candidates: dict[str, float]  # every rate tried -> its validation objective
    eval: EvalConfig
    mqar: MQARConfig
    fingerprint: str  # of (checkpoint, eval config, task settings, evaluation code)
    reach: Optional[tuple[int, int]]  # the study's shortest and longest window reach (MQAR split)
    min_window: Optional[int] = None  # the study's smallest window (bits per byte by distance)
    trained_len: Optional[int] = None  # train.seq_len: bits per byte by distance within it, extrapolation past it
    task_metadata: dict
    ckpt_dir: Optional[str]
    export_dir: Optional[str]
    data_dir: Optional[str]
    hf_home: Optional[str]
    storage: Optional[EvalStorage] = None  # no shared filesystem: the worker fetches these, fills the paths
    policy: Optional[CachePolicy] = None  # measure the checkpoint under this inference-time cache policy
    checkpoint_run: Optional[str] = None  # with a policy: the trained run it cuts (`run` is `<it>+<policy>`)
