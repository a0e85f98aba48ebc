"""A retrofit's start (docs/design.md#retrofit-a-point-initialised-from-a-trained-one): the child
built at its seed, its weights mapped from its parent's final checkpoint (`models.retrofit`), saved
as its step-0 checkpoint with a fresh optimizer. The loop resumes from it as from any checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core import checkpoint
from pipeline.core.jobs import TrainJob
from pipeline.train.loop import freeze, make_optimizer


def write_initial(job: TrainJob, parent_dir: Path) -> dict:
    """The child's step-0 checkpoint in `job.ckpt_dir`; returns its metadata (as `load_latest`)."""
    from models import build_model
    from models.retrofit import initialise

    parent, final = checkpoint.load_model(parent_dir)  # digests verified
    if final["fingerprint"] != job.init_from_fingerprint:
        raise checkpoint.CorruptCheckpoint(f"{parent_dir}: not the parent run {job.init_from} this run was "
                                           f"planned from (fingerprint {final['fingerprint']})")
    torch.manual_seed(job.seed)
    child = build_model(job.model)
    initialise(child, parent.state_dict(), parent.config)
    freeze(job, child)
    meta = {"run": job.run, "variant": job.variant, "fingerprint": job.fingerprint, "seed": job.seed,
            "model_config": job.model.model_dump(mode="json"), "train": job.train.model_dump(mode="json"),
            "history": [], "init_from": job.init_from, "init_from_fingerprint": job.init_from_fingerprint}
    checkpoint.save(Path(job.ckpt_dir), 0, child, make_optimizer(child, job.train), meta)
    return checkpoint.load_latest(Path(job.ckpt_dir))
