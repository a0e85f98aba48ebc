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
from tests.ray_node import SHARED  # noqa: E402
from tests.studies import _remove_short_dirs, tiny_data, tiny_project, trained_project, trained_study  # noqa: E402,F401

# Tests that run stages (seconds to minutes each) go first, the longest of them (1-4 minutes each on
# these 2 cores, `make test`'s --durations) before the rest, so under pytest-xdist (`make test`) the
# short tests fill the workers' last minutes. (xdist hands out its groups of several tests first.)
STAGE_LEVEL = ("tests/stages/", "tests/tools/", "tests/pipeline/")
LONGEST = (
    "tests/stages/test_stages.py::test_seeds_from_train_to_report",
    "tests/pipeline/train/test_ray_train.py::test_two_workers_follow_one_process_through_a_preemption_and_a_killed_worker",
    "tests/tools/test_mlflow_server.py::test_the_tiny_study_against_a_tracking_server_that_goes_away",
    "tests/pipeline/prepare/test_corpus.py::test_prepare_train_evaluate_on_a_local_corpus_with_a_trained_bpe",
    "tests/stages/test_pretrained.py::test_a_pretrained_point_its_policies_and_retrofits_through_every_stage",
    "tests/stages/test_runner.py::test_preemption_and_a_killed_worker_end_as_the_uninterrupted_run",
    "tests/pipeline/train/test_retrofit.py::test_train_stage_trains_parents_then_children_and_skips_what_did_not_change",
    "tests/stages/test_stages.py::test_a_deleted_mlflow_store_is_rebuilt",
)


def _order(item) -> tuple[bool, int]:
    rank = next((i for i, prefix in enumerate(LONGEST) if item.nodeid.startswith(prefix)), len(LONGEST))
    return not item.nodeid.startswith(STAGE_LEVEL), rank


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or the one process without xdist)
        SHARED.stop()  # a folder a killed run left under this pid


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        SHARED.stop()  # the run's shared Ray node, once every worker is done (tests/ray_node.py)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_order)
    _group_for_xdist(config, items)


def _group_for_xdist(config, items) -> None:
    """`--dist loadgroup` sends a test marked `xdist_group(name)` to the worker of its group by the
    `@name` suffix its worker gives its node id. pytest-xdist 3.8 writes it to `item._nodeid`,
    which pytest 9 no longer reads (the id is `item._id`), so every group was spread over the
    workers and each built its session fixtures itself (the fault study, the two-node cluster,
    SmolLM2's weights: up to three times a run). Here the suffix goes where pytest 9 reads it."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers under loadgroup
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")
