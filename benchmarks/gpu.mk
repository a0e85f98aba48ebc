# The GPU check (benchmarks/gpu_check.py), for a GPU machine that has Python, torch, triton,
# transformers and pytest but none of our other packages, and no network:
#   make gpu-wheels   here, with PyPI: uv.lock's versions of what else it imports, for CPython
#                     3.11-3.13 on manylinux x86_64, into $(GPU_WHEELS) (benchmarks/gpu_wheels.py)
#   make gpu-check    there, in the checkout with $(GPU_WHEELS) beside it: no venv, no network;
#                     installs the missing wheels into $(GPU_SITE) and prints the tables, also
#                     written to $(OUT) (a folder: its tables.md), else runs/gpu-check/tables.md
GPU_WHEELS ?= .gpu-wheels
GPU_SITE   ?= runs/gpu-site
GPU_PYTHON ?= python3
# the system python3, not the venv the Makefile may put first on PATH
GPU_PATH    = $(or $(HOST_PATH),$(PATH))

.PHONY: gpu-wheels gpu-check

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	PATH="$(GPU_PATH)" $(GPU_PYTHON) benchmarks/gpu_wheels.py download $(GPU_WHEELS)

gpu-check:
	PATH="$(GPU_PATH)" $(GPU_PYTHON) benchmarks/gpu_wheels.py install $(GPU_WHEELS) $(GPU_SITE)
	PATH="$(GPU_PATH)" PYTHONPATH="$(CURDIR)/$(GPU_SITE):$(CURDIR)" TRITON_INTERPRET=0 \
	  $(GPU_PYTHON) benchmarks/gpu_check.py --out "$(or $(OUT),runs/gpu-check/tables.md)"
