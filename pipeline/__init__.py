"""The stages' code, one package per stage, and what they share:

    core/      shared by every stage: typed params, jobs, Ray fan-out, storage, MLflow tracking,
               fingerprints, checkpoints, tokenizers, the prepared data, run identity, results
    prepare/   the corpus and tokenizer -> data/
    train/     one Ray job per run -> checkpoints/ (Ray Train when data-parallel)
    export/    checkpoints -> Hugging Face folders in exports/, registered in MLflow
    evaluate/  checkpoints and exports -> results/eval/ (quality, lm-eval, memory and speed)
    report/    results/eval/ -> report/ (the frontier, intervals, claims)

A stage imports `core` and its own package only; what crosses stages is a file on disk
(`data/manifest.json`, `checkpoints/<run>/model.json`, `exports/<run>/kvf_export.json`,
`results/eval/<key>.json`) or the MLflow store, read through `core`.
"""
from pathlib import Path as _Path

# Where this code lives (the folder holding models/, kernels/ and pipeline/): what an export
# bundles and what result fingerprints hash. Not the project a stage runs in (tracking.repo_root).
SOURCE_ROOT = _Path(__file__).resolve().parent.parent
