"""Malformed params stop every stage before any work: exit 2, one line naming the field."""
import copy

import pytest
import yaml

from pipeline.core.params import ParamsError, load_params, parse_params
from tests.studies import REPO, TINY, run_stage, write_params

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def test_default_params_are_valid_and_typed():
    params = load_params(REPO / "params.yaml")
    assert set(params.variants) == {"mha", "mqa", "mla", "tpa", "swa", "linear", "tensor_cache",
                                    "tensor_cache_chunk_mean", "tensor_cache_factored", "tensor_cache_from_mha",
                                    "swa_from_mha"}
    assert params.model_config_for("tensor_cache_chunk_mean").attention.write == "chunk_mean"
    assert params.model_config_for("tensor_cache_factored").attention.factors.rank_k == 1
    assert params.compute.gpus_per_job == "auto" and params.tracking.uri is None
    assert [run.name for run in params.runs()] == list(params.points)  # one seed, one rate
    # the frontier's shape: a window sweep per bounded family the seeds' claims compare
    families = {}
    for point in params.points.values():
        families.setdefault(point.family, []).append(point)
    for family in ("swa", "tensor_cache"):
        assert len(families[family]) >= 2
    # two retrofits of the MHA checkpoint at a window a point trained from scratch has, a fifth of the steps
    for child in ("tensor_cache_from_mha", "swa_from_mha"):
        point = params.points[child]
        assert point.init_from == "mha" and 5 * point.steps == params.train.steps
        assert params.train_for(child).eval_every == 10  # twelve validations in its 120 steps
        twin = f"{point.attention['kind']}.window{point.attention['window']}"
        assert params.model_config_for(child).attention == params.model_config_for(twin).attention
    assert params.match_params.reference == "mha"
    # inference-time cache policies on the mha checkpoint: one result key each, after the trained ones
    assert params.result_keys()[len(params.points):] == [
        "mha+window6", "mha+window10", "mha+window16", "mha+streaming.sinks4.window6",
        "mha+streaming.sinks4.window12"]


def test_cache_policies_default_to_every_full_attention_point():
    raw = copy.deepcopy(DEFAULT)
    raw["eval"]["cache_policies"] = [{"policy": "streaming", "sinks": 2, "window": 8}]
    raw["train"]["seeds"] = [0, 1]
    keys = parse_params(raw).result_keys()
    full = ["mha", "mqa"]
    assert keys[-4:] == [f"{p}+streaming.sinks2.window8{s}" for p in full for s in ("", ".seed1")]


def test_runs_name_the_first_seed_by_its_variant():
    raw = copy.deepcopy(DEFAULT)
    raw["train"]["seeds"] = [3, 1]
    raw["variants"] = {"mha": {"kind": "mha"}, "swa": {"kind": "swa", "window": 16}}
    raw.pop("match_params")
    runs = parse_params(raw).runs()
    assert [(r.name, r.variant, r.seed) for r in runs] == [
        ("mha", "mha", 3), ("mha.seed1", "mha", 1), ("swa", "swa", 3), ("swa.seed1", "swa", 1)]


def _set(path: str, value):
    def mutate(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return mutate


@pytest.mark.parametrize("mutate, field", [
    (_set("variants.tpa.rank_k", 0), "variants.tpa.rank_k"),
    (_set("variants.tpa.rank_k", "two"), "variants.tpa.rank_k"),
    (_set("variants.tpa.rnk_k", 2), "variants.tpa.rnk_k"),
    (_set("variants.foo", {"kind": "lstm"}), "variants.foo.kind"),
    (_set("variants.swa.window", 4096), "variants.swa.window"),
    (_set("variants.swa.window", [8, 0]), "variants.swa.window"),
    (_set("variants.swa.window", []), "variants.swa.window"),
    (_set("variants.swa.window", [8, 8]), "variants.swa.window"),
    (_set("variants.swa.kind", ["swa", "mha"]), "variants.swa.kind"),
    (_set("train.lr", [1e-3, -1.0]), "train.lr.1"),
    (_set("train.lr", [1e-3, 1e-3]), "train.lr"),
    (_set("match_params.reference", "swa"), "match_params.reference"),
    (_set("model.mlp_hidden", 100), "model.mlp_hidden"),
    (_set("eval.context_lengths", [512, 1024]), "eval.context_lengths"),
    (_set("data.mqar.eval_gaps.near", [2, 6]), "data.mqar.eval_gaps.near"),
    (_set("eval.mqar_pairs", [2, 6]), "eval.mqar_pairs.1"),
    (_set("variants.gqa", {"kind": "gqa", "n_kv_heads": 3}), "variants.gqa.n_kv_heads"),
    (_set("model.d_modle", 64), "model.d_modle"),
    (_set("model.n_heads", 5), "model.n_heads"),
    (_set("train.lr", -1.0), "train.lr"),
    (_set("train.warmup_steps", 10_000), "train.warmup_steps"),
    (_set("train.checkpoint_every", 15), "train.checkpoint_every"),
    (_set("train.seeds", []), "train.seeds"),
    (_set("train.seeds", [0, 1, 0]), "train.seeds"),
    (_set("train.seed", 3), "train.seed"),
    (_set("compute.gpus_per_job", "many"), "compute.gpus_per_job"),
    (_set("data.mqar.eval_gaps.far", [90, 500]), "data.mqar.eval_gaps.far"),
    (_set("data.heldout_plays", ["hamlet", "no_such_play"]), "data.heldout_plays.1"),
    (_set("trian", {}), "trian"),
    (_set("eval.cache_policies", [{"policy": "window", "window": 8, "sinks": 4}]), "eval.cache_policies.0.sinks"),
    (_set("eval.cache_policies", [{"policy": "streaming", "window": [8, 0], "sinks": 4}]),
     "eval.cache_policies.0.window"),
    (_set("eval.cache_policies", [{"policy": "window", "window": 8, "points": ["swa.window6"]}]),
     "eval.cache_policies.0.points.0"),
    (_set("eval.cache_policies", [{"policy": "window", "window": 8, "points": ["mhaa"]}]),
     "eval.cache_policies.0.points.0"),
    (_set("eval.cache_policies", [{"policy": "window", "window": [8, 8]}]), "eval.cache_policies"),
    (_set("eval.cache_policies", [{"policy": "evict", "window": 8}]), "eval.cache_policies.0.policy"),
    (lambda d: (_set("compute.workers_per_run", 3)(d), d["variants"].pop("tensor_cache_from_mha"),
                d["variants"].pop("swa_from_mha")), "train.batch_size"),
    (_set("compute.workers_per_run", 0), "compute.workers_per_run"),
    (_set("compute.storage", "file://relative/ckpts"), "compute.storage"),
    (_set("compute.storage", "ftp://host/ckpts"), "compute.storage"),
    (_set("compute.resources", {"CPU": 1}), "compute.resources"),
    (_set("compute.resources", {"node2": 1.5}), "compute.resources.node2"),
    (_set("compute.resources", {"node2": 0}), "compute.resources.node2"),
])
def test_error_names_the_field(mutate, field):
    raw = copy.deepcopy(DEFAULT)
    mutate(raw)
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert str(err.value).startswith(f"{field}: "), str(err.value)


BAD_FILES = {
    "rank": ("variants:\n  tpa: {kind: tpa, rank_k: 0}\n", "params.yaml: variants.tpa.rank_k: "),
    "kind": ("variants:\n  x: {kind: nope}\n", "params.yaml: variants.x.kind: unknown attention kind"),
    "window": ("variants:\n  swa: {kind: swa, window: 64}\ntrain: {seq_len: 32}\n",
               "params.yaml: variants.swa.window: 64 is not shorter than train.seq_len=32"),
    "type": ("variants: {mha: {kind: mha}}\ntrain: {steps: lots}\n", "params.yaml: train.steps: "),
    "yaml": ("variants: [unclosed\n", "params.yaml: not valid YAML"),
    "task": ("variants: {mha: {kind: mha}}\neval: {lm_eval_tasks: [kvf_passkey_mc, kvf_paskey]}\n",
             "params.yaml: eval.lm_eval_tasks.1: unknown task 'kvf_paskey' (known: kvf_kv_retrieval,"),
}


@pytest.mark.parametrize("stage, case", [("train", "rank"), ("train", "kind"), ("train", "window"),
                                         ("prepare", "type"), ("prepare", "yaml"), ("evaluate", "task")])
def test_bad_file_stops_stage_before_any_work(tmp_path, stage, case):
    text, message = BAD_FILES[case]
    (tmp_path / "params.yaml").write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_stage(tmp_path, stage, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    # nothing written: no data/, checkpoints/, metrics/, no mlflow.db (so no MLflow run)
    assert sorted(p.name for p in tmp_path.iterdir()) == before == ["params.yaml"]


def test_tiny_params_are_valid(tmp_path):
    write_params(tmp_path)
    params = load_params(tmp_path / "params.yaml")
    assert params.train.steps == TINY["train"]["steps"]


def test_gpu_config_is_valid():
    params = load_params(REPO / "configs" / "gpu.yaml")
    assert params.data.mqar.pair_tokens == 2 and params.train.precision == "bf16"
    far_lo = params.data.mqar.eval_gaps["far"][0]
    windows = [p.attention["window"] for p in params.points.values() if "window" in p.attention]
    assert far_lo > params.model["n_layers"] * max(windows)
    assert len(params.lrs) >= 2 and len(params.train.seeds) == 3 and params.match_params is not None
    assert params.points["swa_from_mha"].steps * 5 == params.train.steps  # a fifth, as in params.yaml
    for name in params.points:
        params.model_config_for(name)  # builds


def test_seeds_config_is_valid():
    """configs/seeds-cpu.yaml: every new kind (delta write, sinks, Infini) swept, not run here."""
    params = load_params(REPO / "configs" / "seeds-cpu.yaml")
    kinds = {(p.attention["kind"], p.attention.get("write"), p.attention.get("sinks"), p.attention.get("update"))
             for p in params.points.values()}
    assert ("tensor_cache", "delta", None, None) in kinds and ("swa", None, 4, None) in kinds
    assert ("tensor_cache", "exact", 4, None) in kinds and ("infini", None, None, "delta") in kinds
    for name in params.points:
        params.model_config_for(name)  # builds
