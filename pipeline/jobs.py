"""The jobs the stages hand to Ray workers, typed.

Words used everywhere (job fields, MLflow tags, file names):
- a *variant* is a named attention config of `params.yaml` (`variants.<name>`);
- a *run* is one variant trained at one seed. Its name (`run`) names its checkpoint, export,
  result file and MLflow run: the variant's name for the first seed, `<variant>.seed<k>` for the
  others (`Params.runs()`).
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict

from models import CachePolicy, ModelConfig
from pipeline.params import EvalConfig, MQARConfig, TrainConfig


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str
    variant: str
    seed: int
    device: str = "cpu"
    threads: int = 1


class TrainJob(_Job):
    """Train one run to `train.steps`, resuming from `ckpt_dir` when its fingerprint matches."""

    model: ModelConfig
    train: TrainConfig  # `seeds` holds this run's seed alone
    fingerprint: str
    data_dir: str
    ckpt_dir: str
    fault: Optional[str] = None  # test hook, from $KVF_FAULT: "<run>:<step>:nan|raise"
    tracking_uri: Optional[str] = None  # set with a tracking server: the worker logs its own curve
    mlflow_run_id: Optional[str] = None


class EvalJob(_Job):
    """Measure one trained run: quality, lm-eval tasks, memory and speed."""

    family: str
    lr: float  # the rate that won on validation (pipeline.selection)
    lr_candidates: dict[str, float]  # every rate tried -> its validation objective
    eval: EvalConfig
    mqar: MQARConfig
    fingerprint: str  # of (checkpoint, eval config, task settings, evaluation code)
    reach: Optional[tuple[int, int]]  # the study's shortest and longest window reach (MQAR split)
    min_window: Optional[int] = None  # the study's smallest window (bits per byte by distance)
    task_metadata: dict
    ckpt_dir: str
    export_dir: str
    data_dir: str
    hf_home: str
    policy: Optional[CachePolicy] = None  # measure the checkpoint under this inference-time cache policy
    checkpoint_run: Optional[str] = None  # with a policy: the trained run it cuts (`run` is `<it>+<policy>`)
