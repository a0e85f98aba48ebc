"""train -> export -> evaluate -> report on the tiny project, with two seeds per variant."""
import json

import numpy as np
import yaml
from mlflow.tracking import MlflowClient

from .conftest import run_stage

EVAL = {"context_lengths": [32, 64], "bpb_tokens": 128, "mqar_pairs": [2], "mqar_examples": 16,
        "lm_eval_tasks": ["kvf_passkey_mc"], "task_context_lengths": [256], "limit": 1,
        "decode_lengths": [64], "decode_new_tokens": 4, "generate_lengths": [], "report_context": 1024}


def _set(root, block, **values):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.setdefault(block, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_seeds_from_train_to_report(tiny_project):
    root = tiny_project
    _set(root, "eval", **EVAL)
    _ok(run_stage(root, "train"))
    first = json.loads((root / "metrics" / "train.json").read_text())["variants"]
    assert set(first) == {"mha", "swa"}

    # a second seed trains only the new runs; the first seed's runs are kept as they are
    _set(root, "train", seeds=[0, 1])
    _ok(run_stage(root, "train"))
    runs = json.loads((root / "metrics" / "train.json").read_text())["variants"]
    assert set(runs) == {"mha", "swa", "mha.seed1", "swa.seed1"}
    assert runs["mha"]["trained"] is False and runs["mha"]["run_id"] == first["mha"]["run_id"]
    assert runs["mha.seed1"]["trained"] is True and runs["mha.seed1"]["seed"] == 1
    assert runs["mha.seed1"]["variant"] == "mha"
    assert runs["mha.seed1"]["val/loss"] != runs["mha"]["val/loss"]  # another init, another batch order
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    tags = client.get_run(runs["swa.seed1"]["run_id"]).data.tags
    assert tags["kvf.variant"] == "swa" and tags["kvf.seed"] == "1"

    # export: one directory and one registered version per run; a re-run registers nothing new
    _ok(run_stage(root, "export"))
    assert {p.name for p in (root / "exports").iterdir()} == set(runs)
    again = _ok(run_stage(root, "export")).stdout
    assert again.count("already registered") == 4
    versions = client.search_model_versions("name = 'kvf-mha.seed1'")
    assert len(versions) == 1 and versions[0].run_id == runs["mha.seed1"]["run_id"]

    # evaluate: one result per run; for exact caches the decode path scores what the forward does
    _ok(run_stage(root, "evaluate", timeout=600))
    results = {p.stem: json.loads(p.read_text()) for p in (root / "results" / "eval").glob("*.json")}
    assert set(results) == set(runs)
    for key, r in results.items():
        assert (r["run"], r["variant"], r["seed"]) == (key, key.split(".")[0], int(key.endswith("seed1")))
        assert r["device"] == "cpu" and r["lm_eval"]["scores"]["kvf_passkey_mc"]
        for bucket in r["mqar"].values():
            assert bucket["decode"]["acc"] == bucket["acc"]
    logged = client.get_run(runs["swa.seed1"]["run_id"]).data.metrics
    assert logged["eval/bpb_64"] == results["swa.seed1"]["bpb"]["64"]

    # report: means and sample standard deviations over the two seeds, one CSV row per run
    _ok(run_stage(root, "report"))
    table = (root / "report" / "frontier.md").read_text()
    for variant in ("mha", "swa"):
        bpb = [results[k]["bpb"]["64"] for k in (variant, f"{variant}.seed1")]
        line = next(row for row in table.splitlines() if row.startswith(f"| {variant} "))
        assert f"| {np.mean(bpb):.3f} ± {np.std(bpb, ddof=1):.3f} |" in line
        assert line.split("|")[3].strip() == "2"  # seeds column
    assert len((root / "report" / "frontier.csv").read_text().splitlines()) == 1 + len(runs)
    assert (root / "report" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
