"""The training loop's validation record against direct computations on a random model."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from pipeline.core.data import TrainingData
from pipeline.core.params import DataConfig, TrainConfig
from pipeline.prepare.prepare import prepare
from pipeline.train.loop import evaluate


def test_validation_logs_bpb_spread_and_capacity_sets_outside_the_objective(tmp_path):
    cfg = DataConfig(mqar=dict(seq_len=48, num_pairs=2, pair_tokens=1, alphabet="own", num_keys=12, num_values=4,
                               num_fillers=8, train_pairs=[2, 4], num_queries=4, capacity_pairs=[2, 8],
                               train_gaps=(2, 30), eval_gaps={"near": (2, 6), "far": (14, 30)},
                               num_train=8, num_eval=10))
    prepare(cfg, tmp_path)
    data = TrainingData(tmp_path)
    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = build_model(ModelConfig(d_model=16, n_layers=1, n_heads=2, init_std=0.5, vocab_size=cfg.mqar.end_id))
    train = TrainConfig(steps=10, warmup_steps=1, seq_len=32, batch_size=3, val_batches=2, mqar_batch_size=4,
                        mixture={"lm": 1.0, "mqar": 2.0})
    out = evaluate(model, data, train, "cpu")
    model.eval()
    x, y, nbytes = data.val_windows(6, 32)
    with torch.no_grad():
        bits = [F.cross_entropy(model(torch.from_numpy(x[i : i + 1]))[0].double(), torch.from_numpy(y[i]),
                                reduction="sum").item() / math.log(2) / nbytes[i].sum() for i in range(6)]
    assert out["val/bpb_se"] == pytest.approx(np.std(bits, ddof=1) / math.sqrt(6), rel=1e-4)

    def scored(name):  # (answers right, answers, summed nats) over a prepared set, all at once
        tokens, mask = data.mqar[name]
        ids = torch.from_numpy(tokens.astype(np.int64))
        with torch.no_grad():
            logits = model(ids[:, :-1]).double()
        answer = torch.from_numpy(mask[:, 1:])
        right = (logits.argmax(-1) == ids[:, 1:])[answer]
        nats = F.cross_entropy(logits[answer], ids[:, 1:][answer], reduction="sum").item()
        return right.sum().item(), right.numel(), nats

    for p in (2, 8):
        right, n, _ = scored(f"capacity_p{p}")
        assert n == 10 * min(p, 4) and out[f"val/mqar_capacity_p{p}"] == right / n
    near, far = scored("eval_near"), scored("eval_far")
    assert out["val/mqar_acc_far"] == far[0] / far[1]
    assert out["val/mqar_loss"] == pytest.approx((near[2] + far[2]) / (near[1] + far[1]), rel=1e-4)  # buckets only
    assert out["val/objective"] == pytest.approx(out["val/loss"] + 2.0 * out["val/mqar_loss"], rel=1e-9)


def test_a_cancel_landing_in_a_report_stops_the_run_as_a_signal_does(tiny_project):
    """The stage's cancel (preemption) can reach a run's worker while it waits on the driver's queue
    (`report`): Ray then raises TaskCancelledError there instead of calling the SIGINT handler.
    The run still stops at that step with its checkpoint (it had failed with the error, losing the
    preemption, in a fresh-clone `make test`)."""
    import json
    from pathlib import Path

    from pipeline.core.data import verify_prepared
    from pipeline.core.params import load_params
    from pipeline.core.runs import train_code, train_jobs
    from pipeline.train.loop import Preempted, train_run

    class TaskCancelledError(Exception):  # Ray's, told by its name (the loop does not import ray)
        pass

    def report(record: dict) -> None:
        if record["step"] == 10:
            raise TaskCancelledError("Task: ... was cancelled.")

    data = tiny_project / "data"
    job = train_jobs(load_params(tiny_project / "params.yaml"), train_code(), data, tiny_project / "checkpoints",
                     verify_prepared(data)["files"])["mha"]
    with pytest.raises(Preempted) as stopped:
        train_run(job, report)
    assert stopped.value.step == 10 and str(stopped.value) == "preempted (SIGINT): its step-10 checkpoint is written"
    assert json.loads((Path(job.ckpt_dir) / "latest.json").read_text())["step"] == 10

    def broken(record: dict) -> None:  # any other error in a report is the run's failure, as before
        raise RuntimeError("queue gone")

    with pytest.raises(RuntimeError, match="queue gone"):
        train_run(job, broken)
