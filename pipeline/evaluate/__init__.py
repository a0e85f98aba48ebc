"""The evaluate stage: one Ray job per run (`driver`); in the worker (`worker`), quality
(`quality`), the lm-eval tasks (`harness`, `tasks/`), memory and speed (`probe`); cache policies
on a trained checkpoint (`policy`)."""
