"""The real SmolLM2-135M-Instruct (the packaged Q4_1 GGUF) through our loader, against transformers'
own GGUF read of the same file (its de-quantization and un-permutation, not ours). The weights
are read once per test run: one module, one xdist worker, module-scoped fixtures."""
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.pretrained import HF, from_state, load_pretrained, model_config, save_pretrained_dir, source_path

from ..helpers import rel_err

pytestmark = pytest.mark.xdist_group("smollm2")  # one worker; the weights read once a run (session scope)
PROMPT = "The capital of France is Paris. The capital of Italy is"
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
        "that loured upon our house in the deep bosom of the ocean buried.")


@pytest.fixture(scope="session")
def ours():
    return load_pretrained("smollm2-135m")  # (model, tokenizer)


@pytest.fixture(scope="session")
def reference():
    path = source_path("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_weights_equal_transformers_read_mapped_by_the_same_table(ours, reference):
    model, _ = ours
    cfg = model_config(reference.config.to_dict())
    assert model.config == cfg
    widths = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.attention.n_kv_heads, cfg.d_head, cfg.vocab_size)
    assert widths == (30, 576, 9, 3, 64, 49152)
    assert cfg.attention.kind == "gqa" and cfg.tie_embeddings and cfg.rope_base == 100000.0
    mapped = from_state(cfg, reference.state_dict(), HF).state_dict()
    got = model.state_dict()
    assert got.keys() == mapped.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, mapped[name]), name


@pytest.mark.parametrize("text", [PROMPT, TEXT], ids=["capitals", "richard3"])
def test_logits_equal_transformers(ours, reference, text):
    model, tokenizer = ours
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 10
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
        got = model(ids)
    assert rel_err(got, want) <= 1e-4, rel_err(got, want)


def test_greedy_continuation_names_rome(ours):
    model, tokenizer = ours
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Rome")


def test_converted_directory_loads_back_equal(ours, tmp_path):
    model, tokenizer = ours
    path = save_pretrained_dir(model, tokenizer, tmp_path / "smollm2-135m")
    start = time.perf_counter()
    back, back_tokenizer = load_pretrained(path)
    seconds = time.perf_counter() - start
    print(f"converted directory loaded in {seconds:.1f} s")
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back_tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
