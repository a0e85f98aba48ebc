import os

# Triton must see this before it is imported anywhere: kernels run in its CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
for var, value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(var, value)

import torch  # noqa: E402

# Tiny test models: one thread avoids oversubscription overheads that dwarf the math.
torch.set_num_threads(1)


# The tiny study's fixtures, for every folder whose tests run stages (tests/studies.py).
from tests.studies import _remove_short_dirs, tiny_data, tiny_project, trained_project, trained_study  # noqa: E402,F401

# Tests that run stages (seconds to minutes each) go first, so under pytest-xdist (`make test`)
# the short tests fill the workers' last minutes.
STAGE_LEVEL = ("tests/stages/", "tests/tools/", "tests/pipeline/")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(STAGE_LEVEL))
