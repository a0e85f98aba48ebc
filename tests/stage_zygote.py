"""Stages forked from a process that has already imported what they all import.

A stage started as `python -m stages.<name>` spends 2-6 CPU seconds of these 2 cores importing
torch, MLflow, SQLAlchemy and Ray before it reads params.yaml, and the tests start about ninety
stages (BENCHMARKS.md, "`make test` within 12 minutes"). So `run_stage` (tests/studies.py) hands a
stage to a zygote: a process started with the stage's own environment that imports those packages
once and then, for each stage, forks a child. The child takes the stage's working directory,
argv, environment and pipes, runs the module as `python -m` does (runpy as `__main__`, its working
directory first on sys.path) and ends the way that interpreter would: an exception or a
`sys.exit` reaches the top level, atexit handlers run (Ray's shutdown among them), the exit status
goes back to the test.

What a package reads from the environment when it is imported is read in the zygote, so a zygote
serves only stages whose environment equals its own but for the variables the stages read when
they run (`CALL_TIME`); any other stage runs as a real subprocess. transformers is not imported
here (it fixes its cache paths from HF_HOME, which each stage sets, at import), and the zygote
refuses to fork once it has a second Python thread. Tests that signal or kill a stage start it with
Popen themselves, a real process.

Run as `python -m tests.stage_zygote <socket>`: prints `ready` once its imports are done.
"""
from __future__ import annotations

import json
import os
import runpy
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

# Read by the stages (or Ray, MLflow) when they run, never when a module is imported.
CALL_TIME = ("KVF_FAULT", "KVF_FAULT_EVALUATE", "KVF_STUDY", "RAY_ADDRESS", "MLFLOW_TRACKING_URI",
             "PYTEST_CURRENT_TEST")  # (pytest's, read by nothing a stage runs)

PRELOAD = (
    "numpy", "yaml", "pydantic", "torch", "safetensors.torch", "sqlalchemy", "mlflow",
    "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "ray", "models", "pipeline.core.params", "pipeline.core.tracking", "pipeline.core.fanout",
    "pipeline.core.runs", "pipeline.core.checkpoint", "pipeline.train.driver", "stages",
)


def _threads() -> int:
    """Python threads (the native ones of OpenBLAS and jemalloc, started by their imports, are
    stopped and restarted across a fork by the libraries' own atfork handlers)."""
    import threading

    return threading.active_count()


def _serve(listener: socket.socket) -> tuple[dict, list[int]] | None:
    """Fork a child per request; return (request, fds) in the child, None when the parent goes."""
    parent = os.getppid()
    listener.settimeout(1.0)
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            if os.getppid() != parent:
                return None
            continue
        with conn:
            conn.settimeout(None)
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
            request = json.loads(message)
            if _threads() > 1:  # forking a threaded process is not what a fresh interpreter is
                conn.sendall(json.dumps({"refused": f"{_threads()} threads"}).encode() + b"\n")
                return None
            pid = os.fork()
            if pid == 0:
                listener.close()
                return request, fds
            for fd in fds:
                os.close(fd)
            _reply(conn, {"pid": pid})
            _, status = os.waitpid(pid, 0)
            _reply(conn, {"returncode": os.waitstatus_to_exitcode(status)})


def _reply(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:  # the test gave up on it (its timeout): the next one may come
        pass


def _run(request: dict, fds: list[int]) -> None:
    """Become `python -m <module> <args>` in the request's directory, environment and pipes."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (null, *fds):
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = os.getcwd()
    sys.argv = ["-m", *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


def main() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if "transformers" in sys.modules or _threads() > 1:
        sys.exit(f"stage_zygote: its imports brought transformers or threads ({_threads()}); not serving")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sys.argv[1])
    listener.listen()
    print("ready", flush=True)
    served = _serve(listener)
    if served is not None:
        _run(*served)


class Zygotes:
    """The zygotes of this test process, one per environment (but `CALL_TIME`), at most `limit`."""

    def __init__(self, limit: int = 3) -> None:
        self.limit, self._zygotes = limit, {}

    def run(self, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """`subprocess.run(args, cwd, env, capture_output, text, timeout)`, forked from a zygote where
        one serves `env`; `args` is [python, "-m", module, *rest]."""
        key = tuple(sorted((k, v) for k, v in env.items() if k not in CALL_TIME))
        zygote = self._zygote(key, env) if args[1] == "-m" and args[0] == sys.executable else None
        if zygote is not None:
            done = _forked(zygote[1], args, cwd, env, timeout)
            if done is not None:
                return done
            self._zygotes[key] = None  # it refused or is gone: real processes from now on
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

    def _zygote(self, key: tuple, env: dict):
        if key not in self._zygotes:
            if len(self._zygotes) >= self.limit:
                return None
            from tests.studies import short_tmp  # noqa: PLC0415 -- studies imports this module

            path = str(short_tmp("kvfzyg") / "s")
            proc = subprocess.Popen([sys.executable, "-m", "tests.stage_zygote", path],
                                    cwd=Path(__file__).resolve().parents[1], env=env, text=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            ready = proc.stdout.readline().strip() == "ready"
            self._zygotes[key] = (proc, path) if ready else None
        return self._zygotes[key]

    def stop(self) -> None:
        for zygote in self._zygotes.values():
            if zygote is not None:
                zygote[0].kill()
                zygote[0].wait()
        self._zygotes.clear()


def _forked(path: str, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess | None:
    """One stage through the zygote at `path`; None if it refused or is gone."""
    request = {"module": args[2], "args": args[3:], "cwd": str(cwd), "env": env}
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    with socket.socket(socket.AF_UNIX) as conn:
        try:
            conn.connect(path)
            socket.send_fds(conn, [json.dumps(request).encode()], [out_w, err_w])
        except OSError:  # the zygote is gone (killed): a real process instead
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            return None
        os.close(out_w)
        os.close(err_w)
        replies = conn.makefile("r")
        first = json.loads(replies.readline())
        if "pid" not in first:
            os.close(out_r)
            os.close(err_r)
            return None
        output = _read_until_closed({out_r: [], err_r: []}, first["pid"], timeout, args)
        returncode = json.loads(replies.readline())["returncode"]
    return subprocess.CompletedProcess(args, returncode, output[out_r], output[err_r])


def _read_until_closed(chunks: dict[int, list], pid: int, timeout: float, args) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, 9)
                for fd in chunks:
                    os.close(fd)
                raise subprocess.TimeoutExpired(args, timeout)
            for key, _ in sel.select(left):
                data = os.read(key.fd, 1 << 16)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
                    os.close(key.fd)
    # as subprocess's text mode: universal newlines
    return {fd: b"".join(parts).decode().replace("\r\n", "\n").replace("\r", "\n") for fd, parts in chunks.items()}


if __name__ == "__main__":
    main()
