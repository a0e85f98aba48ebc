"""The train stage: one Ray job per run (`driver`), the training loop (`loop`), data-parallel
runs with Ray Train (`ddp`)."""
