"""Ray nodes the tests start themselves, and one the whole test run shares.

A stage on the tiny study's compute settings starts a private local Ray and stops it again: ~6.6
CPU seconds of these 2 cores each time (BENCHMARKS.md, "`make test` within 12 minutes"), paid by
some forty stage runs. So the test run starts one head node, the first time a stage asks, and
`run_stage` points such stages at it through RAY_ADDRESS (the path a user's `compute.ray_address`
takes). Its pytest-xdist workers share it (one node idling beside the tests costs ~30 CPU seconds
a run; one per worker cost three times that): the first to ask starts it with the tiny study's
CPUs for each worker, under a lock in its folder, the others read where it is, and the
controller process stops it when the run ends (`stop`, from tests/conftest.py). Tests of the
private local Ray itself (its temp dir, auth, resources, GPUs, a fault read inside its workers)
run on other compute settings or with extra environment, and keep starting their own
(`run_stage`).

The node is as closed as the stages' own: 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for
it and its clients, pipeline/core/fanout.py says why) and token auth with a token of its own.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 and not handed out before by this process: a port is free again
    once its probing socket closes, so two calls in a row could name the same one (seen: a Ray
    head whose dashboard and agent were given one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _home() -> Path:
    """The shared node's folder: one per test run (its controller's pid: an xdist worker's parent),
    in /tmp because Ray's socket paths must stay short."""
    controller = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
    return Path(f"/tmp/kvfnode-{controller}")


class SharedNode:
    """The test run's head node: `env()` is what a stage's environment needs to use it."""

    def __init__(self) -> None:
        self._client: dict[str, str] | None = None

    def env(self, num_cpus: int) -> dict[str, str]:
        """Started by the first test process to ask (`num_cpus` for each xdist worker), joined by the rest."""
        if self._client is None:
            home = _home()
            home.mkdir(exist_ok=True)
            where = home / "client.json"
            with open(home / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                if not where.exists():
                    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
                    where.write_text(json.dumps(self._start(home, num_cpus * workers)))
            self._client = json.loads(where.read_text())
        return self._client

    def _start(self, home: Path, num_cpus: int) -> dict[str, str]:
        from tests.studies import stage_env  # noqa: PLC0415 -- studies imports this module

        token = home / "token"
        token.write_text(os.urandom(32).hex())
        token.chmod(0o600)
        port = free_port()
        client = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        started = subprocess.run(
            [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", str(num_cpus), "--include-dashboard", "false",
             # no log monitor: it tails every worker's log files all run long (~16 CPU s) to echo
             # them in the drivers, and no test reads that echo (a job's error comes back in its result)
             "--include-log-monitor", "false",
             # ports of its own: the defaults may belong to another Ray on this machine
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--temp-dir", str(home / "ray"), "--disable-usage-stats"],
            env=stage_env(**client), capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        return {**client, "RAY_ADDRESS": f"127.0.0.1:{port}"}

    def stop(self) -> None:
        """Stop the node's processes only (by its folder; never `ray stop`) and remove the folder:
        by the controller, when the run ends (and when it starts, for a folder a killed run left)."""
        from tests.studies import kill_ray_in  # noqa: PLC0415

        home = _home()
        if home.exists():
            kill_ray_in(f"{home}/")
            shutil.rmtree(home, ignore_errors=True)
        self._client = None


SHARED = SharedNode()
