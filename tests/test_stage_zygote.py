"""The zygote the stage tests fork their stages from (tests/stage_zygote.py) gives a stage what a
real `python -m` process gives it: its cwd, argv, environment, sys.path[0] and `__main__`, its
stdout and stderr, its exit status (a number, a message, an uncaught error), and a timeout."""
import subprocess
import sys

import pytest

from tests.stage_zygote import Zygotes
from tests.studies import stage_env


@pytest.fixture(scope="module")
def zygotes():
    made = Zygotes()
    yield made
    made.stop()


@pytest.mark.parametrize("arg", ["0", "3", "a message", "raise"])
def test_a_forked_stage_sees_and_ends_as_a_real_process(zygotes, tmp_path, arg):
    args = [sys.executable, "-m", "tests.echo_stage", arg]
    # a variable read when the stage runs (CALL_TIME): every case shares one zygote (its imports are
    # ~4 CPU seconds), so each case's own value must come through the fork, not the zygote's
    env = stage_env(KVF_FAULT=f"echo {arg}")
    forked = zygotes.run(args, tmp_path, env, timeout=60)
    real = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert zygotes._zygotes and all(z is not None for z in zygotes._zygotes.values())  # it was forked
    assert forked.returncode == real.returncode == {"0": 0, "3": 3}.get(arg, 1)
    assert forked.stdout == real.stdout and f'"echo": "echo {arg}"' in real.stdout
    assert forked.stderr.splitlines()[0] == real.stderr.splitlines()[0] == "a line on stderr"
    assert forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1]  # the message, the error's last line


def test_a_forked_stage_past_its_timeout_is_killed(zygotes, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        zygotes.run([sys.executable, "-m", "tests.echo_stage", "sleep"], tmp_path, stage_env(), timeout=2)
    again = zygotes.run([sys.executable, "-m", "tests.echo_stage", "0"], tmp_path, stage_env(), timeout=60)
    assert again.returncode == 0  # the zygote serves the next one
