"""Retrofit points in params and the train stage (docs/design.md#retrofit-a-point-initialised-from-a-trained-one):
`init_from` + `steps` validated before any work; parents train before children; a child's
fingerprint holds its parents', so retraining a parent retrains it and changing its steps
retrains it alone; a failed parent leaves the child reported failed, not trained.
"""
import copy
import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.core.params import ParamsError, parse_params
from pipeline.core.runs import train_jobs
from tests.studies import TINY, run_stage, write_params

RETRO = {"mha": {"kind": "mha"}, "swa_from_mha": {"kind": "swa", "window": 4, "init_from": "mha", "steps": 10}}


def parse(variants, **blocks):
    raw = copy.deepcopy(TINY)
    raw["variants"] = variants
    raw.update(blocks)
    return parse_params(raw)


def fingerprints(params, tmp_path):
    return {name: job.fingerprint for name, job in train_jobs(params, "code", tmp_path, tmp_path, {}).items()}


def test_a_retrofit_point_has_its_parents_widths_and_its_own_steps(tmp_path):
    params = parse({**RETRO, "tc": {"kind": "tensor_cache", "window": 4, "init_from": "mha", "steps": [10, 20]}},
                   match_params={"reference": "mha"})
    assert list(params.points) == ["mha", "swa_from_mha", "tc.steps10", "tc.steps20"]
    assert [run.name for run in params.runs()] == list(params.points)  # named as any run
    assert params.points["tc.steps20"].init_from == "mha" and params.train_for("tc.steps20").steps == 20
    assert "init_from" not in params.points["tc.steps20"].attention
    assert params.model_config_for("tc.steps10").mlp_hidden == params.model_config_for("mha").mlp_hidden
    assert params.train_for("mha") is params.train
    # a retrofit validates at least ten times: every 5 steps (log_every) for 20, not every 10
    assert params.train.eval_every == 10 and params.train_for("tc.steps20").eval_every == 5
    grouped = parse({"mha": {"kind": "mha"}, "q": {"kind": "mqa"},
                     "x": {"kind": "swa", "window": 4, "n_kv_heads": 1, "init_from": "q"}},
                    match_params={"reference": "mha"})  # q's matched MLP is wider than mha's
    assert grouped.model_config_for("x").mlp_hidden == grouped.model_config_for("q").mlp_hidden \
        != grouped.model_config_for("mha").mlp_hidden


def test_a_child_fingerprint_follows_its_parent_and_its_steps(tmp_path):
    base = fingerprints(parse(RETRO), tmp_path)
    parent_changed = fingerprints(parse({**RETRO, "mha": {"kind": "gqa", "n_kv_heads": 2}}), tmp_path)
    steps_changed = fingerprints(parse({**RETRO, "swa_from_mha": dict(RETRO["swa_from_mha"], steps=12)}), tmp_path)
    assert parent_changed["mha"] != base["mha"] and parent_changed["swa_from_mha"] != base["swa_from_mha"]
    assert steps_changed["mha"] == base["mha"] and steps_changed["swa_from_mha"] != base["swa_from_mha"]
    plain = fingerprints(parse({"mha": {"kind": "mha"}}), tmp_path)
    assert plain["mha"] == base["mha"]  # a parent's fingerprint does not know its children


@pytest.mark.parametrize("variants,blocks,message", [
    ({"x": {"kind": "swa", "window": 4, "init_from": "nope"}}, {},
     "variants.x.init_from: unknown point 'nope' (points: mha, x)"),
    ({"x": {"kind": "swa", "window": 4, "init_from": "mha"}, "y": {"kind": "swa", "window": 4, "init_from": "x"}}, {},
     "variants.y.init_from: x is itself a retrofit (from mha); start from a point trained from scratch"),
    ({"x": {"kind": "mla", "kv_lora_rank": 4, "rope_dim": 4, "init_from": "mha"}}, {},
     "variants.x.kind: no map from mha to mla: its RoPE lives in one key shared by all heads"),
    ({"s": {"kind": "swa", "window": 4}, "x": {"kind": "swa", "window": 4, "init_from": "s"}}, {},
     "variants.x.init_from: a retrofit starts from full attention (mha, gqa, mqa), not swa"),
    ({"q": {"kind": "mqa"}, "x": {"kind": "gqa", "n_kv_heads": 2, "init_from": "q"}}, {},
     "variants.x.n_kv_heads: 2 does not divide the parent's 1"),
    ({"x": {"kind": "swa", "window": 4, "steps": 10}}, {},
     "variants.x.steps: only with init_from"),
    ({"x": {"kind": "swa", "window": 4, "init_from": "mha", "steps": 2}}, {},
     "variants.x.steps: warmup_steps: 3 must be < steps=2"),
    ({"x": {"kind": "swa", "window": 4, "init_from": ["mha"]}}, {},
     "variants.x.init_from: cannot be swept"),
    ({"x": {"kind": "swa", "window": 4, "init_from": "mha"}}, {"compute": {"workers_per_run": 2}},
     "compute.workers_per_run: a study with init_from (x) trains each run in one process"),
])
def test_bad_retrofits_fail_naming_the_field(variants, blocks, message):
    with pytest.raises(ParamsError) as err:
        parse({"mha": {"kind": "mha"}, **variants}, **blocks)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def _train(root, **env):
    result = run_stage(root, "train", **env)
    return result, json.loads((root / "metrics" / "train.json").read_text())["variants"]


def _set_variants(root, variants):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["variants"] = variants
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_train_stage_trains_parents_then_children_and_skips_what_did_not_change(tiny_project):
    root = tiny_project
    write_params(root, {"variants": RETRO})
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")

    result, runs = _train(root)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    waves = [line for line in out.splitlines() if "run(s) on Ray" in line]
    assert len(waves) == 2, out  # the parent's wave, then the child's
    assert runs["mha"]["trained"] and runs["swa_from_mha"]["trained"]
    assert runs["swa_from_mha"]["init_from"] == "mha" and runs["swa_from_mha"]["step"] == 10
    meta = json.loads((root / "checkpoints" / "swa_from_mha" / "model.json").read_text())
    parent_meta = json.loads((root / "checkpoints" / "mha" / "model.json").read_text())
    assert meta["train"]["steps"] == 10 and meta["history"][-1]["step"] == 10
    run = client.get_run(runs["swa_from_mha"]["run_id"])
    assert run.data.tags["kvf.init_from"] == "mha"
    assert run.data.params["init_from_fingerprint"] == parent_meta["fingerprint"]
    first_loss = meta["history"][0]["train/loss"]  # it starts from the trained parent, not from random
    assert first_loss < parent_meta["history"][0]["train/loss"] - 0.5, (first_loss, parent_meta["history"][0])

    # (nothing changed: parent and child skipped, tests/stages/test_pretrained.py's second train; the
    # child's steps changed: its fingerprint alone moves, test_a_child_fingerprint_follows_its_parent...)
    changed = {"mha": {"kind": "gqa", "n_kv_heads": 2}, "swa_from_mha": dict(RETRO["swa_from_mha"], steps=15)}
    _set_variants(root, changed)
    result, runs = _train(root, KVF_FAULT="mha:3:raise")  # the changed parent fails: the child waits
    assert result.returncode == 1
    assert "[train] FAILED run swa_from_mha: its parent mha failed; not trained" in result.stderr
    assert runs["swa_from_mha"]["status"] == "failed" and "parent mha failed" in runs["swa_from_mha"]["error"]

    result, runs = _train(root)  # the parent's params changed: parent and child retrain
    assert result.returncode == 0, result.stderr[-3000:]
    assert runs["mha"]["trained"] and runs["swa_from_mha"]["trained"]
    parent_meta = json.loads((root / "checkpoints" / "mha" / "model.json").read_text())
    run = client.get_run(runs["swa_from_mha"]["run_id"])
    assert run.data.params["init_from_fingerprint"] == parent_meta["fingerprint"]


def test_a_retrofit_trains_where_nodes_share_only_storage(tiny_project, tmp_path):
    """compute.storage a URI: the child's step-0 checkpoint is made at the driver from the parent
    it brought back, uploaded, and resumed by the worker from storage like any checkpoint."""
    root = tiny_project
    write_params(root, {"variants": RETRO, "compute": {"storage": f"file://{tmp_path / 'store'}"}})
    result, runs = _train(root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert runs["mha"]["trained"] and runs["swa_from_mha"]["trained"] and runs["swa_from_mha"]["step"] == 10
    assert "[train] swa_from_mha: file://" in result.stdout  # brought back from storage
    meta = json.loads((root / "checkpoints" / "swa_from_mha" / "model.json").read_text())
    parent_meta = json.loads((root / "checkpoints" / "mha" / "model.json").read_text())
    assert meta["train"]["steps"] == 10 and meta["history"][-1]["step"] == 10
    assert meta["history"][0]["train/loss"] < parent_meta["history"][0]["train/loss"] - 0.5  # the parent's weights
    assert not list((root / "checkpoints").glob("*.init"))
