"""Fault injection on the tiny study (issue 15): kill -9 in export, evaluate and report, and a
failing evaluation. Every case starts from its own copy of one study run once, uninterrupted
(`study`: prepare -> train -> export -> evaluate -> report), injects its fault, checks the lines
a user sees and that nothing good was lost, then reruns the stage plainly and compares what it
wrote with what the uninterrupted study wrote (not with constants).

- kill -9 in export, after `[export] mha: ...`. Seen: nothing more; no process of the stage left.
  Kept: checkpoints, the finished export, MLflow runs; a half-written export never passes
  `verify_export`. A plain rerun: the uninterrupted export cards (file digests), same MLflow runs,
  FINISHED.
- kill -9 in evaluate, a Ray worker evaluating. Seen: nothing more; no stage, Ray or worker process
  left. Kept: `metrics/eval.json` byte for byte; no partial result. A plain rerun: the
  uninterrupted numbers.
- kill -9 in report, `report/frontier.png` written. Seen: nothing more; no process of the stage
  left. Kept: `results/eval`. A plain rerun: the uninterrupted report's four files, byte for byte;
  a FINISHED MLflow report run.
- evaluate fails for one run. Seen: `[evaluate] FAILED mha: RuntimeError: injected failure
  (KVF_FAULT_EVALUATE=mha)`, `[evaluate] mha: kept its last good metrics in metrics/eval.json
  (marked stale)`, exit 1. Kept: mha's last good numbers, `stale: true`; the other run finishes.
  A plain rerun: stale gone, the uninterrupted numbers.

The kill takes the stage's whole process group (`os.killpg`, as a terminal's Ctrl-\\ or an OOM
kill of a job would not spare it). Ray puts its workers in process groups of their own, in the
stage's session: the check is that no process of that session (nor one naming the stage's Ray
temp dir) is left running once the workers have seen their raylet die.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import yaml

from tests.studies import copy_study, run_stage, stage_env, stage_env_for

# all on one xdist worker, and the study session-scoped: it runs once even when the worker runs
# other modules' tests between these (a module-scoped one ran up to three times a run)
pytestmark = pytest.mark.xdist_group(__name__)

# the evaluate block of the tiny study: every measure the reruns are compared on, smallest sizes; no
# lm-eval (10 s a start) and no memory/speed probes (a fresh process each, ~2 CPU s, measuring time
# and peak RSS, which no rerun can be compared on; test_evaluate.py tests them)
EVAL = {"context_lengths": [32, 64], "bpb_tokens": 128, "mqar_pairs": [2], "mqar_examples": 16,
        "capacity_pairs": [1, 2], "decode_lengths": []}
RUNS = ("mha", "swa")
REPORT_FILES = ("frontier.png", "frontier.md", "frontier.csv", "capacity.png", "learning.png", "retrieval.png")
SETTLE_S = 30  # Ray's workers exit ~1-2 s after their raylet dies; agents once lingered 1-2 min


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _measured(variants: dict) -> dict:
    """metrics/eval.json's numbers that depend only on the weights and the data: all but the
    timings and peak RSS (measured on a busy machine)."""
    return {run: {k: v for k, v in m.items() if not k.startswith(("speed/", "mem/peak_rss"))}
            for run, m in variants.items()}


def _eval_numbers(root: Path) -> dict:
    return _measured(json.loads((root / "metrics" / "eval.json").read_text())["variants"])


def _results(root: Path) -> dict:
    """The per-example numbers of results/eval (bpb windows, MQAR hits, capacity)."""
    out = {}
    for run in RUNS:
        r = json.loads((root / "results" / "eval" / f"{run}.json").read_text())
        out[run] = {k: r[k] for k in ("bpb", "bpb_windows", "mqar", "capacity", "eval_fingerprint")}
    return out


def _cards(root: Path) -> dict:
    return {run: json.loads((root / "exports" / run / "kvf_export.json").read_text()) for run in RUNS}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def study(tmp_path_factory, trained_study) -> SimpleNamespace:
    """The tiny study run once, uninterrupted (its training the session's: `trained_study`);
    what each stage wrote is the reference."""
    root = copy_study(trained_study, tmp_path_factory.mktemp("faults") / "study")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["eval"].update(EVAL)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("export", "evaluate", "report"):
        _ok(run_stage(root, stage))
    return SimpleNamespace(
        root=root,
        eval_json=(root / "metrics" / "eval.json").read_bytes(),
        eval_numbers=_eval_numbers(root),
        results=_results(root),
        cards=_cards(root),
        export_metrics=json.loads((root / "metrics" / "export.json").read_text())["variants"],
        weights={run: _sha(root / "checkpoints" / run / "model.safetensors") for run in RUNS},
        report={name: (root / "report" / name).read_bytes() for name in REPORT_FILES},
    )


def _copy(study: SimpleNamespace, dest: Path) -> Path:
    """The study as it stood after its last stage, at `dest` (its own MLflow store and Ray temp dir)."""
    return copy_study(study.root, dest)


# --------------------------------------------------------------------------- kill -9
def _processes() -> dict[int, tuple[str, int, str]]:
    """pid -> (state, session id, command line) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        out[int(entry.name)] = (state, int(session), cmdline.strip())
    return out


def _stage_processes(sid: int, ray_dir: str) -> dict[int, str]:
    """Live processes of the stage's session, or naming its Ray temp dir (zombies are dead)."""
    return {pid: cmd for pid, (state, session, cmd) in _processes().items()
            if state != "Z" and pid != os.getpid() and (session == sid or ray_dir in cmd)}


def _line(text: str) -> Callable[[Path, list[str], int], bool]:
    return lambda root, lines, sid: any(text in line for line in lines)


def _worker(name: str) -> Callable[[Path, list[str], int], bool]:
    """A Ray worker of the stage running the task `name` (Ray titles it `ray::<name>`)."""
    return lambda root, lines, sid: any(state != "Z" and session == sid and cmd.startswith(f"ray::{name}")
                                        for state, session, cmd in _processes().values())


def _file(rel: str) -> Callable[[Path, list[str], int], bool]:
    return lambda root, lines, sid: (root / rel).exists()


def _kill_mid_work(root: Path, stage: str, *signs: Callable[[Path, list[str], int], bool],
                   timeout: float = 180) -> str:
    """Start the stage, wait until every sign shows it is mid-work, kill -9 its process group;
    then wait for the rest of its session (Ray's workers) to go. Returns what it printed."""
    ray_dir = yaml.safe_load((root / "params.yaml").read_text())["compute"]["temp_dir"]
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=root, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True).start()
    left: dict[int, str] = {}
    try:
        deadline = time.monotonic() + timeout
        while not all(sign(root, lines, proc.pid) for sign in signs):
            assert proc.poll() is None, f"{stage} ended ({proc.returncode}) before the kill:\n{''.join(lines)}"
            assert time.monotonic() < deadline, f"{stage} not mid-work after {timeout}s:\n{''.join(lines)}"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the stage, its Ray (GCS, raylet, agents) and children
        assert proc.wait(timeout=30) == -signal.SIGKILL
        settle = time.monotonic() + SETTLE_S
        while (left := _stage_processes(proc.pid, ray_dir)) and time.monotonic() < settle:
            time.sleep(0.2)
        assert not left, f"still running {SETTLE_S}s after kill -9 of {stage}: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in left:  # only what this stage started, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return "".join(lines)


def _kept(study: SimpleNamespace, root: Path, *, exports: bool = True, evaluation: bool = True) -> None:
    """What earlier stages wrote is untouched."""
    for run in RUNS:
        assert _sha(root / "checkpoints" / run / "model.safetensors") == study.weights[run]
    if exports:
        assert _cards(root) == study.cards
    if evaluation:
        assert (root / "metrics" / "eval.json").read_bytes() == study.eval_json
        assert _results(root) == study.results


def test_kill_9_in_export_then_rerun(study, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.core.exports import CorruptExport, verify_export

    root = _copy(study, tmp_path / "study")
    out = _kill_mid_work(root, "export", _line("[export] mha: "))
    assert "[export] swa:" not in out
    _kept(study, root, exports=False)
    assert verify_export(root / "exports" / "mha") == study.cards["mha"]
    try:  # swa was being written: whatever is on disk must not pass for a good export
        assert verify_export(root / "exports" / "swa") == study.cards["swa"]
    except CorruptExport as err:
        assert str(err).startswith(f"{root / 'exports' / 'swa'}/"), err

    out = _ok(run_stage(root, "export")).stdout
    card = study.cards["mha"]
    assert (f"[export] mha: {card['parameters']:,} params, {card['state_bytes_32k']:,} state bytes at 32k "
            f"-> exports/mha (already registered as tiny.mha/1)") in out
    card = study.cards["swa"]
    assert (f"[export] swa: {card['parameters']:,} params, {card['state_bytes_32k']:,} state bytes at 32k "
            f"-> exports/swa (") in out
    assert _cards(root) == study.cards  # every file's digest, the weights' included
    for run in RUNS:
        assert verify_export(root / "exports" / run) == study.cards[run]
    _kept(study, root)
    logged = json.loads((root / "metrics" / "export.json").read_text())["variants"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    for run in RUNS:  # the same MLflow runs (not new ones), finished, each with its export registered
        run_id = study.export_metrics[run]["run_id"]
        assert logged[run]["run_id"] == run_id
        assert client.get_run(run_id).info.status == "FINISHED"
        versions = client.search_model_versions(f"name = 'tiny.{run}'")
        assert any(v.run_id == run_id and v.tags.get("fingerprint") == study.cards[run]["fingerprint"]
                   and v.tags.get("code_sha256") == study.cards[run]["code_sha256"] for v in versions)


def test_kill_9_in_evaluate_then_rerun(study, tmp_path):
    root = _copy(study, tmp_path / "study")
    shutil.rmtree(root / "results" / "eval")  # both runs to evaluate again (as after retraining)
    out = _kill_mid_work(root, "evaluate", _line("[evaluate] 2 run(s) on Ray (local), 0 GPU(s) per job"),
                         _worker("evaluate:"))
    assert "done in" not in out
    assert (root / "metrics" / "eval.json").read_bytes() == study.eval_json  # the last good file
    assert not [p.name for p in (root / "results" / "eval").iterdir()]  # no partial result
    _kept(study, root, evaluation=False)

    out = _ok(run_stage(root, "evaluate")).stdout
    assert "[evaluate] 2 run(s) on Ray (" in out  # this test process's node (tests/ray_node.py)
    for run in RUNS:
        assert f"[evaluate] {run}: done in " in out
    assert _eval_numbers(root) == study.eval_numbers
    assert _results(root) == study.results


def test_kill_9_in_report_then_rerun(study, tmp_path):
    from mlflow.tracking import MlflowClient

    root = _copy(study, tmp_path / "study")
    shutil.rmtree(root / "report")  # as `dvc repro` does before it runs the stage
    _kill_mid_work(root, "report", _file("report/frontier.png"))
    _kept(study, root)
    # a kill after the report's MLflow run was created leaves it RUNNING: the rerun closes it
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    orphan = client.create_run(experiment, run_name="frontier", tags={"kvf.report": "frontier"}).info.run_id

    out = _ok(run_stage(root, "report")).stdout
    assert client.get_run(orphan).info.status == "KILLED"
    line = next(line for line in out.splitlines() if line.startswith("[report] "))
    assert line.startswith("[report] 2 run(s), 2 point(s) -> report/frontier.png, report/frontier.md "
                           "(MLflow run "), out
    for name in REPORT_FILES:
        assert (root / "report" / name).read_bytes() == study.report[name], name
    run_id = line.removesuffix(")").rsplit(" ", 1)[1]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id, "report")} == {f"report/{n}" for n in REPORT_FILES}
    _kept(study, root)


# --------------------------------------------------------------------------- a failing evaluation
def test_a_failed_evaluate_keeps_the_last_good_metrics_marked_stale(study, tmp_path):
    root = _copy(study, tmp_path / "study")
    shutil.rmtree(root / "results" / "eval")  # both runs to evaluate again; mha will fail
    result = run_stage(root, "evaluate", KVF_FAULT_EVALUATE="mha")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "[evaluate] FAILED mha: RuntimeError: injected failure (KVF_FAULT_EVALUATE=mha)\n" in result.stderr
    assert "[evaluate] mha: kept its last good metrics in metrics/eval.json (marked stale)" in result.stderr
    assert "[evaluate] swa: done in " in result.stdout and "[evaluate] mha: done" not in result.stdout
    good = json.loads(study.eval_json)["variants"]
    variants = json.loads((root / "metrics" / "eval.json").read_text())["variants"]
    assert variants["mha"] == {**good["mha"], "stale": True}  # every number as it was, marked
    assert "stale" not in variants["swa"]
    assert _measured(variants)["swa"] == study.eval_numbers["swa"]
    assert not (root / "results" / "eval" / "mha.json").exists()

    result = _ok(run_stage(root, "evaluate"))
    assert "[evaluate] swa: unchanged (checkpoint, eval config), kept" in result.stdout
    assert "[evaluate] mha: done in " in result.stdout and "stale" not in result.stderr
    assert "stale" not in json.loads((root / "metrics" / "eval.json").read_text())["variants"]["mha"]
    assert _eval_numbers(root) == study.eval_numbers
    assert _results(root) == study.results


# --------------------------------------------------------------------------- a full disk
def _pages(folder: Path) -> int:
    """The bytes `folder`'s files take on a tmpfs (whole pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def _on_a_small_disk(root: Path, folder: str, size: int, stage: str) -> subprocess.CompletedProcess:
    """`stage` with the study's `folder` on a tmpfs of `size` bytes (a mount namespace of the stage's
    own: `unshare`, no root needed); afterwards what the small disk held is `folder`, on a disk with
    room (the space freed)."""
    kept = root.parent / f"{folder}-on-the-small-disk"
    (root / folder).mkdir(exist_ok=True)
    script = (f"mount -t tmpfs -o size={size} kvf-full {folder} && {sys.executable} -m stages.{stage}; "
              f"rc=$?; mkdir {kept} && cp -a {folder}/. {kept}/; exit $rc")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=root,
                            env=stage_env_for(root, stage), capture_output=True, text=True, timeout=300)
    assert not [p.name for p in kept.rglob("*.tmp")]  # no temp file left behind
    shutil.rmtree(root / folder)
    shutil.copytree(kept, root / folder)
    return result


def test_a_full_disk_in_export_and_evaluate_names_the_path_then_a_rerun_ends_as_the_study(study, tmp_path):
    """exports/ and then results/ on a disk with room for one run's files, not two: the stage
    stops at the second with one line naming its path, the bytes it needs and those free, keeps the
    first whole and leaves nothing half-written that could pass for good; with room again a rerun
    ends with the uninterrupted study's exports and numbers."""
    from pipeline.core.exports import verify_export

    root = _copy(study, tmp_path / "study")
    shutil.rmtree(root / "exports")
    first, second = RUNS  # exported in this order (params' runs)
    size = _pages(study.root / "exports" / first) + _pages(study.root / "exports" / second) // 2
    result = _on_a_small_disk(root, "exports", size, "export")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"[export] {first}: " in result.stdout and f"[export] {second}: " not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"\[export\] exports/{second}: no space left on its device \(it needs about [\d,]+ bytes; "
                        r"[\d,]+ free there\): free some space, then run it again \(make repro exports it again\)",
                        last), result.stderr[-3000:]
    assert verify_export(root / "exports" / first) == study.cards[first]
    assert not (root / "exports" / second).exists()  # the part written, removed
    _kept(study, root, exports=False)
    _ok(run_stage(root, "export"))
    assert _cards(root) == study.cards

    shutil.rmtree(root / "results")  # both runs to evaluate again
    size = _pages(study.root / "results" / "eval" / f"{first}.json") + 4096
    result = _on_a_small_disk(root, "results", size, "evaluate")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    done = [run for run in RUNS if f"[evaluate] {run}: done in " in result.stdout]
    stopped = [run for run in RUNS if run not in done]
    last = result.stderr.strip().splitlines()[-1]
    assert len(done) <= 1 and re.fullmatch(
        rf"\[evaluate\] results/eval/({'|'.join(map(re.escape, stopped))})\.json: no space left on its device \(it "
        r"needs about [\d,]+ bytes; [\d,]+ free there\): free some space, then run it again \(make repro keeps the "
        r"results written and evaluates the rest\)", last), result.stdout[-2000:] + result.stderr[-3000:]
    assert sorted(p.name for p in (root / "results" / "eval").iterdir()) == [f"{run}.json" for run in done]
    assert (root / "metrics" / "eval.json").read_bytes() == study.eval_json  # the last good file
    out = _ok(run_stage(root, "evaluate")).stdout
    for run in done:
        assert f"[evaluate] {run}: unchanged (checkpoint, eval config), kept" in out
    for run in stopped:
        assert f"[evaluate] {run}: done in " in out
    assert _eval_numbers(root) == study.eval_numbers
    assert _results(root) == study.results
