"""Ray nodes the tests start themselves, and one each test process shares.

A stage on the tiny study's compute settings starts a private local Ray and stops it again: ~6.6
CPU seconds of these 2 cores each time (BENCHMARKS.md, "`make test` within 12 minutes"), paid by
some forty stage runs. So each test process (each pytest-xdist worker) starts one head node of its
own, with the tiny study's CPUs, the first time a stage asks, and `run_stage` points such stages at
it through RAY_ADDRESS (the path a user's `compute.ray_address` takes). Tests of the private local
Ray itself (its temp dir, auth, resources, GPUs, a fault read inside its workers) run on other
compute settings or with extra environment, and keep starting their own (`run_stage`).

The node is as closed as the stages' own: 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for
it and its clients, pipeline/core/fanout.py says why) and token auth with a token of its own.
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SharedNode:
    """The test process's head node: `env()` is what a stage's environment needs to use it."""

    def __init__(self) -> None:
        self._client: dict[str, str] | None = None
        self._temp_dir: Path | None = None

    def env(self, num_cpus: int) -> dict[str, str]:
        if self._client is None:
            self._start(num_cpus)
        return self._client

    def _start(self, num_cpus: int) -> None:
        from tests.studies import short_tmp, stage_env  # noqa: PLC0415 -- studies imports this module

        self._temp_dir = temp_dir = short_tmp("kvfnode")
        token = temp_dir / "token"
        token.write_text(os.urandom(32).hex())
        token.chmod(0o600)
        port = free_port()
        client = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        atexit.register(self.stop)  # also when the session ends without the fixture's teardown
        started = subprocess.run(
            [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", str(num_cpus), "--include-dashboard", "false",
             # ports of its own: the defaults may belong to another Ray on this machine
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--temp-dir", str(temp_dir), "--disable-usage-stats"],
            env=stage_env(**client), capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        self._client = {**client, "RAY_ADDRESS": f"127.0.0.1:{port}"}

    def stop(self) -> None:
        """Stop this node's processes only (by its temp dir; never `ray stop`)."""
        if self._temp_dir is not None:
            from tests.studies import kill_ray_in  # noqa: PLC0415

            kill_ray_in(str(self._temp_dir))
            self._temp_dir, self._client = None, None


SHARED = SharedNode()
