"""The evaluate stage: one Ray job per run (variant x seed); the driver logs to MLflow and
writes results/eval/<run>.json.

Per run (`evaluate_variant`, in a Ray worker, on its GPU when the cluster has one):
- held-out bits-per-byte at `eval.context_lengths` (longer than `train.seq_len` included);
- MQAR accuracy by number of pairs and by key-query gap relative to the study's window, from
  the parallel forward and again token by token through the decode cache;
- the lm-eval tasks of `pipeline/tasks` through `lm_eval.simple_evaluate` on the HF export;
- memory and speed (CPU): each (context length) measured in a fresh subprocess (`probe`), so the peak
  RSS belongs to that decode alone: prefill `L` tokens, decode `decode_new_tokens`, report
  cache.nbytes(), peak RSS, prefill and decode tokens/s. `generate_lengths` decodes that many
  tokens from a short prompt instead (the flat-memory check of bounded caches).
A run whose (checkpoint fingerprint, eval config, eval code) is unchanged keeps its result.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import SOURCE_ROOT, checkpoint

RESULTS_CODE = ("pipeline/evaluate.py", "pipeline/export.py", "pipeline/tasks/utils.py",
                "pipeline/hf/modeling_kvf.py")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


# --------------------------------------------------------------------------- quality
def _device(model) -> torch.device:
    return model.embed.weight.device


@torch.no_grad()
def heldout_bpb(model, text: np.ndarray, context_len: int, n_windows: int) -> float:
    """Mean cross-entropy in bits per byte over `n_windows` evenly spaced held-out windows."""
    from pipeline import tokenizer

    starts = np.linspace(0, len(text) - context_len - 1, n_windows).astype(np.int64)
    nats = 0.0
    for s in starts:
        ids = torch.from_numpy(tokenizer.bytes_to_ids(np.asarray(text[s : s + context_len + 1])))[None]
        ids = ids.to(_device(model))
        logits = model(ids[:, :-1])
        nats += torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:]).item()
    return nats / n_windows / math.log(2)


@torch.no_grad()
def decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` computed one token at a time through the variant's own cache: what a
    deployed model computes (for chunk_mean this differs from its parallel training forward)."""
    cache = model.init_cache(ids.shape[0])
    return torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)


def _split(hit: np.ndarray, gap: np.ndarray, window: int | None) -> dict:
    out = {"acc": float(hit.mean()), "n": int(hit.size)}
    if window is not None:
        inside = gap <= window
        out["acc_inside_window"] = float(hit[inside].mean()) if inside.any() else None
        out["acc_beyond_window"] = float(hit[~inside].mean()) if (~inside).any() else None
    return out


@torch.no_grad()
def mqar_accuracy(model, mqar_cfg, num_pairs: int, gaps: tuple[int, int], n: int, seed: int,
                  window: int | None, decode: bool = True) -> dict:
    """Accuracy on `n` fresh MQAR sequences; per query also split by gap <= window / beyond.
    With `decode`, the same queries are also scored through the decode cache ("decode": {...})."""
    from pipeline.data import make_mqar

    cfg = mqar_cfg.model_copy(update={"num_pairs": num_pairs})
    data = make_mqar(cfg, n, tuple(gaps), seed)
    tokens = torch.from_numpy(data["tokens"].astype(np.int64)).to(_device(model))
    mask = torch.from_numpy(data["answer_mask"][:, 1:]).to(tokens.device)
    gap = data["gaps"].reshape(-1)
    hits = lambda logits: (logits.argmax(-1) == tokens[:, 1:])[mask].cpu().numpy()  # noqa: E731 -- row order
    out = _split(hits(model(tokens[:, :-1])), gap, window)
    if decode:
        out["decode"] = _split(hits(decode_logits(model, tokens[:, :-1])), gap, window)
    return out


def run_lm_eval(export_dir: Path, tasks: list[str], limit: int | None, metadata: dict,
                device: str = "cpu") -> dict:
    """lm_eval.simple_evaluate on the export; returns {task: metrics} and per-length rows."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={export_dir},trust_remote_code=True,device={device}",
        tasks=tasks, limit=limit, task_manager=manager, log_samples=True, metadata=metadata,
        batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    scores, rows = {}, []
    for task in tasks:
        res = out["results"].get(task, {})
        scores[task] = {k.split(",")[0]: float(v) for k, v in res.items()
                        if isinstance(v, (int, float)) and "stderr" not in k
                        and not k.startswith(("alias", "sample_len"))}
        by_len: dict[int, list[float]] = {}
        metric = next(iter(scores[task]), None)
        for sample in out.get("samples", {}).get(task, []):
            if metric is not None and metric in sample:
                by_len.setdefault(int(sample["doc"]["context_len"]), []).append(float(sample[metric]))
        for length, values in sorted(by_len.items()):
            rows.append({"task": task, "metric": metric, "context_len": length,
                         "score": float(np.mean(values)), "n": len(values)})
    return {"scores": scores, "by_length": rows}


# --------------------------------------------------------------------------- memory and speed
def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe(ckpt_dir: str, context_len: int, new_tokens: int, mode: str, threads: int = 1) -> dict:
    """Run in a fresh process. mode "prefill": prefill `context_len` tokens (chunks of 1024)
    then decode `new_tokens`; mode "generate": decode `context_len` tokens from an 8-token prompt."""
    from pipeline.export import load_checkpoint_model

    torch.set_num_threads(threads)
    model, _ = load_checkpoint_model(Path(ckpt_dir))
    rng = torch.Generator().manual_seed(0)
    base_rss = peak = _rss_bytes()  # after imports and weights: what decoding adds is measured
    cache = model.init_cache(1)
    with torch.no_grad():
        prompt_len = context_len if mode == "prefill" else 8
        prompt = torch.randint(3, 259, (1, prompt_len), generator=rng)
        t0 = time.perf_counter()
        for i in range(0, prompt_len, 1024):
            logits = model(prompt[:, i : i + 1024], cache=cache)
            peak = max(peak, _rss_bytes())
        t1 = time.perf_counter()
        steps = new_tokens if mode == "prefill" else context_len
        nxt = logits[:, -1:].argmax(-1)
        for step in range(steps):
            nxt = model(nxt, cache=cache)[:, -1:].argmax(-1)
            if step % 64 == 0:
                peak = max(peak, _rss_bytes())
        t2 = time.perf_counter()
    return {"mode": mode, "context_len": context_len, "tokens_held": cache.seq_len,
            "cache_bytes": cache.nbytes(), "cache_bytes_analytic": model.cache_nbytes(cache.seq_len),
            "peak_rss_bytes": max(peak, _rss_bytes()),  # sampled while decoding
            "rss_before_bytes": base_rss,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "prefill_tokens_per_s": prompt_len / max(t1 - t0, 1e-9),
            "decode_tokens_per_s": steps / max(t2 - t1, 1e-9)}


def probe_subprocess(ckpt_dir: Path, context_len: int, new_tokens: int, mode: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "pipeline.evaluate", "probe", str(ckpt_dir), str(context_len),
           str(new_tokens), mode, str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- one variant
def evaluate_variant(job: dict) -> dict:
    """Everything measured for one variant (runs in a Ray worker)."""
    from pipeline.data import TrainingData  # noqa: F401 -- fail early if data/ is missing
    from pipeline.export import load_checkpoint_model
    from pipeline.params import EvalConfig, MQARConfig

    torch.set_num_threads(job["threads"])
    os.environ.setdefault("HF_HOME", job["hf_home"])
    device = job.get("device", "cpu")
    cfg = EvalConfig.model_validate(job["eval"])
    mqar_cfg = MQARConfig.model_validate(job["mqar"])
    model, meta = load_checkpoint_model(Path(job["ckpt_dir"]))
    model.to(device)
    text = np.memmap(Path(job["data_dir"]) / "text" / "heldout.bin", dtype=np.uint8, mode="r")
    t0 = time.perf_counter()
    result = {"run": job["run"], "variant": job["variant"], "seed": job["seed"], "device": device,
              "kind": meta["model_config"]["attention"]["kind"],
              "window": meta["model_config"]["attention"].get("window"),
              "params": model.num_parameters(),
              "cache_bytes_per_token_analytic": model.cache_nbytes(job["report_context"]) / job["report_context"],
              "bpb": {}, "mqar": {}, "lm_eval": {}, "decode": []}
    for length in cfg.context_lengths:
        result["bpb"][str(length)] = heldout_bpb(model, text, length, max(1, cfg.bpb_tokens // length))
    for pairs in cfg.mqar_pairs:
        for bucket, gaps in mqar_cfg.eval_gaps.items():
            result["mqar"][f"p{pairs}_{bucket}"] = {
                "num_pairs": pairs, "bucket": bucket, "gaps": list(gaps),
                **mqar_accuracy(model, mqar_cfg, pairs, gaps, cfg.mqar_examples, cfg.seed, job["ref_window"])}
    result["time_quality_s"] = time.perf_counter() - t0
    if cfg.lm_eval_tasks:
        t0 = time.perf_counter()
        result["lm_eval"] = run_lm_eval(Path(job["export_dir"]), cfg.lm_eval_tasks, cfg.limit,
                                        job["task_metadata"], device)
        result["time_lm_eval_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for length in cfg.decode_lengths:
        result["decode"].append(probe_subprocess(Path(job["ckpt_dir"]), length, cfg.decode_new_tokens,
                                                 "prefill", job["threads"]))
    if result["kind"] in cfg.generate_kinds:
        for length in cfg.generate_lengths:
            result["decode"].append(probe_subprocess(Path(job["ckpt_dir"]), length, 0, "generate",
                                                     job["threads"]))
    result["time_decode_s"] = time.perf_counter() - t0
    return result


def _eval_task(job: dict) -> dict:
    import traceback

    try:
        return {"status": "ok", **evaluate_variant(job)}
    except Exception as err:  # noqa: BLE001 -- report by name, keep the other variants
        return {"status": "failed", "variant": job["run"], "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()}


# --------------------------------------------------------------------------- MLflow rows
def flat_metrics(r: dict) -> dict[str, float]:
    """Stable metric names shared by every variant (eval/...)."""
    out = {"eval/cache_bytes_per_token": r["cache_bytes_per_token_analytic"]}
    for length, v in r["bpb"].items():
        out[f"eval/bpb_{length}"] = v
    for name, v in r["mqar"].items():
        for key in ("acc", "acc_inside_window", "acc_beyond_window"):
            if v.get(key) is not None:
                out[f"eval/mqar_{key}_{name}"] = v[key]
            if v.get("decode", {}).get(key) is not None:
                out[f"eval/mqar_decode_{key}_{name}"] = v["decode"][key]
    for task, scores in r.get("lm_eval", {}).get("scores", {}).items():
        for metric, v in scores.items():
            out[f"eval/{task}/{metric}"] = v
    for d in r["decode"]:
        tag = f"{d['mode']}_{d['context_len']}"
        out[f"mem/cache_bytes_{tag}"] = d["cache_bytes"]
        out[f"mem/peak_rss_{tag}"] = d["peak_rss_bytes"]
        out[f"speed/decode_tokens_per_s_{tag}"] = d["decode_tokens_per_s"]
        if d["mode"] == "prefill":
            out[f"speed/prefill_tokens_per_s_{tag}"] = d["prefill_tokens_per_s"]
    return out


def _code_hash() -> str:
    h = hashlib.sha256()
    for rel in RESULTS_CODE:
        h.update(rel.encode() + (SOURCE_ROOT / rel).read_bytes())
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def run_evaluate(params, root: Path, data_dir: Path, ckpt_root: Path, export_root: Path,
                 results_dir: Path, metrics_path: Path) -> int:
    from pipeline import tracking
    from pipeline.runner import as_completed, connect_ray, resolve_gpus

    cfg = params.eval
    code = _code_hash()
    windows = [a.get("window") for a in params.variants.values() if a.get("window")]
    n_layers = params.model_config_for(next(iter(params.variants))).n_layers
    # W-token windows stacked n_layers deep see at most n_layers * (W - 1) positions back
    ref_window = n_layers * (min(windows) - 1) if windows else None
    # the lm-eval tasks draw their haystacks from the same held-out plays as the pipeline
    retrieval = params.data.retrieval
    task_metadata = {"seed": cfg.seed, "context_lengths": cfg.task_context_lengths,
                     "heldout_plays": params.data.heldout_plays, "distances": retrieval.distances,
                     "num_distractors": retrieval.num_distractors}
    train_runs = checkpoint.read_json(Path("metrics/train.json"))["variants"] \
        if Path("metrics/train.json").exists() else {}
    results_dir.mkdir(parents=True, exist_ok=True)
    jobs, results = {}, {}
    for run in params.runs():
        name = run.key
        final = checkpoint.load_final_meta(ckpt_root / name)
        if final is None:
            raise FileNotFoundError(f"{ckpt_root / name}: no completed checkpoint; run the train stage")
        key = hashlib.sha256(json.dumps({"ckpt": final["fingerprint"], "eval": cfg.model_dump(mode="json"),
                                         "mqar": params.data.mqar.model_dump(mode="json"),
                                         "tasks": task_metadata, "ref_window": ref_window, "code": code},
                                        sort_keys=True).encode()).hexdigest()[:16]
        cached = results_dir / f"{name}.json"
        if cached.exists() and checkpoint.read_json(cached).get("eval_fingerprint") == key:
            results[name] = checkpoint.read_json(cached)
            print(f"[evaluate] {name}: unchanged (checkpoint, eval config), kept", flush=True)
            continue
        jobs[name] = {"run": name, "variant": run.variant, "seed": run.seed, "eval_fingerprint": key,
                      "eval": cfg.model_dump(mode="json"), "mqar": params.data.mqar.model_dump(mode="json"), "ref_window": ref_window,
                      "task_metadata": task_metadata,
                      "report_context": cfg.report_context, "threads": params.compute.cpus_per_job,
                      "ckpt_dir": str((ckpt_root / name).resolve()),
                      "export_dir": str((export_root / name).resolve()),
                      "data_dir": str(data_dir.resolve()),
                      "hf_home": os.environ.get("HF_HOME", str(root / "runs" / "hf_home"))}
    failures = []
    if jobs:
        import ray

        where = connect_ray(params, root)
        try:
            # quality and lm-eval run on the job's GPU when it has one; the memory probes always
            # run on CPU in their own process (they measure process RSS)
            gpus = resolve_gpus(params, ray.cluster_resources(), where)
            task = ray.remote(_eval_task)
            refs = {task.options(num_cpus=params.compute.cpus_per_job, num_gpus=gpus, max_retries=0,
                                 name=f"evaluate:{n}").remote({**j, "device": "cuda" if gpus else "cpu"}): n
                    for n, j in jobs.items()}
            print(f"[evaluate] {len(jobs)} run(s) on Ray ({where}), {gpus} GPU(s) per job", flush=True)
            for name, r in as_completed(refs):
                if r["status"] != "ok":
                    failures.append(name)
                    print(f"[evaluate] FAILED {name}: {r['error']}\n{r.get('traceback', '')}",
                          file=sys.stderr, flush=True)
                    continue
                r["eval_fingerprint"] = jobs[name]["eval_fingerprint"]
                checkpoint.write_json(results_dir / f"{name}.json", r)
                results[name] = r
                print(f"[evaluate] {name}: done in {r['time_quality_s'] + r.get('time_lm_eval_s', 0) + r['time_decode_s']:.1f}s",
                      flush=True)
        finally:
            ray.shutdown()

    # the driver alone writes to MLflow
    tracker = tracking.Tracker(tracking.tracking_uri(params.tracking.uri, root), params.tracking.experiment)
    from mlflow.entities import Metric

    for name, r in results.items():
        run_id = train_runs.get(name, {}).get("run_id")
        r["run_id"] = run_id
        if run_id is None:
            continue
        now = int(time.time() * 1000)
        tracker.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0)
                                                  for k, v in sorted(flat_metrics(r).items())])
        rows = r.get("lm_eval", {}).get("by_length", [])
        if rows:
            tracker.client.log_table(run_id, {k: [row[k] for row in rows] for k in rows[0]},
                                     "eval/lm_eval_by_length.json")
        tracker.client.log_dict(run_id, r, "eval/results.json")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(metrics_path, {"reference_window": ref_window, "report_context": cfg.report_context,
                                         "variants": {n: {"run_id": r.get("run_id"), **flat_metrics(r)}
                                                      for n, r in results.items()}})
    return 1 if failures else 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "probe":
    ckpt, length, new, mode, threads = sys.argv[2:7]
    print(json.dumps(probe(ckpt, int(length), int(new), mode, int(threads))))
