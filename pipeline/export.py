"""Export: a trained variant's checkpoint -> a Hugging Face-format directory, logged to MLflow.

    exports/<run>/               one per selected run: the best rate of each point and seed
                                 (`pipeline.selection`; `<point>[.lr<lr>][.seed<k>]`)
        config.json              KVFConfig, `auto_map` to the files below, standard HF names
        configuration_kvf.py  modeling_kvf.py  kvf_bundle.py   the code (models/ + kernels/ bundled)
        model.safetensors  generation_config.json
        tokenizer_config.json  tokenization_kvf.py   KVFTokenizer: ByT5's byte layout (vocab 259, the
                                 pipeline's), encoding a text as its bytes alone (no `</s>` appended);
                                 with another `data.tokenizer`, its own files (tokenizer.json, ...) instead
        README.md  kvf_export.json   the model card (kind, parameters, cache bytes)

The directory needs only torch + transformers: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`. Each export is logged to its variant's MLflow run and registered in
the model registry as a pyfunc over the directory (`kvf-<run>`), once per (checkpoint, code).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pipeline import SOURCE_ROOT, checkpoint
from pipeline.fingerprint import digest
from pipeline.params import REPORT_CONTEXT

BUNDLED_PACKAGES = ("models", "kernels")
EXPORT_META = "kvf_export.json"


class CorruptExport(RuntimeError):
    """An export file that is missing or not the bytes the export stage wrote (the message names it)."""


def export_digests(out_dir: Path) -> dict[str, str]:
    """sha256 of every file of an export but its card (which records them)."""
    return {p.relative_to(out_dir).as_posix(): checkpoint.file_sha256(p)
            for p in sorted(Path(out_dir).rglob("*")) if p.is_file() and p.name != EXPORT_META}


def verify_export(out_dir: Path) -> dict:
    """The export's card, after checking every file against the digests it recorded."""
    out_dir = Path(out_dir)
    card_path = out_dir / EXPORT_META
    if not card_path.exists():
        raise CorruptExport(f"{card_path}: missing")
    card = checkpoint.read_json(card_path)
    for rel, sha in card.get("files", {}).items():
        path = out_dir / rel
        if not path.is_file():
            raise CorruptExport(f"{path}: missing")
        if checkpoint.file_sha256(path) != sha:
            raise CorruptExport(f"{path}: not the bytes the export stage wrote (sha256 differs)")
    return card


def bundle_sources(repo: Path = SOURCE_ROOT) -> dict[str, str]:
    """The source an export carries: every .py of models/ and kernels/ except models/__init__.py
    (it imports pydantic-typed configs the export does not need)."""
    sources = {}
    for package in BUNDLED_PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            rel = path.relative_to(repo).as_posix()
            if rel != "models/__init__.py":
                sources[rel] = path.read_text()
    return sources


def _write_bundle(out_dir: Path, sources: dict[str, str]) -> None:
    """kvf_bundle.py with SOURCES filled in (the repo's copy has it empty)."""
    if "models/lm.py" not in sources:
        raise RuntimeError("the export bundle has no models/lm.py: the models package was not found")
    path = out_dir / "kvf_bundle.py"
    text = path.read_text()
    marker = "SOURCES: dict[str, str] = {}"
    assert marker in text, "the template kvf_bundle.py (hf/, beside this module) lost its SOURCES marker"
    path.write_text(text.replace(marker, f"SOURCES: dict[str, str] = {sources!r}", 1))


def made_with() -> dict[str, str]:
    """The versions an export records (its card and config.json's `kvf_versions`)."""
    import transformers

    return {"torch": str(torch.__version__), "transformers": str(transformers.__version__)}  # plain str: MLflow writes YAML


def model_card(variant: str, model, meta: dict) -> dict:
    kind = meta["model_config"]["attention"]["kind"]
    per_token = model.cache_nbytes(REPORT_CONTEXT) / REPORT_CONTEXT
    return {
        "variant": variant,
        "kind": kind,
        "attention": meta["model_config"]["attention"],
        "parameters": model.num_parameters(),
        "cache_bytes_per_token_at_32k": per_token,
        "state_bytes_32k": model.cache_nbytes(REPORT_CONTEXT),
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "seed": meta.get("seed"),
        "train_steps": meta.get("step"),
        # the train stage's validation numbers (the evaluate stage's are in results/eval/)
        "validation": {k.removeprefix("val/"): round(float(v), 4)
                       for k, v in sorted(meta.get("metrics", {}).items()) if k.startswith("val/")},
        "fingerprint": meta.get("fingerprint"),
        "made_with": made_with(),
    }


def describe(attention: dict) -> str:
    """`tensor_cache (window 16, write chunk_mean, ...)`: the kind and the fields that set it apart."""
    fields = ", ".join(f"{k} {v}" for k, v in attention.items() if k != "kind" and v is not None)
    return f"{attention['kind']} ({fields})" if fields else attention["kind"]


def _card_markdown(card: dict) -> str:
    return "\n".join([
        f"# kv-frontier `{card['variant']}` ({card['kind']})",
        "",
        f"A decoder LM from kv-frontier ({card.get('tokenizer', 'bytes')} tokens), exported with its own decode cache.",
        "",
        "| field | value |", "|---|---|",
        *[f"| {k} | `{json.dumps(v) if isinstance(v, dict) else v}` |" for k, v in card.items()],
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # the study's tokenizer",
        "```",
        "",
        "`generate()` keeps the variant's own cache (batch size 1 for generation: no left padding).",
        "",
    ])


def export_variant(variant: str, ckpt_dir: Path, out_dir: Path, repo: Path = SOURCE_ROOT,
                   tokenizer_dir: Path | None = None) -> dict:
    """Write the HF directory of one variant; returns its model card. `tokenizer_dir`: the
    study's tokenizer (`data/tokenizer/`, saved by prepare), bundled as it is; None: bytes (KVFTokenizer)."""
    from transformers import GenerationConfig

    from pipeline.hf.configuration_kvf import KVFConfig
    from pipeline.hf.modeling_kvf import KVFForCausalLM
    from pipeline.hf.tokenization_kvf import KVFTokenizer
    from pipeline.tokenizer import load_local, n_ids

    model, meta = checkpoint.load_model(ckpt_dir)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    KVFConfig.register_for_auto_class("AutoConfig")
    KVFForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    KVFTokenizer.register_for_auto_class("AutoTokenizer")
    tok = KVFTokenizer(extra_ids=0) if tokenizer_dir is None else load_local(tokenizer_dir)
    specials = {"eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    config = KVFConfig(kvf=meta["model_config"], kvf_versions=made_with(), torch_dtype="float32", **specials)
    hf_model = KVFForCausalLM(config)
    hf_model.model.load_state_dict(model.state_dict())
    hf_model.generation_config = GenerationConfig(do_sample=False, **specials)
    hf_model.save_pretrained(out_dir)
    sources = bundle_sources(repo)
    _write_bundle(out_dir, sources)
    tok.save_pretrained(out_dir)
    card = model_card(variant, model, meta)
    card["tokenizer"] = "bytes" if tokenizer_dir is None else f"{type(tok).__name__}, {n_ids(tok)} ids"
    card["code_sha256"] = digest(sources)
    (out_dir / "README.md").write_text(_card_markdown(card))
    card["files"] = export_digests(out_dir)  # checked by the evaluate stage before it reads any
    checkpoint.write_json(out_dir / EXPORT_META, card)
    return card


# --------------------------------------------------------------------------- MLflow
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


def log_export(tracking_uri: str, run_id: str, variant: str, out_dir: Path, card: dict) -> tuple[str, bool]:
    """Log the directory to the variant's run and register it; returns ('name/version', new?).
    An export whose checkpoint and bundled code are already registered from this run is not
    registered again (re-running the stage adds no versions)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    name = f"kvf-{variant}"
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
    `pipeline.selection`); log and register each in MLflow. 0 on success."""
    from pipeline import tracking
    from pipeline.selection import select
    from pipeline.tokenizer import prepared_dir
    from pipeline.train_stage import mlflow_run_ids

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
        registered, new = log_export(uri, run_id, run.name, out_dir.resolve(), card) if run_id else (None, False)
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
