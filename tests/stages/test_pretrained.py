"""A study with a pretrained point (issue 33), every stage on a tiny random Llama folder: the
study's tokenizer is the checkpoint's, the point's run reads the weights unchanged and validates
once, retrofits of it (SWA with sinks; Tensor Cache with the delta write) train their attention
alone, a window policy cuts its cache at inference and runs the lm-eval tasks under the policy,
and the report draws the retrieval heatmaps and says how much comes through L2."""
import json
import re

import torch
import yaml
from safetensors.torch import load_file

from models.pretrained import load_pretrained
from pipeline.core import checkpoint, tokenizer
from tests.pretrained import tiny_llama_dir
from tests.studies import TINY, run_stage, write_params


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_a_pretrained_point_its_policies_and_retrofits_through_every_stage(tmp_path):
    source = tiny_llama_dir(tmp_path / "tiny-llama")
    root = tmp_path / "study"
    root.mkdir()
    params = write_params(root, {
        "train": {**TINY["train"], "trainable": "attention", "mixture": {"lm": 1.0, "mqar": 0.0}},
        "eval": {"context_lengths": [32, 64], "mqar_pairs": [2], "mqar_examples": 8, "bpb_tokens": 256,
                 "lm_eval_tasks": ["kvf_passkey_mc"], "task_context_lengths": [256], "limit": 3,
                 "decode_lengths": [64], "decode_new_tokens": 2,
                 "cache_policies": [{"policy": "window", "window": [4], "points": ["tiny"]}]},
    })
    params["variants"] = {  # the pretrained point and its retrofits alone
        "tiny": {"pretrained": str(source)},
        "tiny_swa": {"kind": "swa", "window": 4, "sinks": 2, "init_from": "tiny", "steps": 6},
        "tiny_tc": {"kind": "tensor_cache", "window": 4, "chunk_size": 8, "write": "delta", "gate_init": -4.0,
                    "init_from": "tiny", "steps": 6}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _ok(run_stage(root, "prepare"))
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["name"] == "pretrained"
    ours, theirs = tokenizer.load_local(root / "data" / "tokenizer"), tokenizer.load_local(source)
    text = "To be, or not to be, that is the question:"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] and len(ours) == len(theirs)

    out = _ok(run_stage(root, "train", timeout=600)).stdout
    final = checkpoint.load_final_meta(root / "checkpoints" / "tiny")
    assert [r["step"] for r in final["history"]] == [0] and "val/bpb" in final["history"][0]
    assert not list((root / "checkpoints" / "tiny").glob("step-*"))  # nothing to resume
    read, _ = load_pretrained(source, tokenizer=False)
    saved = load_file(root / "checkpoints" / "tiny" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in read.state_dict().items())  # the weights, unchanged
    for child in ("tiny_swa", "tiny_tc"):
        trained = load_file(root / "checkpoints" / child / "model.safetensors")
        for name, weight in saved.items():
            if name in trained and ".attn." not in name:  # frozen: embeddings, norms, MLP
                assert torch.equal(trained[name], weight), (child, name)
        assert not torch.equal(trained["blocks.0.attn.q_proj.weight"], saved["blocks.0.attn.q_proj.weight"])
        assert trained["blocks.0.attn.k_proj.weight"].shape == (2 * 8, 32)  # the parent's 2 KV heads kept
    assert "tiny_tc: step 6/6" in out or "tiny_tc: val/bpb" in out
    again = _ok(run_stage(root, "train")).stdout
    assert all(f"[train] {n}: unchanged" in again for n in ("tiny", "tiny_swa", "tiny_tc")), again

    _ok(run_stage(root, "export", timeout=300))
    _ok(run_stage(root, "evaluate", timeout=900))
    results = root / "results" / "eval"
    policy = json.loads((results / "tiny+window4.json").read_text())
    cells = policy["lm_eval"]["by_cell"]
    # the study's task settings reach the tasks: 256-byte contexts, the evidence at TINY's distance 0.5
    assert [(c["task"], c["context_len"], c["depth"]) for c in cells] == [("kvf_passkey_mc", 256, 0.5)]
    assert cells[0]["n"] == 1 and 0 <= cells[0]["score"] <= 1  # TINY's one episode per cell
    tc = json.loads((results / "tiny_tc.json").read_text())
    assert set(tc["l2_off"]) == {"bpb", "bpb_windows", "mqar"} and tc["l2_off"]["bpb"] != tc["bpb"]
    assert "l2_off" not in json.loads((results / "tiny_swa.json").read_text())

    _ok(run_stage(root, "report"))
    report = (root / "report" / "frontier.md").read_text()
    assert "## Retrieval (lm-eval)" in report and "## Does L2 carry anything?" in report
    assert re.search(r"\| tiny \| tiny \| gqa \| .* \| 0 \(pretrained\) \|", report)
    assert (root / "report" / "retrieval.png").stat().st_size > 10_000
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert "tokenizer" not in params["data"]  # the study's tokenizer came from its pretrained point
