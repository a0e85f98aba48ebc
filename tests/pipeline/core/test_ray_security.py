"""The local Ray a stage starts is closed: it listens on loopback only, and a process without its
token cannot use it. The cluster is started by fanout's own context manager and stopped by it
(plus, as a safety net, by the pids of its own temp dir: never `ray stop`)."""
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil

from pipeline.core import fanout
from pipeline.core.params import ComputeConfig
from tests.studies import kill_ray_in, short_tmp

# A Ray client of the same user without the token: it joins the GCS given as argv[1] (Ray would
# swap 127.0.0.1 for the routable IP, which we no longer listen on, without the flag set in
# _intruder_env) and runs one task. Prints INTRUDER-OK if it gets that far.
INTRUDER = textwrap.dedent("""
    import sys, ray
    ray.init(address=sys.argv[1], log_to_driver=False)
    @ray.remote
    def whoami():
        import os
        return os.getpid()
    ray.get(whoami.remote(), timeout=30)
    print("INTRUDER-OK", flush=True)
""")

# Raw gRPC calls to the GCS (argv[1]) and the raylet's node manager (argv[2]) with no token, a
# wrong one and the right one (argv[3], the control): prints one JSON line of status codes.
GRPC_PROBE = textwrap.dedent("""
    import json, sys, grpc
    from ray.core.generated import gcs_service_pb2 as g, gcs_service_pb2_grpc as gg
    from ray.core.generated import node_manager_pb2 as n, node_manager_pb2_grpc as ng
    gcs, raylet, token = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().strip()
    calls = {"gcs": lambda ch, md: gg.NodeInfoGcsServiceStub(ch).GetAllNodeInfo(
                 g.GetAllNodeInfoRequest(), timeout=10, metadata=md),
             "raylet": lambda ch, md: ng.NodeManagerServiceStub(ch).GetResourceLoad(
                 n.GetResourceLoadRequest(), timeout=10, metadata=md)}
    out = {}
    for label, md in (("none", None), ("wrong", [("authorization", "Bearer " + "0" * 64)]),
                      ("right", [("authorization", "Bearer " + token)])):
        for name, call in calls.items():
            with grpc.insecure_channel(gcs if name == "gcs" else raylet) as ch:
                try:
                    call(ch, md)
                    out[f"{name}/{label}"] = "OK"
                except grpc.RpcError as err:
                    out[f"{name}/{label}"] = err.code().name
    print(json.dumps(out))
""")


def _square(job):  # one trivial job through fanout.submit: the cluster works for its own driver
    return {"value": job * job}


def _cluster_pids() -> list[psutil.Process]:
    """This process (the driver) and everything it spawned: GCS, raylet, agents, workers."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _listening(procs: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    found = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(proc.pid, name, c.laddr.ip, c.laddr.port) for c in conns
                  if c.status == psutil.CONN_LISTEN]
    return found


def _loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or ip.startswith("127.")


def _outside_ips() -> list[str]:
    """This machine's addresses other than loopback (and IPv6 link-local, which needs a scope)."""
    ips = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(addr.address) \
                    and not addr.address.startswith("fe80"):
                ips.append(addr.address)
    return ips


def _intruder_env(home: Path) -> dict:
    """A process of the same user but without the cluster's token: no RAY_* settings and a $HOME
    without ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH="",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return env


def _run_until(cmd: list[str], env: dict, cwd: Path, marks: tuple[str, ...], timeout: float) -> str:
    """Run `cmd` until a line holds one of `marks`, it exits, or `timeout`; then kill it (only
    it: its own process group). Returns what it printed."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if any(mark in line for mark in marks):
                break
        else:
            seen.append(f"[no answer within {timeout}s]\n")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    return "".join(seen)


def test_local_ray_is_loopback_only_and_needs_its_token():
    temp_dir = short_tmp("kvfsec")
    home = short_tmp("kvfhome")
    default_token = Path.home() / ".ray" / "auth_token"
    had_default_token = default_token.exists()
    compute = ComputeConfig(num_cpus=1, cpus_per_job=1, gpus_per_job=0, temp_dir=str(temp_dir))
    env_before = {k: os.environ.get(k) for k in fanout._LOCAL_RAY_ENV}
    try:
        with fanout.cluster(compute, temp_dir) as where:
            import ray

            assert where.where == "local"
            gcs = ray.get_runtime_context().gcs_address
            host, port = gcs.rsplit(":", 1)
            assert host == "127.0.0.1", gcs

            # the token: fresh, in the project's run state, owner-only; named by the environment
            token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
            assert os.environ["RAY_AUTH_MODE"] == "token"
            assert token.parent == temp_dir.resolve() / "auth", token
            assert stat.S_IMODE(token.stat().st_mode) == 0o600
            assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
            assert len(token.read_text()) == 64

            # the cluster works for its own driver (this also starts a worker, which listens too)
            refs = fanout.submit(_square, {"a": 3}, "sec", 1, 0)
            assert dict(fanout.as_completed(refs)) == {"a": {"status": "ok", "value": 9}}

            # (a) every listening TCP socket of the cluster's processes is on loopback
            procs = _cluster_pids()
            names = {p.name() for p in procs if p.is_running()}
            assert {"gcs_server", "raylet"} <= names, names
            listening = _listening(procs)
            assert any(p == int(port) for *_, p in listening), listening  # the GCS is among them
            assert [s for s in listening if not _loopback(s[2])] == [], listening

            # (b1) from outside the loopback, nothing of it answers: the TCP connect is refused
            for ip in _outside_ips():
                for *_, p in listening:
                    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
                    with socket.socket(family, socket.SOCK_STREAM) as s:
                        s.settimeout(3)
                        assert s.connect_ex((ip, p)) != 0, f"{ip}:{p} accepts connections"

            # (b2) on loopback, the GCS and the raylet answer UNAUTHENTICATED to a call without the
            # token or with a wrong one; with the right one (the control) they serve it
            raylet = f"127.0.0.1:{ray.nodes()[0]['NodeManagerPort']}"
            probe = subprocess.run([sys.executable, "-c", GRPC_PROBE, gcs, raylet, str(token)],
                                   env=_intruder_env(home), cwd=home, capture_output=True, text=True,
                                   timeout=60)
            assert probe.returncode == 0, probe.stderr[-3000:]
            codes = json.loads(probe.stdout.strip().splitlines()[-1])
            assert codes == {"gcs/none": "UNAUTHENTICATED", "raylet/none": "UNAUTHENTICATED",
                             "gcs/wrong": "UNAUTHENTICATED", "raylet/wrong": "UNAUTHENTICATED",
                             "gcs/right": "OK", "raylet/right": "OK"}, codes

            # (b3) `ray.init(address=...)` without the token is refused by the GCS (Ray retries the
            # refused call for ~20 s before it gives up: the first refusal is enough here)
            said = _run_until([sys.executable, "-c", INTRUDER, gcs], _intruder_env(home), home,
                              marks=("InvalidAuthToken", "INTRUDER-OK"), timeout=60)
            assert "INTRUDER-OK" not in said and "InvalidAuthToken" in said, said[-3000:]
            assert not (home / ".ray" / "auth_token").exists()
    finally:
        kill_ray_in(str(temp_dir))  # a no-op when the cluster stopped as it should
    # on the way out: the token is gone, the caller's RAY_* environment is as it was, ~/.ray untouched
    assert not list((temp_dir / "auth").glob("token.*"))
    assert {k: os.environ.get(k) for k in fanout._LOCAL_RAY_ENV} == env_before
    assert default_token.exists() == had_default_token
