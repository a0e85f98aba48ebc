"""Best over learning rate: chosen per point and seed on the train stage's validation objective."""
import copy
import math
import random

import pytest
import yaml

from pipeline.core import checkpoint, selection
from pipeline.core.params import parse_params
from tests.studies import REPO

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def test_choose_takes_the_lowest_finite_objective_and_the_first_of_ties():
    assert selection.choose({1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.7}) == 3e-3
    assert selection.choose({1e-3: float("nan"), 3e-3: 9.0}) == 3e-3
    assert selection.choose({1e-2: 1.0, 1e-3: 1.0}) == 1e-2  # written first
    with pytest.raises(ValueError):
        selection.choose({1e-3: float("nan")})


def test_select_reads_only_validation_metrics(monkeypatch, tmp_path):
    raw = copy.deepcopy(DEFAULT)
    raw["variants"] = {"swa": {"kind": "swa", "window": [4, 8]}}
    raw["eval"].pop("cache_policies")  # they name the mha point
    raw.pop("match_params")
    raw["train"].update(lr=[1e-3, 3e-3, 1e-2], seeds=[0, 1])
    params = parse_params(raw)
    rng = random.Random(7)
    # fresh random objectives; "eval/..." numbers that would pick another rate are present too
    metas = {r.name: {"metrics": {"val/objective": rng.uniform(1, 3), "eval/mqar": rng.random()},
                      "fingerprint": "f"} for r in params.runs()}
    monkeypatch.setattr(checkpoint, "load_final_meta", lambda path, check=True: metas[path.name])
    chosen = selection.select(params, tmp_path)
    assert list(chosen) == ["swa.window4", "swa.window4.seed1", "swa.window8", "swa.window8.seed1"]
    for key, (run, candidates) in chosen.items():
        mine = {r.lr: metas[r.name]["metrics"]["val/objective"] for r in params.runs() if r.key == key}
        assert candidates == mine
        assert run.key == key and run.lr == min(mine, key=mine.get)  # computed here, independently
        assert not math.isnan(candidates[run.lr])


def test_select_names_a_missing_checkpoint(monkeypatch, tmp_path):
    raw = copy.deepcopy(DEFAULT)
    raw["variants"] = {"mha": {"kind": "mha"}}
    raw.pop("match_params")
    params = parse_params(raw)
    monkeypatch.setattr(checkpoint, "load_final_meta", lambda path, check=True: None)
    with pytest.raises(FileNotFoundError, match="mha: no completed checkpoint"):
        selection.select(params, tmp_path)
