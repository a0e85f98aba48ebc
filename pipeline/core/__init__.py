"""What every stage shares: params, jobs, Ray, storage, MLflow, fingerprints, checkpoints,
tokenizers, the prepared data, a run's identity, what a result means."""
