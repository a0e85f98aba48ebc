"""Orchestration: typed params, data, Ray-distributed training, MLflow tracking, DVC glue."""
from pathlib import Path as _Path

# Where this code lives (the folder holding models/, kernels/ and pipeline/): what an export
# bundles and what result fingerprints hash. Not the project a stage runs in (tracking.repo_root).
SOURCE_ROOT = _Path(__file__).resolve().parent.parent
