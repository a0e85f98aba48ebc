"""Training on a GPU, per attention family of configs/gpu.yaml (its widths, each family's first
sweep point, the SwiGLU width matched as its match_params says; plus `tensor_cache_delta`, the
first tensor_cache point with `write: delta`):

1. tokens/s of a training step (forward + cross-entropy + backward + AdamW) under bf16 autocast
   and in fp32, at T = 2k and 8k (batch 8 and 2), median of a few steps after two warm-up steps;
2. one real run per family through the project's training function (pipeline.train.loop.train_run,
   what a Ray worker calls) on the plays, in bf16 and in fp32, side by side: the logged training
   loss every `log_every` steps and the largest |bf16 - fp32| over the last quarter of the run.

Part of `make gpu-check` (benchmarks/gpu_check.py); on its own:

    python benchmarks/gpu_train.py            # on a CUDA machine
    python benchmarks/gpu_train.py --smoke    # tiny widths on CPU
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from gpu_kernels import SKIPPED, failure, out_of_time  # noqa: E402

from models import ModelConfig, build_model  # noqa: E402
from pipeline.core import sweep  # noqa: E402

SMOKE_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2}  # d_head 16


def study_configs(smoke: bool, path: Path = REPO / "configs" / "gpu.yaml") -> dict[str, ModelConfig]:
    """Each family's first point at the study's widths (--smoke: SMOKE_MODEL's, with windows,
    chunks and MLA's widths cut to fit), SwiGLU widths matched as its match_params says."""
    study = yaml.safe_load(path.read_text())
    model = dict(study["model"], **(SMOKE_MODEL if smoke else {}))
    families = {name: sweep.expand(name, att)[0].attention for name, att in study["variants"].items()
                if "init_from" not in att}  # a retrofit trains as its kind does
    families["tensor_cache_delta"] = dict(families["tensor_cache"], write="delta")
    if smoke:
        cut = {"window": 8, "chunk_size": 16, "kv_lora_rank": 16, "rope_dim": 8}
        families = {name: {k: cut.get(k, v) for k, v in att.items()} for name, att in families.items()}
    match = study.get("match_params")
    if match is None:
        return {name: ModelConfig(**model, attention=att) for name, att in families.items()}
    target = sweep.count_parameters(model, families[match["reference"]])
    return {name: ModelConfig(**model, attention=att,
                              mlp_hidden=sweep.matched_mlp_hidden(model, att, target))
            for name, att in families.items()}


def tokens_per_s(cfg: ModelConfig, T: int, batch: int, bf16: bool, device: str, steps: int) -> float:
    """Median tokens/s of `steps` training steps after two warm-up steps."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=device)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16 and device == "cuda"):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss became {loss.item()}")
    return batch * T / statistics.median(times)


def throughput_table(configs, lengths, device, steps, deadline=None) -> None:
    note = "" if device == "cuda" else " (bf16 autocast is CUDA only, as in train_run: on a CPU both are fp32)"
    print(f"\n### Training tokens/s per family (forward + backward + AdamW; median of {steps} steps "
          f"after 2 warm-up steps), bf16 autocast and fp32{note}\n")
    print("| family | T | batch | bf16 tokens/s | fp32 tokens/s | bf16 / fp32 |")
    print("|---|---|---|---|---|---|")
    for T, batch in lengths:
        for name, cfg in configs.items():
            if out_of_time(deadline):
                print(f"| {name} | {T} | {batch} | {SKIPPED} |")
                continue
            try:
                bf16, fp32 = (tokens_per_s(cfg, T, batch, amp, device, steps) for amp in (True, False))
            except Exception as e:  # noqa: BLE001  (one family failing must not stop the others)
                print(f"| {name} | {T} | {batch} | {failure(e)} |", flush=True)
                continue
            print(f"| {name} | {T} | {batch} | {bf16:,.0f} | {fp32:,.0f} | {bf16 / fp32:.2f} |",
                  flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()


def prepare_plays(out_dir: Path, smoke: bool) -> Path:
    """The plays through prepare (pipeline.prepare.prepare.prepare), with configs/gpu.yaml's MQAR layout and
    fewer examples (--smoke: a small layout), and one retrieval cell: what train_run reads."""
    from pipeline.core.params import DataConfig
    from pipeline.prepare.prepare import prepare

    study = yaml.safe_load((REPO / "configs" / "gpu.yaml").read_text())["data"]
    mqar = dict(study["mqar"], num_train=4096, num_eval=64)
    if smoke:
        mqar = dict(mqar, seq_len=64, num_pairs=4, train_gaps=[2, 40],
                    eval_gaps={"near": [2, 10], "far": [20, 40]}, num_train=64, num_eval=8)
    cfg = DataConfig(seed=study["seed"], validation_plays=study["validation_plays"],
                     heldout_plays=study["heldout_plays"], mqar=mqar,
                     retrieval={"tasks": ["passkey"], "context_lengths": [256],
                                "distances": [0.5], "episodes_per_cell": 1})
    prepare(cfg, out_dir, workers=1 if smoke else 4)
    return out_dir


def train_config(bf16: bool, smoke: bool):
    from pipeline.core.params import TrainConfig

    if smoke:
        return TrainConfig(steps=20, seq_len=64, batch_size=2, mqar_batch_size=2, lr=3e-3,
                           warmup_steps=2, log_every=5, eval_every=20, val_batches=1,
                           checkpoint_every=20, precision="bf16" if bf16 else "fp32")
    return TrainConfig(steps=200, seq_len=1024, batch_size=8, mqar_batch_size=16, lr=1e-3,
                       warmup_steps=20, log_every=20, eval_every=200, val_batches=2,
                       checkpoint_every=200, precision="bf16" if bf16 else "fp32")


def loss_curves(configs, device, smoke, work_dir: Path, deadline=None) -> dict:
    """{family: {"bf16": [(step, loss)], "fp32": [...]}} from train_run, or {family: why not}
    for a family the budget did not reach or whose run failed."""
    from pipeline.core.jobs import TrainJob
    from pipeline.train.loop import train_run

    data_dir = prepare_plays(work_dir / "data", smoke)
    curves = {}
    for name, cfg in configs.items():
        if out_of_time(deadline):
            curves[name] = SKIPPED
            continue
        curves[name] = {}
        for precision in ("bf16", "fp32"):
            run = f"{name}-{precision}"
            job = TrainJob(run=run, variant=name, seed=0, device=device, threads=1 if smoke else 4,
                           model=cfg, train=train_config(precision == "bf16", smoke),
                           fingerprint=f"gpu-check-{run}", data_dir=str(data_dir),
                           ckpt_dir=str(work_dir / "checkpoints" / run))
            try:
                history = train_run(job)["history"]
            except Exception as e:  # noqa: BLE001  (one family failing must not stop the others)
                curves[name] = f"{precision} {failure(e)}"
                break
            curves[name][precision] = [(r["step"], r["train/loss"]) for r in history
                                       if "train/loss" in r]
        if device == "cuda":
            torch.cuda.empty_cache()
    return curves


def curve_table(curves: dict, families: list[str], steps: int, device: str) -> None:
    """Rows: logged steps; one column per family, `bf16 / fp32`; last row: max |bf16 - fp32|
    over the last quarter of the run."""
    note = "" if device == "cuda" else " (on a CPU train_run has no bf16 autocast: both runs are fp32)"
    print(f"\n### Training loss, train_run, bf16 / fp32 per family, {steps} steps{note}\n")
    print("| step | " + " | ".join(families) + " |")
    print("|---|" + "---|" * len(families))
    ran = {name: c for name, c in curves.items() if not isinstance(c, str)}
    logged = sorted({s for c in ran.values() for s, _ in c["bf16"]})
    for step in logged:
        cells = [curves[name] if name not in ran else
                 "{:.3f} / {:.3f}".format(*(dict(ran[name][p])[step] for p in ("bf16", "fp32")))
                 for name in families]
        print(f"| {step} | " + " | ".join(cells) + " |")
    cells = []
    for name in families:
        if name not in ran:
            cells.append(curves[name])
            continue
        fp32 = dict(ran[name]["fp32"])
        cells.append(f"{max(abs(l - fp32[s]) for s, l in ran[name]['bf16'] if s > 0.75 * steps):.4f}")
    print("| max abs(bf16 - fp32), last quarter | " + " | ".join(cells) + " |", flush=True)


def run_tables(device: str, smoke: bool, deadline_speed=None, deadline_runs=None) -> None:
    configs = study_configs(smoke)
    lengths = [(32, 1), (64, 1)] if smoke else [(2048, 8), (8192, 2)]
    throughput_table(configs, lengths, device, steps=1 if smoke else 3, deadline=deadline_speed)
    work_dir = Path(tempfile.mkdtemp(prefix="kvf-gpu-train-"))
    try:
        curves = loss_curves(configs, device, smoke, work_dir, deadline_runs)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    curve_table(curves, list(configs), train_config(True, smoke).steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths on CPU")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for the tiny CPU check")
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only add overhead on a shared CPU
    run_tables(device, args.smoke)


if __name__ == "__main__":
    main()
