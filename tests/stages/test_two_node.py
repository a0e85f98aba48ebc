"""No shared filesystem (issue 12): the train stage on a two-node Ray cluster on this machine.

A head node (no CPUs: nothing runs there but the driver) and a second node with a temp dir of its
own and a custom resource `node2`, both on 127.0.0.1 with token auth. The study asks for
`compute.resources: {node2: 1}` and `compute.storage: file://<a folder of its own>`: every job
runs on the second node, reads the prepared data from that node's copy, writes its checkpoints
to storage, and the driver brings the finished runs back to `checkpoints/<run>`.

Two nodes on one host, Ray 2.60: `ray start --node-ip-address 127.0.0.1` swaps a localhost
address for the machine's routable IP (binding every interface) unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that setting `ray start --address` refuses to add a
node ("Multi-node Ray clusters are not supported on Windows and OSX"). So the head and the stage
run with it off, and the second node through `_NODE2` below: `ray start` itself, that one check
let through and 127.0.0.1 kept (its children inherit the setting off). Every port then listens on
127.0.0.1 only.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core import checkpoint, fanout
from pipeline.core.params import ComputeConfig
from tests.ray_node import free_port
from tests.studies import REPO, run_stage, stage_env, write_params

# all on one xdist worker, which runs them one after the other: the cluster is module-scoped, so it
# stops once they are done (a session-scoped one idled beside the rest of the suite: ~30 CPU s of
# its agents, log monitors and idle workers on these 2 cores)
pytestmark = pytest.mark.xdist_group(__name__)

RAY = str(Path(sys.executable).with_name("ray"))
_NODE2 = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True  # let `ray start --address` add this node ...
services.resolve_ip_for_localhost = lambda host: host  # ... and keep it on 127.0.0.1
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()
"""
_NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
for _ in range(120):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if any("node2" in n["Resources"] for n in nodes):
        break
    time.sleep(0.5)
print(json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in nodes]))
"""




def _processes_of(marks: list[str]) -> list[int]:
    """Pids whose command line names one of our temp dirs (Ray's workers sit in groups of their own)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and int(proc.name) != os.getpid() and any(m in cmdline for m in marks):
            found.append(int(proc.name))
    return found


@pytest.fixture(scope="module")
def two_nodes():
    """(address, what a client's environment needs to reach it, node 2's id, node 2's temp dir,
    `restart()`: node 2 started again after a test stopped it, its new id): a cluster of our own,
    stopped by its process groups (never `ray stop`: it would stop every Ray on the machine). The
    stage keeps 127.0.0.1 as it is too (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)."""
    base = REPO / "runs" / f"test-two-node-{os.getpid()}"
    # each node's temp dir in the repo (through a short /tmp link when too deep for Ray's socket names)
    temp_dirs = [fanout.ray_temp_dir(ComputeConfig(temp_dir=str(base / name)), REPO) for name in ("head", "node2")]
    token = base / "token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    client = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env = stage_env(**client)
    port = free_port()
    groups = []

    def start(cmd: list[str], log: str) -> None:
        """`ray start --block` in a process group of its own; ports of its own (the defaults may
        belong to another Ray on this machine)."""
        cmd += ["--block", "--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--disable-usage-stats",
                "--dashboard-agent-listen-port", str(free_port())]
        with open(base / log, "w") as out:
            groups.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        for _ in range(120):  # `ray start --block` says so once its node is up
            assert groups[-1].poll() is None, (base / log).read_text()[-3000:]
            if "Ray runtime started" in (base / log).read_text():
                return
            time.sleep(0.5)
        pytest.fail(f"{log}: the node did not come up within 60 s: {(base / log).read_text()[-3000:]}")

    def start_node2() -> str:
        start([sys.executable, "-c", _NODE2, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2",
               "--resources", json.dumps({"node2": 4}), "--temp-dir", temp_dirs[1]], "node2.log")
        probe = subprocess.run([sys.executable, "-c", _NODES, f"127.0.0.1:{port}"], env=env, capture_output=True,
                               text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:] + (base / "node2.log").read_text()[-3000:]
        nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        node2 = [n["id"] for n in nodes if "node2" in n["resources"]]
        assert len(nodes) == 2 and len(node2) == 1, (nodes, (base / "node2.log").read_text()[-3000:])
        return node2[0]

    try:
        start([RAY, "start", "--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard", "false",
               "--ray-client-server-port", str(free_port()), "--temp-dir", temp_dirs[0]], "head.log")
        yield f"127.0.0.1:{port}", client, start_node2(), temp_dirs[1], start_node2
    finally:
        for group in groups:
            try:
                os.killpg(group.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            group.wait(timeout=30)
        deadline = time.time() + 30
        while _processes_of(temp_dirs) and time.time() < deadline:  # workers exit once their raylet is gone
            time.sleep(0.5)
        left = _processes_of(temp_dirs)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        for link in temp_dirs:
            if Path(link).is_symlink():
                Path(link).unlink()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the test cluster still running: {left}"


def _study(root: Path, address: str, store: Path, resources: dict) -> None:
    params = write_params(root)
    params["compute"].update(ray_address=address, resources=resources, storage=f"file://{store}")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _trained_on(log: str, run: str) -> tuple[str, str]:
    """(node id, data folder) from the stage's line for a run brought back from storage."""
    line = next(x for x in log.splitlines() if x.startswith(f"[train] {run}: file://"))
    node, data = line.split("(trained on node ", 1)[1].rstrip(")").split(", data read from ")
    return node, data


def test_a_lost_node_then_the_study_through_storage_on_a_new_one(two_nodes, tiny_project, tmp_path_factory,
                                                                trained_study):
    """Node 2, the only node with the study's resource, stopped while swa holds at step 12 (after its
    step-10 checkpoint reached storage) and mha has finished and come back: Ray runs swa's task again,
    no live node can take it, and the stage ends within `compute.stranded_after_s` naming the run,
    what it needs and the node lost. With a node 2 again, the next stage resumes swa from its
    checkpoint in storage, mha is not retrained, and both end with the numbers of the study trained
    in one go (`trained_study`); then export and evaluate run there too. First in this module: the
    node 2 the other tests use is the one started here."""
    address, client, node2, node2_temp, restart = two_nodes
    root, store = tiny_project, tmp_path_factory.mktemp("storage")
    _study(root, address, store, {"node2": 1})
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compute"]["stranded_after_s"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # 1. swa holds at step 12; once mha is back in checkpoints/, node 2 goes (its raylet, agents, workers)
    stage = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, text=True,
                             env=stage_env(KVF_FAULT="swa:12:hold", **client),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (list(Path(node2_temp).rglob(".*.holding")) and (root / "checkpoints" / "mha" / "model.json").exists()) \
            and time.time() < deadline and stage.poll() is None:
        time.sleep(0.2)
    assert stage.poll() is None and list(Path(node2_temp).rglob(".*.holding")), "the run never held at step 12"
    lost = time.time()
    for pid in _processes_of([node2_temp]):
        os.kill(pid, signal.SIGKILL)
    out, err = stage.communicate(timeout=240)
    took, log = time.time() - lost, out + err
    assert stage.returncode == 1, log[-4000:]
    assert f"[train] 2 run(s) on Ray ({address})" in log and f"storage file://{store} (no shared filesystem)" in log
    line = next((x for x in err.splitlines() if x.startswith("[train] FAILED run swa at step ")), err[-4000:])
    assert (": nothing left to run it on: it needs CPU=1, node2=1 and none of the 1 live node(s) of the Ray "
            f"cluster ({address}) has that (lost: node ") in line, line
    assert "waited 3 s (compute.stranded_after_s)" in line, line
    assert took < 120, took  # Ray's health checks notice the node, then the 3-s bound: never a hang
    node, data = _trained_on(log, "mha")
    manifest = (root / "data" / "manifest.json").read_bytes()
    key = f"data/{Path(data).name}"
    assert node == node2 and data == f"{node2_temp}/kvf-cache/{key}"  # node 2's own copy of the data
    assert (store / key / "manifest.json").read_bytes() == manifest  # the data went through storage
    for rel in json.loads(manifest)["files"]:
        assert (store / key / rel).read_bytes() == (root / "data" / rel).read_bytes()
    stored = {p.name.rsplit("-", 1)[0]: p for p in (store / "checkpoints").iterdir()}
    assert sorted(stored) == ["mha", "swa"]
    assert json.loads((stored["swa"] / "latest.json").read_text())["step"] == 10  # what storage kept
    assert not (stored["swa"] / "model.json").exists() and not (root / "checkpoints" / "swa").exists()
    assert checkpoint.load_final_meta(root / "checkpoints" / "mha")["step"] == 30  # brought back, verified

    # 2. a node 2 again: swa resumes from its checkpoint in storage; mha is not retrained
    new_node2 = restart()
    assert new_node2 != node2
    second = run_stage(root, "train", timeout=300, **client)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert "[train] mha: unchanged since its last completed run, skipped" in log
    assert "[train] swa: step 15/30" in log and "[train] swa: step 5/30" not in log  # from step 10
    assert _trained_on(log, "swa") == (new_node2, data)
    metrics = json.loads((root / "metrics" / "train.json").read_text())["variants"]
    reference = json.loads((trained_study / "metrics" / "train.json").read_text())["variants"]
    for run in ("mha", "swa"):
        final = checkpoint.load_final_meta(root / "checkpoints" / run)  # where DVC and export expect it
        assert metrics[run]["status"] == "ok" and final["fingerprint"] == json.loads(
            (stored[run] / "model.json").read_text())["fingerprint"]
        assert [r["step"] for r in final["history"]] == list(range(5, 31, 5))
        assert metrics[run]["val/bpb"] == final["metrics"]["val/bpb"]
        assert {k: v for k, v in metrics[run].items() if k.startswith("val/")} == \
            {k: v for k, v in reference[run].items() if k.startswith("val/")}, run
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["mha", "swa"]

    # 3. nothing changed: nothing trains, Ray is not even started
    third = run_stage(root, "train", timeout=300, **client)
    log = third.stdout + third.stderr
    assert third.returncode == 0, log[-4000:]
    assert log.count("unchanged since its last completed run, skipped") == 2 and "run(s) on Ray" not in log

    # 4. export (the driver's) and evaluate: its jobs, a cache policy's among them, run on node 2
    # from the data, checkpoint and export they fetch through storage
    _set_eval(root)
    assert run_stage(root, "export", timeout=300, **client).returncode == 0
    fourth = run_stage(root, "evaluate", timeout=400, **client)
    log = fourth.stdout + fourth.stderr
    assert fourth.returncode == 0, log[-4000:]
    assert f"storage file://{store} (no shared filesystem)" in log
    for key in ("mha", "swa", "mha+window4"):
        line = next(x for x in log.splitlines() if x.startswith(f"[evaluate] {key}: done"))
        assert f"(on node {new_node2}, data read from {data})" in line, line
        result = json.loads((root / "results" / "eval" / f"{key}.json").read_text())
        assert "worker" not in result and result["bpb"]["32"] > 0
    # the policy ran the lm-eval tasks too, on its parent's export as fetched through storage
    assert result["lm_eval"]["scores"] and json.loads((root / "results" / "eval" / "mha.json").read_text())["lm_eval"]
    for run in ("mha", "swa"):  # what the workers fetched
        assert (store / "evaluate" / run / "checkpoint" / "model.json").exists()
        assert (store / "evaluate" / run / "export" / "config.json").exists()
    assert not list((Path(node2_temp) / "kvf-cache" / "evaluate").iterdir())  # each job's copy removed


def _set_eval(root: Path) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["eval"] = {"context_lengths": [32, 64], "bpb_tokens": 128, "mqar_pairs": [2], "mqar_examples": 8,
                      "capacity_pairs": [1], "lm_eval_tasks": ["kvf_passkey_mc"], "task_context_lengths": [256],
                      "limit": 1, "decode_lengths": [64], "decode_new_tokens": 4, "generate_lengths": [],
                      "report_context": 1024, "cache_policies": [{"policy": "window", "window": 4, "points": ["mha"]}]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_ray_train_workers_on_the_second_node_through_storage(two_nodes, tiny_project, tmp_path_factory):
    """`workers_per_run: 2`: Ray Train keeps its checkpoints in the storage URI, each worker reads
    its node's copy of the data, the final checkpoint comes back to `checkpoints/<run>`."""
    address, client, _, node2_temp, _ = two_nodes
    root, store = tiny_project, tmp_path_factory.mktemp("storage")
    _study(root, address, store, {"node2": 1})
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["variants"] = {"mha": {"kind": "mha"}}
    params["train"]["batch_size"] = 4
    params["compute"]["workers_per_run"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.rmtree(Path(node2_temp) / "kvf-cache", ignore_errors=True)  # node 2 fetches the data afresh
    result = run_stage(root, "train", timeout=300, **client)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "x 2 Ray Train workers per run (DDP); storage file://" in log
    final = checkpoint.load_final_meta(root / "checkpoints" / "mha")
    name = f"mha-{final['fingerprint'][:12]}"
    assert list((store / name).glob("checkpoint_*/latest.json"))  # Ray Train's own checkpoints, in storage
    assert json.loads((store / "checkpoints" / name / "model.json").read_text())["fingerprint"] == final["fingerprint"]
    key = next((store / "data").iterdir()).name
    assert (Path(node2_temp) / "kvf-cache" / "data" / key / "manifest.json").exists()
    assert json.loads((root / "metrics" / "train.json").read_text())["variants"]["mha"]["status"] == "ok"


def test_a_resource_no_node_declares_fails_at_once(two_nodes, tiny_project, tmp_path_factory):
    address, client, _, _, _ = two_nodes
    _study(tiny_project, address, tmp_path_factory.mktemp("storage"), {"gpu_box": 1})
    result = run_stage(tiny_project, "train", timeout=120, **client)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert (f"params.yaml: compute.resources: gpu_box=1 per train job but the Ray cluster ({address}) has 0 "
            "of it (its custom resources: node2)") in result.stderr
    assert not (tiny_project / "checkpoints").exists() and not (tiny_project / "metrics").exists()


def test_a_job_sent_to_a_worker_carries_storage_keys_and_no_driver_path(tiny_project, tmp_path_factory):
    """What crosses to a worker when storage is a URI: keys in storage, nothing of this machine."""
    from pipeline.core.data import verify_prepared
    from pipeline.core.params import load_params
    from pipeline.core.runs import train_job
    from pipeline.core.storage import Storage
    from pipeline.train.driver import _start_in_storage

    params = load_params(tiny_project / "params.yaml")
    run = params.runs()[0]
    job = train_job(params, run, "code", tiny_project / "data", tiny_project / "checkpoints",
                    verify_prepared(tiny_project / "data")["files"])
    store = f"file://{tmp_path_factory.mktemp('storage')}"
    sent, latest = _start_in_storage(job, Storage(store), "data/0123")
    assert latest is None and sent.data_dir is None and sent.ckpt_dir is None
    assert sent.storage.model_dump() == {"uri": store, "data": "data/0123",
                                         "checkpoints": f"checkpoints/{run.name}-{job.fingerprint[:12]}"}
    assert str(tiny_project) not in sent.model_dump_json()


def test_an_evaluation_sent_through_storage_carries_keys_and_no_driver_path(tiny_project, tmp_path_factory):
    """An evaluate job with storage a URI: the run's checkpoint and export go to storage, the job
    names them by key; a local corpus's haystack is named inside the data, not on this machine."""
    from pipeline.core import checkpoint as ckpt
    from pipeline.core.data import verify_prepared
    from pipeline.core.jobs import EvalJob
    from pipeline.core.params import EvalConfig, MQARConfig
    from pipeline.core.storage import Storage
    from pipeline.evaluate.driver import through_storage

    root, store = tiny_project, tmp_path_factory.mktemp("storage")
    (root / "checkpoints" / "mha").mkdir(parents=True)
    ckpt.write_json(root / "checkpoints" / "mha" / "model.json", {"step": 30})
    job = EvalJob(run="mha", variant="mha", seed=0, family="mha", lr=1e-3, lr_candidates={}, eval=EvalConfig(),
                  mqar=MQARConfig(), fingerprint="f" * 64, reach=None, ckpt_dir=str(root / "checkpoints" / "mha"),
                  export_dir=str(root / "exports" / "mha"), data_dir=str(root / "data"), hf_home=str(root / "hf"),
                  task_metadata={"seed": 0, "heldout_path": str(root / "data" / "text" / "heldout.bin")})
    sent = through_storage(Storage(f"file://{store}"), {"mha": job}, root / "data", root / "checkpoints",
                           root / "exports", verify_prepared(root / "data"))["mha"]
    assert str(root) not in sent.model_dump_json() and sent.task_metadata["heldout_path"] == "text/heldout.bin"
    assert sent.storage.run == "evaluate/mha" and (store / "evaluate" / "mha" / "checkpoint" / "model.json").exists()
    assert (store / sent.storage.data / "manifest.json").read_bytes() == (root / "data" / "manifest.json").read_bytes()
