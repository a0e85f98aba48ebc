"""GPU scheduling without a GPU: a local Ray that declares 2 GPUs (`compute.num_gpus`), the work
forced to CPU (`compute.device: cpu`). With `gpus_per_job: auto` every job holds exactly one GPU
and no more jobs run at once than there are GPUs, though CPUs would allow more; the GPU study's
compute block (configs/gpu.yaml) resolves to the same packing. One Ray start for the module."""
import time

import pytest

from pipeline.core import fanout
from pipeline.core.params import ComputeConfig, load_params
from tests.studies import REPO, short_tmp

pytestmark = pytest.mark.xdist_group(__name__)  # under pytest-xdist all on one worker, so the cluster starts once

GPUS, CPUS, JOBS = 2, 6, 6  # CPUs enough for all six jobs at once: only the GPUs can hold them back


def _spans(results: dict) -> int:
    """The most jobs that ran at the same time (from their own start and end clocks)."""
    edges = sorted([(r["start"], 1) for r in results.values()] + [(r["end"], -1) for r in results.values()])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _probe(job, hold_s: float) -> dict:
    """What a job sees of its GPUs while it holds them."""
    import os

    import ray

    start = time.time()
    ids = [str(i) for i in ray.get_gpu_ids()]
    time.sleep(hold_s)
    return {"job": job, "gpu_ids": ids, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "start": start, "end": time.time()}


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    compute = ComputeConfig(num_cpus=CPUS, num_gpus=GPUS, device="cpu", gpus_per_job="auto",
                            temp_dir=str(short_tmp("kvfgpu")))
    with fanout.cluster(compute, REPO) as cluster:
        yield compute, cluster


def test_auto_packs_one_job_per_gpu_and_never_oversubscribes(fake_gpu_cluster):
    compute, cluster = fake_gpu_cluster
    assert cluster.gpus_per_job == 1 and cluster.device == "cpu"  # scheduled on GPUs, computed on CPU
    refs = fanout.submit(_probe, {f"j{i}": i for i in range(JOBS)}, "probe", compute.cpus_per_job,
                         cluster.gpus_per_job, 2.0)
    results = dict(fanout.as_completed(refs))
    assert all(r["status"] == "ok" for r in results.values()), results
    assert all(len(r["gpu_ids"]) == 1 and r["visible"] == r["gpu_ids"][0] for r in results.values())
    assert _spans(results) == GPUS  # never more than the GPUs, and the GPUs were all used
    for a in results.values():  # two jobs that overlap in time hold different GPUs
        for b in results.values():
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["gpu_ids"] != b["gpu_ids"]


def test_two_gpus_per_job_run_one_at_a_time_and_too_many_fail_at_once(fake_gpu_cluster):
    import ray

    compute, _ = fake_gpu_cluster
    refs = fanout.submit(_probe, {f"j{i}": i for i in range(3)}, "probe", 1, 2, 0.5)
    results = dict(fanout.as_completed(refs))
    assert all(sorted(r["gpu_ids"]) == ["0", "1"] for r in results.values()) and _spans(results) == 1
    with pytest.raises(fanout.ComputeError, match=r"compute.gpus_per_job: asks for 3 GPU\(s\) per job .* has 2 GPU"):
        fanout.resolve_gpus(compute.model_copy(update={"gpus_per_job": 3}), ray.cluster_resources(), "local")
    with pytest.raises(fanout.ComputeError,
                       match=r"compute.workers_per_run: 3 workers x 1 GPU\(s\) per run .* has 2 GPU"):
        fanout.resolve_gpus(compute.model_copy(update={"workers_per_run": 3}), ray.cluster_resources(), "local")
    assert fanout.resolve_gpus(compute.model_copy(update={"workers_per_run": 2}), ray.cluster_resources(), "local") == 1


def test_the_gpu_study_packs_one_run_per_gpu(fake_gpu_cluster):
    """configs/gpu.yaml's compute block against this 2-GPU cluster: one GPU per job."""
    import ray

    compute = load_params(REPO / "configs" / "gpu.yaml").compute
    assert compute.ray_address is None and compute.device == "auto"
    assert fanout.resolve_gpus(compute, ray.cluster_resources(), "local") == 1
    assert fanout.Cluster.of(compute, "local", 1).device == "cuda"  # a real GPU would be used
