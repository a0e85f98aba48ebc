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


def pytest_collection_modifyitems(items):
    """tests/pipeline first, the rest in their order: its tests run stages (seconds to minutes
    each), so under pytest-xdist (`make test`) the short tests fill the workers' last minutes."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/pipeline/"))
