"""Orchestration: typed params, data, Ray-distributed training, MLflow tracking, DVC glue."""
