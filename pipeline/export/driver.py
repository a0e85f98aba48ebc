"""The export stage's driver: export every selected run (`export_variant`), log it to its MLflow run
and register it in the model registry as a pyfunc over the directory (`<experiment>.<run>`), once per
(checkpoint, code)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline.core import checkpoint, tracking
from pipeline.export.bundle import describe, export_variant


def _pyfunc_model():
    """A pyfunc over an export directory: prompts -> greedy continuations (mlflow imported lazily,
    so loading a checkpoint does not pay for it)."""
    import mlflow.pyfunc

    class ExportedLM(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = context.artifacts["export_dir"]
            self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)

        def predict(self, context, model_input, params=None):
            prompts = model_input if isinstance(model_input, list) else list(model_input.iloc[:, 0])
            max_new = int((params or {}).get("max_new_tokens", 16))
            out = []
            for prompt in prompts:
                ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False).input_ids])
                gen = self.model.generate(ids, max_new_tokens=max_new, do_sample=False)
                out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
            return out

    return ExportedLM()


def _registered_version(client, name: str, run_id: str, card: dict):
    """The version of `name` already registered from this run with the same weights and code."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    for version in versions:
        tags = version.tags or {}
        if (tags.get("fingerprint") == str(card["fingerprint"])
                and tags.get("code_sha256") == str(card["code_sha256"])):
            return version.version
    return None


def _logged_model_name(name: str) -> str:
    """MLflow's logged-model names may not hold / : . % " ' (run names do: `swa.window16`)."""
    return "".join("-" if c in "/:.%\"'" else c for c in name)


def log_export(tracking_uri: str, experiment: str, run_id: str, variant: str, out_dir: Path,
               card: dict) -> tuple[str, bool]:
    """Log the directory to the variant's run and register it; returns ('name/version', new?).
    An export whose checkpoint and bundled code are already registered from this run is not
    registered again (re-running the stage adds no versions)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    name = tracking.registered_name(experiment, variant)
    existing = _registered_version(client, name, run_id, card)
    if existing is not None:
        return f"{name}/{existing}", False
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=_logged_model_name(name), python_model=_pyfunc_model(), artifacts={"export_dir": str(out_dir)},
            pip_requirements=["torch", "transformers", "safetensors"],  # no slow inference
            registered_model_name=name,
            metadata={k: v for k, v in card.items() if k != "attention"},
        )
        mlflow.log_dict(card, "export/model_card.json")
        mlflow.set_tags({"export.dir": str(out_dir), "export.registered_model": name})
    version = info.registered_model_version
    description = (f"{describe(card['attention'])}: {card['parameters']:,} parameters, "
                   f"{card['cache_bytes_per_token_at_32k']:.1f} cache bytes/token, "
                   f"{card['state_bytes_32k']:,} state bytes at 32k")
    client.update_registered_model(name, description=f"kv-frontier run {variant} ({describe(card['attention'])})")
    client.update_model_version(name, version, description=description)
    for key in ("kind", "parameters", "cache_bytes_per_token_at_32k", "state_bytes_32k",
                "fingerprint", "code_sha256", "seed"):
        client.set_model_version_tag(name, version, key, str(card.get(key)))
    return f"{name}/{version}", True


def run_export(params, root: Path, data_dir: Path, ckpt_root: Path, export_root: Path,
               metrics_path: Path) -> int:
    """Export every selected run (the best learning rate of each point and seed,
    `pipeline.core.selection`); log and register each in MLflow. 0 on success."""
    from pipeline.core.runs import mlflow_run_ids
    from pipeline.core.selection import select
    from pipeline.core.tokenizer import prepared_dir

    uri = tracking.tracking_uri(params.tracking.uri, root)
    results, failed = {}, []
    selected = [s.run for s in select(params, ckpt_root).values()]
    run_ids = mlflow_run_ids(params, root, data_dir, ckpt_root, [run.name for run in selected])
    for stale in (export_root.iterdir() if export_root.is_dir() else []):
        if stale.name not in {run.name for run in selected}:  # a rate that lost, or a removed run
            shutil.rmtree(stale)
    tokenizer_dir = prepared_dir(data_dir)  # None: bytes
    for run in selected:
        out_dir = export_root / run.name
        card = export_variant(run.name, ckpt_root / run.name, out_dir, tokenizer_dir=tokenizer_dir)
        run_id = run_ids.get(run.name)
        registered, new = (log_export(uri, params.tracking.experiment, run_id, run.name, out_dir.resolve(), card)
                           if run_id else (None, False))
        if run_id is None:
            failed.append(run.name)
        results[run.name] = {**{k: v for k, v in card.items() if k not in ("attention", "files")},
                            "variant": run.variant, "run_id": run_id, "registered_model": registered}
        note = (f"registered {registered}" if new else f"already registered as {registered}") \
            if registered else "no MLflow run: not logged"
        print(f"[export] {run.name}: {card['parameters']:,} params, "
              f"{card['state_bytes_32k']:,} state bytes at 32k -> {out_dir} ({note})", flush=True)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(metrics_path, {"mlflow": {"tracking_uri": uri}, "variants": results})
    return 1 if failed else 0

