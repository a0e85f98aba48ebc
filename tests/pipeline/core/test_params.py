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


# --- a pretrained point (issue 33) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.pretrained import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("llama") / "tiny")


def _pretrained_study(source, **blocks):
    raw = copy.deepcopy({k: v for k, v in TINY.items() if k not in ("compute", "tracking")})
    raw["variants"] = {"tiny": {"pretrained": str(source)},
                       "tiny_swa": {"kind": "swa", "window": 4, "init_from": "tiny", "steps": 6},
                       "tiny_mqa": {"kind": "mqa", "init_from": "tiny", "steps": 6}}
    raw["train"] = {**raw["train"], "lr": [1e-3, 3e-3], "seeds": [0, 1]}
    for block, value in blocks.items():
        raw[block] = value
    return raw


def test_a_pretrained_point_takes_its_config_and_tokenizer_from_its_checkpoint(llama_dir):
    import json

    from models.pretrained import read_config

    params = parse_params(_pretrained_study(llama_dir))
    hf = json.loads((llama_dir / "config.json").read_text())
    cfg = params.model_config_for("tiny")
    assert cfg == read_config(llama_dir) and cfg.n_layers == hf["num_hidden_layers"] == 2
    assert (cfg.attention.kind, cfg.attention.n_kv_heads) == ("gqa", hf["num_key_value_heads"])
    assert params.data.tokenizer.pretrained == str(llama_dir) and params.data.tokenizer.n_ids == hf["vocab_size"]
    # a retrofit keeps every width and, into a window, the parent's KV heads (not one per query head)
    swa = params.model_config_for("tiny_swa")
    assert swa.model_dump(exclude={"attention"}) == cfg.model_dump(exclude={"attention"})
    assert (swa.attention.kind, swa.attention.n_kv_heads) == ("swa", 2)
    assert params.model_config_for("tiny_mqa").attention.n_kv_heads == 1
    # one run (nothing of it is trained or drawn), its train block of no steps; every child run
    # starts from it, whatever its seed and rate
    assert [r.name for r in params.runs() if r.variant == "tiny"] == ["tiny"]
    assert params.train_for("tiny").steps == 0 and params.train_for("tiny_swa").steps == 6
    children = [r for r in params.runs() if r.variant == "tiny_swa"]
    assert len(children) == 4 and all([p.name for p in params.parent_runs(r)] == ["tiny"] for r in children)


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["variants"]["tiny"].update(window=4),
     "variants.tiny.window: a pretrained point takes its config from its checkpoint"),
    (lambda raw: raw["variants"]["tiny"].update(pretrained="no/such/folder"),
     "variants.tiny.pretrained: no/such/folder is neither a .gguf file"),
    (lambda raw: raw["data"].update(tokenizer="bytes"),
     "data.tokenizer: the study's tokenizer is its pretrained point's"),
    (lambda raw: raw.update(match_params={"reference": "tiny"}),
     "match_params.reference: tiny is pretrained"),
    (lambda raw: raw["variants"].update(tiny_big={"kind": "swa", "window": 4, "d_model": 64, "init_from": "tiny"}),
     "variants.tiny_big.d_model"),
    (lambda raw: raw["train"].update(steps=0), "train.steps: must be >= 1"),
])
def test_a_pretrained_study_refuses_what_it_cannot_be(llama_dir, change, message):
    raw = _pretrained_study(llama_dir)
    change(raw)
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("config", ["smollm2-cpu.yaml", "smollm2-gpu.yaml"])
def test_smollm2_configs_are_valid(config):
    """configs/smollm2-*.yaml: the packaged SmolLM2-135M (its header read, no weights), its
    policies at three windows and more, and its retrofits."""
    params = load_params(REPO / "configs" / config)
    cfg = params.model_config_for("smollm2")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.attention.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert len({policy.window for _, policy in params.policy_points()}) >= 3
    assert {p.attention["kind"] for p in params.points.values() if p.init_from == "smollm2"} == {
        "swa", "tensor_cache", "mqa"}
    for name in params.points:
        params.model_config_for(name)  # builds
