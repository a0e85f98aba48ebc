"""Sweeps: lists in a variant or in train.lr expand into named runs; parameter matching."""
import copy

import pytest
import torch
import yaml

from models import ModelConfig, build_model
from pipeline.core.params import ParamsError, parse_params
from pipeline.core.runs import train_job
from tests.studies import REPO

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def _study(variants, **train):
    raw = copy.deepcopy(DEFAULT)
    raw["variants"] = variants
    raw["eval"].pop("cache_policies")  # they name the mha point
    raw.pop("match_params")
    raw["train"].update(train)
    return parse_params(raw)


def test_every_combination_is_one_named_point_in_list_order():
    params = _study({"mha": {"kind": "mha"},
                     "tpa": {"kind": "tpa", "rank_q": 4, "rank_k": [2, 1], "rank_v": [1, 2]}})
    assert list(params.points) == ["mha", "tpa.rank_k2.rank_v1", "tpa.rank_k2.rank_v2",
                                   "tpa.rank_k1.rank_v1", "tpa.rank_k1.rank_v2"]
    point = params.points["tpa.rank_k1.rank_v2"]
    assert point.family == "tpa" and point.knobs == {"rank_k": 1, "rank_v": 2}
    cfg = params.model_config_for("tpa.rank_k1.rank_v2").attention
    assert (cfg.rank_q, cfg.rank_k, cfg.rank_v) == (4, 1, 2)
    assert params.points["mha"].knobs == {}


def test_rates_and_seeds_name_runs_and_keys():
    params = _study({"swa": {"kind": "swa", "window": [4, 8]}}, lr=[3e-3, 1e-2], seeds=[5, 6])
    runs = params.runs()
    assert [r.name for r in runs] == [
        "swa.window4", "swa.window4.seed6", "swa.window4.lr0.01", "swa.window4.lr0.01.seed6",
        "swa.window8", "swa.window8.seed6", "swa.window8.lr0.01", "swa.window8.lr0.01.seed6"]
    assert [r.key for r in runs] == ["swa.window4", "swa.window4.seed6"] * 2 + ["swa.window8", "swa.window8.seed6"] * 2
    assert {r.lr for r in runs} == {3e-3, 1e-2} and {r.family for r in runs} == {"swa"}


def test_a_sweep_value_error_names_the_field_and_the_value():
    with pytest.raises(ParamsError, match=r"^variants\.swa\.window: .*\(sweep point swa\.window0\)"):
        _study({"swa": {"kind": "swa", "window": [8, 0]}})
    with pytest.raises(ParamsError, match=r"^variants\.swa\.window: 200 is not shorter than .*swa\.window200"):
        _study({"swa": {"kind": "swa", "window": [8, 200]}})


def test_growing_a_sweep_leaves_the_other_runs_fingerprints_alone(tmp_path):
    small = _study({"swa": {"kind": "swa", "window": [4, 8]}}, lr=[3e-3])
    big = _study({"swa": {"kind": "swa", "window": [4, 8, 16]}}, lr=[3e-3, 1e-2])

    def prints(params):
        return {r.name: train_job(params, r, "code", tmp_path, tmp_path, {}).fingerprint for r in params.runs()}

    before, after = prints(small), prints(big)
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {"swa.window16", "swa.window4.lr0.01", "swa.window8.lr0.01",
                                        "swa.window16.lr0.01"}
    job = train_job(big, big.runs()[1], "code", tmp_path, tmp_path, {})
    assert job.train.lr == 1e-2 and job.train.seeds == [0]


def test_matched_points_have_the_reference_parameter_count():
    """Counted on real models built from the resolved configs, not by the matching arithmetic."""
    raw = copy.deepcopy(DEFAULT)
    params = parse_params(raw)
    def count(cfg: ModelConfig) -> int:
        return sum(p.numel() for p in build_model(cfg).parameters())

    target = count(ModelConfig(**params.model, attention={"kind": "mha"}))  # vocab_size resolved
    unmatched = {}
    for name, point in params.points.items():
        n = count(params.model_config_for(name))
        assert abs(n - target) <= 0.05 * target, (name, n, target)
        unmatched[name] = count(ModelConfig(**params.model, attention=point.attention))
    # the matching did something: some points were more than 3 % off before
    assert max(abs(n - target) / target for n in unmatched.values()) > 0.03


def test_matching_works_both_ways_and_names_a_point_outside_tolerance():
    raw = copy.deepcopy(DEFAULT)
    raw["variants"] = {"tiny": {"kind": "mqa"}, "mha": {"kind": "mha"}}
    raw["match_params"] = {"reference": "tiny"}
    raw["model"]["d_model"] = 64
    params = parse_params(raw)  # MHA shrinks its MLP to match MQA: possible
    assert params.model_config_for("mha").mlp_hidden < params.model_config_for("tiny").mlp_hidden
    raw["match_params"] = {"reference": "mha", "tolerance": 0.0001}
    raw["variants"]["mla"] = {"kind": "mla", "kv_lora_rank": 2, "rope_dim": 2}
    with pytest.raises(ParamsError, match=r"^match_params\.tolerance: "):
        parse_params(raw)


def test_meta_count_equals_a_real_model():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, attention={"kind": "tensor_cache", "window": 4})
    from pipeline.core.sweep import count_parameters

    assert count_parameters({"d_model": 32, "n_layers": 2, "n_heads": 4}, {"kind": "tensor_cache", "window": 4}) \
        == sum(p.numel() for p in build_model(cfg).parameters())
    assert torch.get_default_device().type == "cpu"
