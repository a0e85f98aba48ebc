"""A job no live node can run (its node lost, nothing else with its resources) comes back failed
within `compute.stranded_after_s`, naming what it needs, instead of Ray keeping it pending forever;
a job that can run is untouched. On a real Ray node (the test run's shared one)."""
import json
import subprocess
import sys

from tests.ray_node import SHARED
from tests.studies import REPO, TINY, stage_env


def test_a_job_no_live_node_can_run_fails_within_the_bound_naming_what_it_needs():
    code = (
        "import json, sys, time\n"
        "import ray\n"
        "from pipeline.core import fanout\n"
        "def work(job):\n"
        "    time.sleep(job)\n"
        "    return {'slept': job}\n"
        "ray.init(address='auto')\n"
        "start = time.monotonic()\n"
        "refs = {**fanout.submit(work, {'lost': 0}, 'test', 1, 0, resources={'second': 1.0}),\n"
        "        **fanout.submit(work, {'here': 3}, 'test', 1, 0)}\n"
        "out = {name: (round(time.monotonic() - start, 1), r)\n"
        "       for name, r in fanout.as_completed(refs, stranded_after_s=2.0, where='the test node')}\n"
        "print(json.dumps(out))\n"
        "ray.shutdown()\n"
    )
    env = stage_env(**SHARED.env(TINY["compute"]["num_cpus"]))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    seconds, lost = out["lost"]
    assert lost["status"] == "failed" and lost["error_type"] == "Stranded"
    assert lost["error"].startswith("nothing left to run it on: it needs CPU=1, second=1 and none of the 1 live "
                                    "node(s) of the Ray cluster (the test node) has that; waited 2 s "
                                    "(compute.stranded_after_s)"), lost["error"]
    assert 2.0 <= seconds < 10.0  # the bound, then at most a check's period and a wait
    seconds, here = out["here"]
    assert here == {"status": "ok", "slept": 3} and seconds >= 3.0  # runnable: waited for, whatever its length
