"""Export: a trained variant's checkpoint -> a Hugging Face-format directory, logged to MLflow.

    exports/<run>/               one per selected run: the best rate of each point and seed
                                 (`pipeline.core.selection`; `<point>[.lr<lr>][.seed<k>]`)
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

from pipeline import SOURCE_ROOT
from pipeline.core import checkpoint
from pipeline.core.exports import EXPORT_META, export_digests
from pipeline.core.fingerprint import digest
from pipeline.core.params import REPORT_CONTEXT

BUNDLED_PACKAGES = ("models", "kernels")


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

    # plain str: MLflow writes YAML
    return {"torch": str(torch.__version__), "transformers": str(transformers.__version__)}


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
    study's tokenizer (`data/tokenizer/`, saved by prepare), bundled as it is; None: bytes (KVFTokenizer).
    No space left on the way: checkpoint.DiskFull naming the directory, the part written removed
    (its card, written last, never was: nothing would have trusted it)."""
    try:
        return _export_variant(variant, ckpt_dir, out_dir, repo, tokenizer_dir)
    except Exception as err:  # OSError, or safetensors' own error for ENOSPC (save_pretrained)
        needs = (Path(ckpt_dir) / checkpoint.FINAL_WEIGHTS).stat().st_size + (1 << 20)  # + code, tokenizer, card
        shutil.rmtree(out_dir, ignore_errors=True)
        checkpoint.raise_if_full(err, Path(out_dir), needs, then="make repro exports it again")
        raise


def _export_variant(variant: str, ckpt_dir: Path, out_dir: Path, repo: Path, tokenizer_dir: Path | None) -> dict:
    from transformers import GenerationConfig

    from pipeline.core.tokenizer import load_local, n_ids
    from pipeline.export.hf.configuration_kvf import KVFConfig
    from pipeline.export.hf.modeling_kvf import KVFForCausalLM
    from pipeline.export.hf.tokenization_kvf import KVFTokenizer

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
    # the weights: the checkpoint's own file, byte for byte (transformers reads its names under the
    # model's `model.` prefix), so DVC's cache holds them once for both, and MLflow the export's copy
    for written in out_dir.glob("model*.safetensors*"):
        written.unlink()
    shutil.copyfile(Path(ckpt_dir) / checkpoint.FINAL_WEIGHTS, out_dir / "model.safetensors")
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


