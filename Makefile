# Two entry points, each self-sufficient on a fresh machine:
#   make repro   the main job (dvc repro on params.yaml)
#   make test    the test suite on CPU (Triton kernels under its interpreter)
# Both install exactly uv.lock first (make venv; see install/venv.py and docs/install.md).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# The interpreter the venv is made from (CPython 3.11-3.13), and the torch build: auto picks the
# lock's CUDA build with an NVIDIA GPU; on Linux without one the CPU build where one can be had,
# else the lock's build (it runs on a CPU); on macOS the lock's CPU/MPS build. TORCH=cpu|cuda
# overrides auto (install/venv.py, docs/install.md).
PYTHON ?= python3
TORCH  ?= auto
# uv, the lock's resolver and installer, pinned and kept in .uv/ with its cache.
UV_VERSION := 0.13.9
UV    := .uv/tool/bin/uv
UV_STAMP := .uv/tool/uv-$(UV_VERSION)

# Keep tool state inside the repo, not in $HOME or /tmp defaults.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRITON_CACHE_DIR := $(CURDIR)/runs/triton_cache
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export UV_CACHE_DIR ?= $(CURDIR)/.uv/cache
export PIP_CACHE_DIR ?= $(CURDIR)/.uv/pip-cache
export UV_PYTHON_DOWNLOADS := never
# $(PYTHON) is looked up on the PATH you came with, not in the venv that PATH puts first.
HOST_PATH := $(PATH)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv test lint repro bench lock lock-targets mlflow-server ui

venv: $(VENV)/.installed

$(UV_STAMP):
	rm -rf .uv/tool && PATH="$(HOST_PATH)" $(PYTHON) -m venv .uv/tool
	.uv/tool/bin/pip install -q uv==$(UV_VERSION)
	touch $@

# Exactly the locked set (uv sync --locked: the lock must match pyproject.toml, nothing is
# resolved, hashes are checked), then this project (editable); the torch build per machine,
# printed with the reason (install/venv.py).
# .uv/venv-args holds the interpreter (as it resolves now) and TORCH: rewritten only when they
# change, so another interpreter or torch build reinstalls, and nothing else does.
VENV_ARGS := --python $(PYTHON) --torch $(TORCH)
VENV_KEY := $(VENV_ARGS) $(shell PATH="$(HOST_PATH)" $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null)
$(shell mkdir -p .uv && [ "$$(cat .uv/venv-args 2>/dev/null)" = "$(VENV_KEY)" ] || echo "$(VENV_KEY)" > .uv/venv-args)
$(VENV)/.installed: uv.lock pyproject.toml install/venv.py .uv/venv-args $(UV_STAMP)
	PATH="$(HOST_PATH)" .uv/tool/bin/python install/venv.py --uv $(UV) --venv $(VENV) $(VENV_ARGS)

# The suite on TEST_WORKERS pytest-xdist workers (0: in this one process); a module whose tests
# share a study or a cluster is one xdist_group, run by one worker. Three on two cores: the stage
# tests wait on subprocesses and Ray more than they compute (BENCHMARKS.md, issue 23).
TEST_WORKERS ?= 3
test: venv lint
	$(UV) lock --check --offline
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadgroup tests

# The stated style (pyproject.toml's [tool.ruff], docs/contributing.md#style): seconds.
lint: venv
	$(VENV)/bin/ruff check .

repro: venv
	$(PY) -m tools.dvc_setup
	cd $(CURDIR) && dvc repro
	$(PY) -m tools.mlflow_sync

# A shared MLflow tracking server on this machine (loopback only, one worker, sqlite, artifacts in
# runs/mlflow-server): point a study at it with `tracking.uri: http://127.0.0.1:5000`; its train
# workers then log their curves live. Ctrl-C stops it (tools/mlflow_server.py).
MLFLOW_PORT ?= 5000
mlflow-server: venv
	$(PY) -m tools.mlflow_server --port $(MLFLOW_PORT)

# The MLflow UI on this study's store (loopback only), with the links that open the evaluated runs
# in Model training mode and the frontier view (tools/mlflow_ui.py). Ctrl-C stops it.
UI_PORT ?= 5001
ui: venv
	$(PY) -m tools.mlflow_ui --port $(UI_PORT)

bench: venv
	$(PY) benchmarks/l2_scan.py
	$(PY) benchmarks/cache_size.py

# Re-resolve uv.lock (every target platform and Python at once):
#   make lock                     after editing pyproject.toml: re-resolve, keeping every locked
#                                 version that still fits
#   make lock UPGRADE=transformers   move only that package (and what it requires) to its newest
#                                 allowed version;  UPGRADE=all: everything
# then `make test`, and commit the lock with the change that needed it.
lock: $(UV_STAMP)
	$(UV) lock $(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p)))

# Check, from this machine, that uv.lock has a wheel of every pin for each target (Linux x86_64
# and aarch64, macOS arm64; CPython 3.11-3.13). Needs the package index (install/targets.py).
lock-targets: $(UV_STAMP)
	.uv/tool/bin/python install/targets.py --uv $(UV)

# make gpu-wheels (here) and make gpu-check (on a GPU machine): benchmarks/gpu.mk
include benchmarks/gpu.mk
