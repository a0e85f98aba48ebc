"""train -> export -> evaluate -> report on the tiny project, with two seeds per variant. Each
test starts from its own copy of the tiny study trained once for the session (`trained_project`:
TINY's params, one seed; the eval block does not enter a run's fingerprint)."""
import json

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.core.results import MEASURES
from tests.studies import run_stage

# no lm-eval tasks (~8 CPU s an evaluated run): the stage runs them in test_corpus (a BPE study),
# test_pretrained and test_two_node (a cache policy's, through storage); no memory/speed probes (a
# fresh process each, ~2 CPU s): they run in those three and in test_evaluate
EVAL = {"context_lengths": [32, 64], "bpb_tokens": 128, "mqar_pairs": [2], "mqar_examples": 16,
        "capacity_pairs": [1, 2], "lm_eval_tasks": [],
        "decode_lengths": [], "generate_lengths": [], "report_context": 1024,
        # inference-time cache policies on the mha checkpoints, at the swa windows' bytes
        "cache_policies": [{"policy": "window", "window": 4, "points": ["mha"]},
                           {"policy": "streaming", "sinks": 1, "window": 5}]}
POLICIES = ["mha+window4", "mha+streaming.sinks1.window5"]


def _set(root, block, **values):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.setdefault(block, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _train_steps(root) -> int:
    return yaml.safe_load((root / "params.yaml").read_text())["train"]["steps"]


def test_seeds_from_train_to_report(trained_project):
    root = trained_project
    _set(root, "eval", **EVAL)
    first = json.loads((root / "metrics" / "train.json").read_text())["variants"]
    assert set(first) == {"mha", "swa"}

    # a second seed and a second rate: only the new runs train, the first seed's runs at the first
    # rate are kept as they are (one train stage); per point and seed the rate with the lower
    # validation objective is selected, from the checkpoints' own metrics. (A swept knob's points
    # and names: test_sweep.py and the default study.)
    _set(root, "train", seeds=[0, 1], lr=[3e-3, 1e-2])
    _ok(run_stage(root, "train"))
    runs = json.loads((root / "metrics" / "train.json").read_text())["variants"]
    keys = ["mha", "mha.seed1", "swa", "swa.seed1"]
    assert set(runs) == set(keys) | {_lr_name(k) for k in keys}
    assert runs["mha"]["trained"] is False and runs["mha"]["run_id"] == first["mha"]["run_id"]
    assert runs["swa"]["trained"] is False and runs["swa"]["run_id"] == first["swa"]["run_id"]
    assert runs["mha.seed1"]["trained"] is True and runs["mha.seed1"]["seed"] == 1
    assert runs["mha.seed1"]["variant"] == "mha" and runs["mha.lr0.01.seed1"]["trained"] is True
    assert runs["mha.seed1"]["val/loss"] != runs["mha"]["val/loss"]  # another init, another batch order
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    tags = client.get_run(runs["swa.seed1"]["run_id"]).data.tags
    assert tags["kvf.variant"] == "swa" and tags["kvf.seed"] == "1"
    winners = {}
    for key in keys:
        objectives = {0.003: runs[key]["val/objective"], 0.01: runs[_lr_name(key)]["val/objective"]}
        winners[key] = key if objectives[0.003] <= objectives[0.01] else _lr_name(key)

    # export: one directory per selected run (a re-run registers nothing new: test_faults.py's kill -9
    # in export reruns it)
    _ok(run_stage(root, "export"))
    assert {p.name for p in (root / "exports").iterdir()} == set(winners.values())

    # evaluate: one result per point and seed, for the selected run; and per cache policy on
    # each mha key, the same checkpoint measured through the policy's cache
    _ok(run_stage(root, "evaluate", timeout=600))
    results = {p.stem: json.loads(p.read_text()) for p in (root / "results" / "eval").glob("*.json")}
    policy_keys = [point + seed for point in POLICIES for seed in ("", ".seed1")]
    assert set(results) == set(keys) | set(policy_keys)
    for key in policy_keys:
        seed = ".seed1" if key.endswith(".seed1") else ""
        r, base = results.pop(key), results["mha" + seed]
        policy = r["policy"]
        assert r["checkpoint_run"] == base["run"]
        assert r["run"] == f"{base['run']}+{key.split('+')[1].removesuffix(seed)}"
        assert r["kind"] == f"mha+{policy['policy']}" and r["family"] == f"mha+{policy['policy']}"
        held = policy["sinks"] + policy["window"]
        assert r["cache_bytes_per_token_analytic"] * 1024 == base["cache_bytes_per_token_analytic"] * held
        assert r["cache_bytes_measured"]["cache_bytes"] == r["cache_bytes_measured"]["cache_bytes_analytic"]
        assert r["cache_bytes_measured"]["cache_bytes"] == base["cache_bytes_per_token_analytic"] * held
        assert r["bpb"]["64"] != base["bpb"]["64"] and "decode" not in r["mqar"]["p2_far"]
        assert r["lr"] == base["lr"] and set(r["capacity"]) == {"1", "2"}
        logged_policy = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                           f"tags.`kvf.run` = '{r['run']}'")
        assert len(logged_policy) == 1 and logged_policy[0].data.metrics["eval/bpb_64"] == r["bpb"]["64"]
        assert logged_policy[0].data.tags["kvf.checkpoint_run_id"] == runs[base["run"]]["run_id"]
        assert "mlflow.parentRunId" not in logged_policy[0].data.tags  # top-level: the UI lists it
    for key, r in results.items():
        assert r["run"] == winners[key] and r["variant"] == key.split(".seed")[0]
        assert r["seed"] == int(key.endswith("seed1")) and r["family"] == key.split(".")[0]
        assert set(r["lr_candidates"]) == {"0.003", "0.01"}
        assert r["device"] == "cpu"
        for bucket in r["mqar"].values():
            assert bucket["decode"]["acc"] == bucket["acc"]
            assert np.mean(bucket["hits"]) == bucket["acc"] and len(bucket["gaps"]) == bucket["n"]
        assert np.mean(r["bpb_windows"]["64"]) == r["bpb"]["64"]
        assert set(r["capacity"]) == {"1", "2"} and r["bpb_by_distance"]["window"] == 4
    swa = runs[winners["swa.seed1"]]["run_id"]
    logged = client.get_run(swa).data
    assert logged.metrics["eval/bpb_64"] == results["swa.seed1"]["bpb"]["64"]
    assert logged.metrics["frontier/bpb"] == np.mean(results["swa.seed1"]["bpb_windows"]["32"])
    assert logged.params["family"] == "swa"
    assert logged.tags["kvf.selected"] == "true"

    # report: means over the two seeds, one CSV row per point and seed, the rate that won
    _ok(run_stage(root, "report"))
    table = (root / "report" / "frontier.md").read_text()
    for point in ("mha", "swa"):
        bpb = [np.mean(results[k]["bpb_windows"]["32"]) for k in (point, f"{point}.seed1")]
        line = next(row for row in table.splitlines() if row.startswith(f"| {point} "))
        assert f"| {np.mean(bpb):.3f} [" in line
        assert line.split("|")[6].strip() == "2"  # seeds column
    assert "## The seeds' claims" in table and "## Pareto front" in table
    assert "| mha+window4 | mha+window | mha+window |" in table
    assert len((root / "report" / "frontier.csv").read_text().splitlines()) == 1 + len(keys) + len(policy_keys)
    assert (root / "report" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    # convergence: every point's runs read from their checkpoints, flagged one way or the other
    points_table = table.split("## Points")[1].split("\n## ")[0].splitlines()
    cells = [line.split("|")[8:10] for line in points_table if line.startswith(("| mha ", "| swa "))]
    assert len(cells) == 2 and {steps.strip() for steps, _ in cells} == {str(_train_steps(root))}
    assert {flag.strip() for _, flag in cells} <= {"converged", "still learning", "recall settled, bpb learning",
                                                   "recall learning, bpb settled"}
    assert (root / "report" / "learning.png").read_bytes()[:4] == b"\x89PNG"

    # MLflow: every evaluated run top-level (the UI lists them without expanding anything), and
    # the experiment's frontier view charts metrics those runs hold
    experiment = client.get_experiment_by_name("tiny")
    evaluated = client.search_runs([experiment.experiment_id], "metrics.`frontier/cache_bytes` > 0")
    assert len(evaluated) == len(keys) + len(policy_keys)
    assert not [r.info.run_name for r in evaluated if "mlflow.parentRunId" in r.data.tags]
    view = json.loads(json.loads(experiment.tags["mlflow.sharedViewState.kvf-frontier"])["state"])
    held = set(evaluated[0].data.metrics)
    charted = {c["yaxis"]["key"] for c in view["compareRunCharts"]}
    assert charted == {f"frontier/{m.column}" for m in MEASURES if m.panel} & held  # one layer: no mqar_reach
    assert all(c["xaxis"]["key"] in held for c in view["compareRunCharts"]) and len(charted) >= 4


def _lr_name(key: str) -> str:
    """`swa.window4.seed1` -> `swa.window4.lr0.01.seed1`: the same point and seed at the second rate."""
    point, _, seed = key.partition(".seed")
    return f"{point}.lr0.01" + (f".seed{seed}" if seed else "")


def test_a_deleted_mlflow_store_is_rebuilt(trained_project):
    """mlflow.db lost after a full study: `make repro`'s last step (tools.mlflow_sync) rebuilds
    every run from its checkpoint's history, with its export, evaluation metrics and a report
    run; export alone, on a store lost after training, rebuilds the runs it logs to."""
    root = trained_project
    _set(root, "eval", **EVAL)
    for stage in ("export", "evaluate", "report"):
        _ok(run_stage(root, stage, timeout=600))
    before = json.loads((root / "metrics" / "train.json").read_text())["variants"]
    logged = json.loads((root / "metrics" / "eval.json").read_text())["variants"]
    (root / "mlflow.db").unlink()
    out = _ok(run_stage(root, "tools.mlflow_sync")).stdout
    assert "store rebuilt for 2 run(s)" in out
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    for name, trained in before.items():
        (run,) = client.search_runs([experiment], f"tags.`kvf.run` = '{name}'")
        assert run.info.run_id != trained["run_id"] and run.info.status == "FINISHED"
        assert run.data.metrics["val/bpb"] == pytest.approx(trained["val/bpb"])
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 3  # the whole history
        assert run.data.metrics["eval/bpb_64"] == logged[name]["eval/bpb_64"]
        assert run.data.tags["kvf.selected"] == "true"
        assert client.search_model_versions(f"name = 'tiny.{name}'")[0].run_id == run.info.run_id
    for point in POLICIES:  # a cache policy's run comes back too, with its evaluation metrics
        (run,) = client.search_runs([experiment], f"tags.`kvf.run` = '{logged['mha']['run']}+{point.split('+')[1]}'")
        assert run.data.metrics["eval/bpb_64"] == logged[point]["eval/bpb_64"]
    (report,) = client.search_runs([experiment], "tags.`kvf.report` = 'frontier'")
    assert {a.path for a in client.list_artifacts(report.info.run_id, "report")} == {
        "report/frontier.png", "report/frontier.md", "report/frontier.csv", "report/capacity.png",
        "report/learning.png", "report/retrieval.png"}
    assert "store complete" in _ok(run_stage(root, "tools.mlflow_sync")).stdout  # a whole store: nothing done

    (root / "mlflow.db").unlink()
    out = _ok(run_stage(root, "export")).stdout
    assert out.count("rebuilt from its checkpoint") == 2


def test_a_damaged_export_stops_evaluate_before_any_work(trained_project):
    """One changed byte in an export that evaluate reads (its lm-eval tasks run on the exports):
    evaluate names the file and exits 2 before evaluating anything; exporting again restores it."""
    root = trained_project
    _set(root, "eval", **{**EVAL, "lm_eval_tasks": ["kvf_passkey_mc"], "task_context_lengths": [256], "limit": 1})
    _ok(run_stage(root, "export"))
    weights = root / "exports" / "swa" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = run_stage(root, "evaluate")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"{weights}: not the bytes the export stage wrote")
    assert not (root / "results").exists() and not (root / "metrics" / "eval.json").exists()
    _ok(run_stage(root, "export"))
    from pipeline.core.exports import verify_export

    assert verify_export(root / "exports" / "swa")["variant"] == "swa"
