"""One variant's training loop: AdamW, warmup + cosine, clipping, LM text + MQAR recall mixture.

Batches are pure functions of (seed, step) (`pipeline.core.data.TrainingData`) and there is no
dropout, so resuming from a checkpoint replays exactly the steps an uninterrupted run takes.
"""
from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core import checkpoint
from pipeline.core.data import TrainingData
from pipeline.core.jobs import TrainJob
from pipeline.core.params import REPORT_CONTEXT, TrainConfig
from pipeline.train.preempt import stop_requests


class RunFailed(RuntimeError):
    """Training stopped: `step` is the step at which it happened."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class Preempted(RunFailed):
    """Stopped on request (pipeline/train/preempt.py) after writing the checkpoint of `step`."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine down to `min_lr_ratio * lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def freeze(job: TrainJob, model: torch.nn.Module) -> torch.nn.Module:
    """With `train.trainable: attention` a retrofit trains its attention alone (every parameter of
    its blocks' `attn`: q, k, v, o and what the child adds); the rest is frozen before any
    optimizer sees the model, so the step-0 checkpoint's optimizer and the loop's agree."""
    if job.init_from is not None and job.train.trainable == "attention":
        for name, p in model.named_parameters():
            p.requires_grad_(".attn." in name)
    return model


def build(job: TrainJob) -> torch.nn.Module:
    """The run's model at step 0: a pretrained point's read from its checkpoint, any other built at
    its seed (a retrofit's weights are then those of its step-0 checkpoint)."""
    from models import build_model

    if job.pretrained is not None:
        from models.pretrained import load_pretrained

        return load_pretrained(job.pretrained, tokenizer=False)[0]
    torch.manual_seed(job.seed)
    return freeze(job, build_model(job.model))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors and scalars (norms, gates, decays) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def chunked_cross_entropy(model, x: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """The mean cross-entropy of `y` (-100: no target) after `x`, the head and the loss applied
    `chunk` positions at a time and recomputed in the backward pass: no (B, T, vocab) fp32 logits
    are ever held (200 MB a 1,024-token sequence at a 49k vocabulary)."""
    from torch.utils.checkpoint import checkpoint

    def part(h, t):
        logits = model.lm_head(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under autocast: fp32
        return F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")

    h = model.hidden(x)
    total = sum(checkpoint(part, h[:, s : s + chunk], y[:, s : s + chunk], use_reentrant=False)
                for s in range(0, x.shape[1], chunk))
    return total / (y != -100).sum().clamp(min=1)


def _loss(model, inputs: np.ndarray, targets: np.ndarray, device, chunk: int = 0) -> torch.Tensor:
    x = torch.from_numpy(inputs).to(device)
    y = torch.from_numpy(targets).to(device)
    if chunk:
        return chunked_cross_entropy(model, x, y, chunk)
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model, data: TrainingData, cfg: TrainConfig, device) -> dict[str, float]:
    """val/bpb on fixed validation windows (val/bpb_se: the standard error of its windows' bits per
    byte, for the claims' per-step intervals); val/mqar_acc_<bucket> on each MQAR validation set
    and val/mqar_capacity_p<count> on each capacity set (`data.mqar.capacity_pairs`); val/objective,
    the training mixture's loss on validation data (`mixture.lm * val/loss + mixture.mqar *
    val/mqar_loss`, the buckets' answers only): what the learning-rate selection compares."""
    model.eval()
    x, y, nbytes = data.val_windows(cfg.val_batches * cfg.batch_size, cfg.seq_len)
    window_nats = []
    for i in range(0, len(x), cfg.batch_size):
        logits = model(torch.from_numpy(x[i : i + cfg.batch_size]).to(device)).float()
        target = torch.from_numpy(y[i : i + cfg.batch_size]).to(device)
        window_nats += F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1).tolist()
    nats = float(sum(window_nats))
    # per token for the loss; per byte of text covered for bpb (the two agree for bytes)
    out = {"val/loss": nats / y.size, "val/bpb": nats / math.log(2) / float(nbytes.sum())}
    per_window = np.asarray(window_nats) / math.log(2) / np.maximum(1, nbytes.sum(axis=1))
    out["val/bpb_se"] = float(per_window.std(ddof=1) / math.sqrt(len(per_window))) if len(per_window) > 1 else 0.0
    mqar_nats = mqar_answers = 0.0
    for name in sorted(data.mqar):
        bucket = name.startswith("eval_")
        if not bucket and not name.startswith("capacity_p"):
            continue
        correct = total = 0
        n_batches = math.ceil(len(data.mqar[name][0]) / cfg.mqar_batch_size)
        for b in range(n_batches):
            xi, yi = data.mqar_batch(name, None, b, cfg.mqar_batch_size)
            logits = model(torch.from_numpy(xi).to(device)).float()
            target = torch.from_numpy(yi).to(device)
            if bucket:
                mqar_nats += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                                             reduction="sum").item()
            pred = logits.argmax(-1).cpu().numpy()
            mask = yi != -100
            correct += int((pred[mask] == yi[mask]).sum())
            total += int(mask.sum())
        if bucket:
            mqar_answers += total
            out[f"val/mqar_acc_{name[len('eval_'):]}"] = correct / max(1, total)
        else:
            out[f"val/mqar_{name}"] = correct / max(1, total)
    if mqar_answers:
        out["val/mqar_loss"] = mqar_nats / mqar_answers
    out["val/objective"] = cfg.mixture.lm * out["val/loss"] + cfg.mixture.mqar * out.get("val/mqar_loss", 0.0)
    model.train()
    return out


class OneProcess:
    """How a run's steps are spread when one process trains it (a Ray task): it holds the whole
    batch and writes its checkpoints to `job.ckpt_dir`. `pipeline.train.ddp.DataParallel` is the
    same interface across Ray Train workers."""

    rank, world = 0, 1

    def __init__(self, job: TrainJob):
        self.ckpt_dir = Path(job.ckpt_dir)

    def wrap(self, model):
        return model

    def shard(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def stop_requested(self) -> bool:
        """A one-process run is stopped by a signal to its own process (`stop_requests`)."""
        return False

    def hold(self) -> None:
        """Test hook (`<run>:<step>:hold`): say so (`.<run>.holding` beside the run's folder) and
        wait there, up to 5 minutes, for what the test does to this worker meanwhile (its node
        stopped). A data-parallel run waits for the stage's stop request instead."""
        (self.ckpt_dir.parent / f".{self.ckpt_dir.name}.holding").write_text("holding\n")
        time.sleep(300)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def resume(self, job: TrainJob, model, optimizer) -> tuple[int, list, dict]:
        """(step, history, logging window's running sums) of the checkpoint this run continues
        from, (0, [], {}) when none."""
        latest = checkpoint.load_latest(self.ckpt_dir)
        if latest is None or latest.get("fingerprint") != job.fingerprint:
            return 0, [], {}
        try:
            meta = checkpoint.restore(self.ckpt_dir, model, optimizer)  # verified before anything loads
            return meta["step"], meta["history"], meta.get("window", {})
        except checkpoint.CorruptCheckpoint as err:
            print(f"[train] {job.run}: {err}: not resumed; the run starts again from step 0", flush=True)
            checkpoint.discard_steps(self.ckpt_dir)
            return 0, [], {}

    def save(self, step: int, model, optimizer, meta: dict, final: dict | None = None) -> None:
        if step > 0 or final is None:  # a run of no steps (a pretrained point) has nothing to resume
            checkpoint.save(self.ckpt_dir, step, model, optimizer, meta)
        if final is not None:
            checkpoint.save_final(self.ckpt_dir, model, final)

    def kill(self) -> None:
        """Test hook (`<run>:<step>:kill`): this worker dies once, as if its node went (Ray runs
        the task again, which resumes from the last checkpoint); the marker beside the run's
        folder says it already did."""
        marker = self.ckpt_dir.parent / f".{self.ckpt_dir.name}.fault-fired"
        if not marker.exists():
            marker.write_text("killed once\n")
            os._exit(1)


def _save(parallel, step: int, *args, **kwargs) -> None:
    """`parallel.save`; a full disk fails the run at this step, naming the file (the last
    checkpoint stays the commit point: the next run resumes there)."""
    try:
        parallel.save(step, *args, **kwargs)
    except checkpoint.DiskFull as err:
        raise RunFailed(step, str(err)) from err


def _fault(job: TrainJob, step: int) -> Optional[str]:
    """Test hook: job.fault = "<run>:<step>:nan|raise|kill|sigterm|hold" (from $KVF_FAULT in the driver)."""
    if not job.fault:
        return None
    name, at, kind = job.fault.split(":")
    return kind if name == job.run and int(at) == step else None


def train_run(job: TrainJob, report: Callable[[dict], None] = lambda record: None,
              parallel: OneProcess | None = None) -> dict:
    """Train one run to `train.steps`, resuming from its checkpoint when there is one.

    `report` receives each history record ({"run", "step", metric: value}) as it is made (by
    rank 0 alone when `parallel` spreads the run over workers: each takes its share of every
    step's batch, and logged losses are averaged over them). Returns {"step", "metrics",
    "history"} or raises RunFailed.
    """
    parallel = parallel or OneProcess(job)
    torch.set_num_threads(job.threads)
    cfg, model_cfg, seed = job.train, job.model, job.seed
    device = torch.device(job.device)
    data = TrainingData(job.data_dir)

    model = build(job).to(device)
    optimizer = make_optimizer(model, cfg)
    static = {
        "model/params": float(model.num_parameters()),
        # stated at one context for every variant: bounded caches have no per-token size
        "model/cache_bytes_per_token_at_32k": model.cache_nbytes(REPORT_CONTEXT) / REPORT_CONTEXT,
        "model/state_bytes_32k": float(model.cache_nbytes(REPORT_CONTEXT)),
    }
    start, history, window = parallel.resume(job, model, optimizer)
    net = parallel.wrap(model)  # what the steps run through (DDP across workers); `model` is saved
    meta_base = {"run": job.run, "variant": job.variant, "fingerprint": job.fingerprint,
                 "seed": seed,
                 "model_config": model_cfg.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if cfg.precision == "bf16" and device.type == "cuda" else torch.autocast("cpu", enabled=False))
    w_lm, w_mq = cfg.mixture.lm, cfg.mixture.mqar
    tokens_per_step = w_lm > 0 and cfg.batch_size * cfg.seq_len
    tokens_per_step += w_mq > 0 and cfg.mqar_batch_size * (data.mqar["train"][0].shape[1] - 1)
    # the logging window's running sums: in every checkpoint, so a run resumed mid-window logs
    # what an uninterrupted one does
    window_t, window_tokens, running = time.perf_counter(), window.get("tokens", 0), dict(window.get("sums", {}))

    model.train()
    with stop_requests() as stop:
        for step in range(start, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            parts = {}
            with amp:
                if w_lm > 0:
                    rows = data.lm_batch(seed, step, cfg.batch_size, cfg.seq_len)
                    parts["train/lm_loss"] = _loss(net, *map(parallel.shard, rows), device, cfg.loss_chunk)
                if w_mq > 0:
                    rows = data.mqar_batch("train", seed, step, cfg.mqar_batch_size)
                    parts["train/mqar_loss"] = _loss(net, *map(parallel.shard, rows), device, cfg.loss_chunk)
            loss = w_lm * parts.get("train/lm_loss", 0.0) + w_mq * parts.get("train/mqar_loss", 0.0)
            fault = _fault(job, step + 1)
            if fault == "raise":
                raise RunFailed(step + 1, "injected failure (KVF_FAULT)")
            if fault == "nan":
                loss = loss * float("nan")
            if fault == "kill":
                parallel.kill()
            if fault == "sigterm":  # as a scheduler's SIGTERM to this worker, at a known step
                os.kill(os.getpid(), signal.SIGTERM)
            if fault == "hold":  # waits here for what the test does meanwhile (a stop request, a lost node)
                parallel.hold()
            if not torch.isfinite(loss):
                raise RunFailed(step + 1, f"loss became {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not torch.isfinite(grad_norm):  # a finite loss can still have inf/NaN gradients
                raise RunFailed(step + 1, f"gradient norm became {grad_norm.item()}")
            optimizer.step()
            window_tokens += tokens_per_step
            for key, value in {"train/loss": loss, "train/grad_norm": grad_norm, **parts}.items():
                running[key] = running.get(key, 0.0) + float(value.detach())
            running["n"] = running.get("n", 0) + 1

            done = step + 1
            if parallel.stop_requested():  # a data-parallel run's stop (pipeline/train/ddp.py)
                stop.request("the stage's stop marker")
            record = {}
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - window_t
                n = running.pop("n")
                record.update(parallel.mean({k: v / n for k, v in running.items()}))
                record["train/lr"] = lr_at(step, cfg)
                record["train/tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                running, window_tokens, window_t = {}, 0, time.perf_counter()
            if (done % cfg.eval_every == 0 or done == cfg.steps) and parallel.rank == 0:
                record.update(evaluate(model, data, cfg, device))
            if record:
                record["step"] = done
                history.append(record)
                if parallel.rank == 0:
                    try:
                        report({"run": job.run, **record})
                    except Exception as err:  # noqa: BLE001
                        # the stage's cancel (a stop request, pipeline/train/preempt.py) landing while
                        # the report waits on the driver's queue comes as Ray's TaskCancelledError
                        if type(err).__name__ != "TaskCancelledError":
                            raise
                        stop.request("SIGINT")
            preempted = bool(stop) and done < cfg.steps  # asked to stop (SIGINT, SIGTERM): not at the end
            if preempted or (done % cfg.checkpoint_every == 0 and done < cfg.steps):
                # the window's sums as the log will average them (across the workers of a data-
                # parallel run: every worker resumes with them, and the mean of their own sums plus
                # these is what an uninterrupted window logs)
                sums = parallel.mean(running) if running else {}
                _save(parallel, done, model, optimizer, {**meta_base, "history": history,
                                                         "window": {"sums": sums, "tokens": window_tokens}})
            if preempted:
                raise Preempted(done, f"preempted ({stop.signal}): its step-{done} checkpoint is written")

    if cfg.steps == 0 and parallel.rank == 0:  # a pretrained point: its checkpoint validated, once
        history.append({"step": 0, **evaluate(model, data, cfg, device)})
        report({"run": job.run, **history[-1]})
    final = {k: v for k, v in history[-1].items() if k.startswith("val/")} if history else {}
    speeds = [r["train/tokens_per_s"] for r in history if "train/tokens_per_s" in r]
    losses = [r["train/loss"] for r in history if "train/loss" in r]
    metrics = {**final, **static, **({"train/loss": losses[-1]} if losses else {}),
               "train/tokens_per_s": float(np.median(speeds)) if speeds else 0.0}
    _save(parallel, cfg.steps, model, optimizer, {**meta_base, "history": history},
          final={**meta_base, "step": cfg.steps, "metrics": metrics, "static": static, "history": history})
    return {"step": cfg.steps, "metrics": metrics, "history": history}
