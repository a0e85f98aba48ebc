"""Exports load with only torch + transformers and reproduce `models` exactly."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pipeline.core import tokenizer

from ..conftest import KINDS, REPO

# Runs in a fresh interpreter without the repo's packages: the export must carry its code.
LOADER = r"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if p not in ("", REPO)]
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = torch.tensor([tok("To be, or not to be", add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    out[name] = {"ids": ids[0].tolist(), "logits": logits[0].tolist(), "generated": gen[0].tolist(),
                 "repo_modules": [m for m in ("models", "kernels", "pipeline") if m in sys.modules],
                 "vocab": len(tok), "config": model.config.num_hidden_layers}
print(json.dumps(out))
""".replace("REPO", repr(str(REPO)))


def test_export_round_trip_without_repo(exports, tmp_path):
    root, models = exports
    paths = {name: str(root / "hf" / name) for name in models}
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(paths)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name, model in models.items():
        got = out[name]
        assert got["repo_modules"] == [], f"{name}: the export imported the repo's packages"
        assert got["vocab"] == 259 and got["config"] == 2
        ids = torch.tensor([got["ids"]])
        assert got["ids"] == tokenizer.encode("To be, or not to be").tolist()
        with torch.no_grad():
            torch.testing.assert_close(torch.tensor(got["logits"]), model(ids)[0], rtol=1e-5, atol=1e-5)
        assert got["generated"] == model.generate(ids, max_new_tokens=12)[0].tolist(), name


def test_generate_keeps_the_variant_cache(exports):
    from pipeline.export.hf.modeling_kvf import CACHE_FIELD, KVFCache, KVFForCausalLM

    root, models = exports
    hf = KVFForCausalLM.from_pretrained(root / "hf" / "tensor_cache").eval()
    ids = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = getattr(hf(ids, use_cache=True), CACHE_FIELD)
    assert isinstance(cache, KVFCache)
    # ring (2 layers x k,v x 4 kv heads x window 5 x d_h 8) + L2 (2 layers x 4 heads x 8 x 8), fp32
    assert cache.nbytes() == 4 * (2 * 2 * 4 * 5 * 8 + 2 * 4 * 8 * 8)
    gen = hf.generate(ids, max_new_tokens=20, do_sample=False)
    assert gen[0].tolist() == models["tensor_cache"].generate(ids, 20)[0].tolist()


@pytest.mark.parametrize("prompt_len", [3, 19])  # inside, and past, the windows (5) and chunks (4)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_generate_decodes_one_token_per_step_into_one_cache(exports, kind, prompt_len):
    """generate() feeds the prompt once, then exactly one new token per step into the SAME
    variant cache, and picks the tokens `models` greedy decoding picks; for exact kinds each is
    also the argmax of a no-cache forward over everything before it (so a cache that is lost or
    rebuilt between steps fails here whatever the transformers version)."""
    from pipeline.export.hf.modeling_kvf import KVFCache, KVFForCausalLM

    root, models = exports
    new_tokens = 10
    hf = KVFForCausalLM.from_pretrained(root / "hf" / kind).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    calls = []
    inner = hf.model.forward

    def spy(input_ids, cache=None):
        calls.append((input_ids.shape[1], cache, None if cache is None else cache.seq_len))
        return inner(input_ids, cache=cache)

    hf.model.forward = spy
    ids = torch.randint(3, 259, (1, prompt_len))  # fresh every run
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    assert gen.shape == (1, prompt_len + new_tokens)
    assert gen[0].tolist() == models[kind].generate(ids, new_tokens)[0].tolist(), kind

    assert len(calls) == new_tokens, "one forward for the prompt, then one per new token"
    first_cache = calls[0][1]
    assert first_cache is not None and not isinstance(first_cache, KVFCache)  # the models cache
    for step, (fed, cache, seen) in enumerate(calls):
        assert cache is first_cache, f"{kind}: step {step} got another cache object"
        assert fed == (prompt_len if step == 0 else 1), f"{kind}: step {step} fed {fed} tokens"
        assert seen == (0 if step == 0 else prompt_len + step - 1), f"{kind}: step {step} cache at {seen}"
    assert first_cache.seq_len == prompt_len + new_tokens - 1
    # the variant's own cache, at its own size (a bounded one stays bounded)
    assert first_cache.nbytes() == models[kind].cache_nbytes(first_cache.seq_len), kind

    if "chunk_mean" not in kind:  # the ablation's parallel forward differs from decode by design
        with torch.no_grad():
            logits = inner(gen)[0]
        for j in range(prompt_len, gen.shape[1]):
            row = logits[j - 1]
            assert row[gen[0, j]] >= row.max() - 1e-4, f"{kind}: token {j} is not the argmax"


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("policy", [{"policy": "window", "window": 4, "sinks": 0},
                                    {"policy": "streaming", "window": 3, "sinks": 2}])
def test_an_export_runs_under_a_cache_policy_as_the_model_decodes_under_it(exports, kind, policy):
    """With `kvf_policy` (what `lm_eval --model_args ...,kvf_policy=window,kvf_window=4` sets), a
    forward without a cache scores every token as `models` decoding one token at a time through
    the policy's cache does, and generate() continues as it does; without them, the model as trained."""
    from models import CachePolicy
    from pipeline.export.hf.modeling_kvf import KVFForCausalLM

    root, models = exports
    cut = CachePolicy(**policy)
    hf = KVFForCausalLM.from_pretrained(root / "hf" / kind, kvf_policy=policy["policy"], kvf_window=policy["window"],
                                        kvf_sinks=policy["sinks"]).eval()
    plain = KVFForCausalLM.from_pretrained(root / "hf" / kind).eval()
    ids = torch.randint(3, 259, (1, 23))  # fresh every run; past sinks + window
    model = models[kind]
    with torch.no_grad():
        cache = model.init_cache(1, policy=cut)
        want = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)
        got = hf(ids).logits
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
        assert float((plain(ids).logits - want).abs().max() / want.abs().max()) > 1e-2  # the policy changes it
        hf.generation_config.eos_token_id = None
        gen = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
        cache, new = model.init_cache(1, policy=cut), []
        last = model(ids, cache=cache)[:, -1]
        for _ in range(6):
            new.append(int(last.argmax()))
            last = model(torch.tensor([[new[-1]]]), cache=cache)[:, -1]
    assert gen == new


def test_export_records_versions_and_warns_across_majors(exports, tmp_path):
    import transformers
    from transformers import AutoConfig

    root, _ = exports
    card = json.loads((root / "hf" / "mha" / "kvf_export.json").read_text())
    assert card["made_with"] == {"torch": torch.__version__, "transformers": transformers.__version__}
    config = json.loads((root / "hf" / "mha" / "config.json").read_text())
    assert config["kvf_versions"] == card["made_with"]
    shutil.copytree(root / "hf" / "mha", tmp_path / "old")
    config["kvf_versions"]["transformers"] = "4.57.1"
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="transformers 4.57.1"):
        AutoConfig.from_pretrained(tmp_path / "old", trust_remote_code=True)


def test_export_weights_are_the_checkpoints_file(exports):
    """One copy of the weights for DVC's content-addressed cache: the export's file is the
    checkpoint's, byte for byte (and the round trip above reads it as the model)."""
    root, models = exports
    for name in models:
        assert (root / "hf" / name / "model.safetensors").read_bytes() == \
            (root / "ckpt" / name / "model.safetensors").read_bytes(), name


def test_export_files_and_card(exports):
    root, _ = exports
    d = root / "hf" / "tpa"
    config = json.loads((d / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_kvf.KVFConfig",
                                  "AutoModelForCausalLM": "modeling_kvf.KVFForCausalLM"}
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (2, 32, 259)
    assert "models/lm.py" in (d / "kvf_bundle.py").read_text()
    card = json.loads((d / "kvf_export.json").read_text())
    # TPA caches (R_k + R_v) * (h + d_h) = 4 * 12 elements per token per layer, 2 layers, fp32
    assert card["cache_bytes_per_token_at_32k"] == 4 * 12 * 2 * 4
    assert card["state_bytes_32k"] == 4 * 12 * 2 * 4 * 32768


def test_tokenizer_matches_pipeline(exports):
    from transformers import AutoTokenizer

    root, _ = exports
    tok = AutoTokenizer.from_pretrained(root / "hf" / "mla", trust_remote_code=True)
    text = "Thou art more lovely — and more temperate\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == tokenizer.encode(text).tolist()
    # with the defaults too, as lm-eval's HF model encodes: a text is its bytes, no `</s>` after them
    assert tok(text).input_ids == tok.encode(text) == tok([text]).input_ids[0] == ids
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.decode(ids) == text == tokenizer.decode(ids)
    # an id past the bytes (MQAR's own ids, which a model may hold) decodes as <unk>, never raises
    assert tok.decode(ids[:3] + [tokenizer.VOCAB_SIZE + 40] + ids[3:5]) == text[:3] + "<unk>" + text[3:5]
