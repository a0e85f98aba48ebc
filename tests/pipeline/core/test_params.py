"""Malformed params stop every stage before any work: exit 2, one line naming the field."""
import copy

import pytest
import yaml

from pipeline.core.params import ParamsError, load_params, parse_params
from tests.studies import REPO, TINY, run_stage, write_params

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def test_default_params_are_valid_and_typed():
    params = load_params(REPO / "params.yaml")
    assert set(params.variants) == {"mha", "tpa", "swa", "linear", "tensor_cache"}
    assert params.compute.gpus_per_job == "auto" and params.tracking.uri is None
    assert [run.name for run in params.runs()] == list(params.points)  # one seed, one rate
    assert params.match_params.reference == "mha"
    # the claims' pairs: Tensor Cache and SWA at one window, Tensor Cache and linear at one head width
    assert params.points["tensor_cache"].attention["window"] == params.points["swa"].attention["window"]
    assert params.model_config_for("tensor_cache").d_head == params.model_config_for("linear").d_head
    # MQAR with ids of its own: more pairs than the trained counts, to 4x the largest, beyond every window
    mqar, reach = params.data.mqar, 2 * (16 - 1)  # the W 16 cache policy's reach
    assert mqar.alphabet == "own" and params.model["vocab_size"] == 259 + mqar.n_ids
    assert max(params.eval.capacity_pairs) >= 4 * max(mqar.train_pairs)
    assert mqar.capacity_pairs == params.eval.capacity_pairs and mqar.eval_gaps["far"][0] > reach
    assert params.result_keys()[len(params.points):] == ["mha+window6", "mha+window16"]


def test_frontier_cpu_config_is_valid():
    """configs/frontier-cpu.yaml: the default study's data, widths, training and evaluation at 3
    seeds, its points among them, and a d_head sweep of linear attention and the Tensor Cache
    (issue 34's theory check)."""
    params, default = load_params(REPO / "configs" / "frontier-cpu.yaml"), load_params(REPO / "params.yaml")
    assert params.data == default.data and params.model == default.model and params.eval == default.eval
    assert params.train.model_dump() | {"seeds": [0]} == default.train.model_dump()
    assert len(params.train.seeds) == 3
    assert set(default.points) <= set(params.points) | {"linear", "tensor_cache"}
    heads = {n: params.model_config_for(n).d_head for n in params.points}
    for family in ("linear", "tensor_cache"):
        assert sorted(heads[n] for n in params.points if n.startswith(family + ".d_head")) == [8, 16, 32]
    assert params.points["tensor_cache_from_mha"].init_from == "mha"
    for name in params.points:
        params.model_config_for(name)  # builds


def test_cache_policies_default_to_every_full_attention_point():
    raw = copy.deepcopy(DEFAULT)
    raw["eval"]["cache_policies"] = [{"policy": "streaming", "sinks": 2, "window": 8}]
    raw["train"]["seeds"] = [0, 1]
    raw["variants"]["mqa"] = {"kind": "mqa"}
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
    (_set("match_params.reference", "nope"), "match_params.reference"),
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
    (_set("compute.workers_per_run", 3), "train.batch_size"),
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
    assert {p.attention["kind"] for p in params.points.values() if p.init_from == "smollm2"} >= {
        "swa", "tensor_cache", "mqa"}
    if "smollm2_ft" in params.points:  # the control: the parent's own design, fine-tuned as the retrofits are
        assert params.model_config_for("smollm2_ft") == cfg
    for name in params.points:
        params.model_config_for(name)  # builds


# The tiny study's fingerprints (code "code", no data files) as the code before the MQAR additions
# (`alphabet`, `first_id`, `train_pairs`, `num_queries`, `capacity_pairs`: commit 334609f) gave them.
TINY_FINGERPRINTS = {"mha": "a6b7ee870785d17b", "swa": "21372506acf44278"}


def test_studies_that_do_not_opt_in_keep_their_fingerprints(tmp_path):
    from pipeline.core.runs import train_job

    def prints(raw):
        params = parse_params(copy.deepcopy(raw))
        return {r.name: train_job(params, r, "code", tmp_path, tmp_path, {}).fingerprint for r in params.runs()}

    assert prints(TINY) == TINY_FINGERPRINTS
    spelled = copy.deepcopy(TINY)  # the new fields written out at their defaults: the same study
    spelled["data"]["mqar"].update(alphabet="bytes", first_id=None, train_pairs=None, num_queries=None,
                                   capacity_pairs=[])
    assert prints(spelled) == TINY_FINGERPRINTS
    opted = copy.deepcopy(TINY)
    opted["data"]["mqar"]["capacity_pairs"] = [1, 2]
    assert set(prints(opted).values()).isdisjoint(TINY_FINGERPRINTS.values())


def test_own_mqar_ids_grow_the_vocabulary_after_any_tokenizer():
    raw = copy.deepcopy(DEFAULT)
    raw["model"].pop("vocab_size", None)
    raw["data"]["mqar"].update(alphabet="own", num_keys=64, num_values=8, num_fillers=8)
    params = parse_params(raw)
    mqar = params.data.mqar
    assert (mqar.first_id, mqar.n_ids) == (259, 64 + 8 + 64 * 8 + 8)
    assert params.model["vocab_size"] == 259 + mqar.n_ids == params.model_config_for("mha").vocab_size
    raw["model"]["vocab_size"] = 300
    with pytest.raises(ParamsError, match=r"^model\.vocab_size: 300 does not reach data\.mqar's own ids "
                                         r"\(259\.\.850\)"):
        parse_params(raw)
    raw["model"].pop("vocab_size")
    raw["data"]["mqar"]["first_id"] = 100
    with pytest.raises(ParamsError, match=r"^data\.mqar\.first_id: 100 lies among data\.tokenizer's 259 ids"):
        parse_params(raw)
    raw["data"]["mqar"].pop("first_id")
    raw["data"]["tokenizer"] = {"train": {"vocab_size": 1000}}  # a trained BPE: MQAR ids start after its 1,000
    params = parse_params(raw)
    assert params.data.mqar.first_id == 1000 and params.model["vocab_size"] == 1000 + params.data.mqar.n_ids


def test_vocab_mqar_ids_are_a_run_of_the_tokenizers_own():
    """alphabet vocab: MQAR's ids are the tokenizer's from first_id on (a pretrained model's words); the
    vocabulary does not grow, and a run past the tokenizer's ids or no first_id names the field."""
    raw = copy.deepcopy(DEFAULT)
    raw["model"].pop("vocab_size", None)
    raw["data"]["tokenizer"] = {"train": {"vocab_size": 1000}}
    raw["data"]["mqar"].update(alphabet="vocab", first_id=300, num_keys=64, num_values=8, num_fillers=8)
    params = parse_params(raw)
    assert (params.data.mqar.first_id, params.data.mqar.end_id) == (300, 892) and params.model["vocab_size"] == 1000
    raw["data"]["mqar"]["first_id"] = 500
    with pytest.raises(ParamsError, match=r"^data\.mqar\.first_id: 500 \+ 592 MQAR ids reach past the 1000 ids"):
        parse_params(raw)
    raw["data"]["mqar"].pop("first_id")
    with pytest.raises(ParamsError, match=r"^data\.mqar\.first_id: alphabet vocab takes a run"):
        parse_params(raw)


@pytest.mark.parametrize("mutate, field", [
    (_set("data.mqar.num_keys", 200), "data.mqar.num_fillers"),  # bytes: past the 256 byte ids
    (_set("data.mqar.first_id", 300), "data.mqar.first_id"),     # only with alphabet own or vocab
    (_set("data.mqar.train_pairs", [2, 9]), "data.mqar.train_pairs.1"),
    (_set("data.mqar.train_pairs", []), "data.mqar.train_pairs"),
    (_set("data.mqar.capacity_pairs", [2, 2]), "data.mqar.capacity_pairs"),
    (_set("data.mqar.capacity_pairs", [2, 40]), "data.mqar.capacity_pairs.1"),
    (_set("data.mqar.num_queries", 0), "data.mqar.num_queries"),
    (_set("eval.capacity_pairs", [4, 9]), "eval.capacity_pairs.1"),
])
def test_mqar_additions_name_the_field(mutate, field):
    raw = copy.deepcopy(DEFAULT)  # with the MQAR block studies had before the additions
    raw["data"]["mqar"] = dict(num_keys=8, num_values=16, num_fillers=32, pair_tokens=1, num_pairs=4, seq_len=96,
                               train_gaps=[2, 80], eval_gaps={"near": [2, 10], "far": [40, 80]})
    raw["eval"]["capacity_pairs"] = [1, 2, 4, 6]
    mutate(raw)
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert str(err.value).startswith(f"{field}: "), str(err.value)


def test_a_point_may_set_its_own_head_width():
    """d_head (or n_heads) swept for one family: its points' models have it, the others keep the
    model block's, and each is matched to the reference's parameter count."""
    from models import build_model

    raw = copy.deepcopy(DEFAULT)
    raw["variants"]["linear"] = {"kind": "linear", "chunk_size": 16, "d_head": [8, 32]}
    raw["variants"]["tensor_cache"] = {"kind": "tensor_cache", "window": 6, "n_heads": 2}
    params = parse_params(raw)
    assert [n for n in params.points if n.startswith(("linear", "tensor_cache."))] == ["linear.d_head8",
                                                                                      "linear.d_head32"]
    widths = {n: (c.n_heads, c.d_head) for n in params.points for c in [params.model_config_for(n)]}
    assert widths["linear.d_head8"] == (4, 8) and widths["linear.d_head32"] == (4, 32)
    assert widths["tensor_cache"] == (2, 32) and widths["mha"] == (4, 16)
    target = sum(p.numel() for p in build_model(params.model_config_for("mha")).parameters())
    for name in ("linear.d_head8", "linear.d_head32", "tensor_cache"):
        count = sum(p.numel() for p in build_model(params.model_config_for(name)).parameters())
        assert abs(count / target - 1) <= params.match_params.tolerance
    raw["variants"]["swa_from_mha"] = {"kind": "swa", "window": 6, "init_from": "mha", "steps": 120, "d_head": 8}
    with pytest.raises(ParamsError, match=r"^variants\.swa_from_mha\.init_from: "):  # a retrofit keeps its widths
        parse_params(raw)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_holds_every_block_dvc_reads(config):
    """`dvc repro` refuses a params file without a block a stage lists (`model`, `match_params`...),
    before parsing it: every config a user may copy to params.yaml holds them all."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    wanted = {p.split(".")[0] for stage in stages.values() for p in stage.get("params", [])}
    raw = yaml.safe_load((REPO / "configs" / config).read_text())
    assert wanted <= set(raw), f"configs/{config} lacks {sorted(wanted - set(raw))}"
