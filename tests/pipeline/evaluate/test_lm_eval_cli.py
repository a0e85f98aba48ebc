"""The stock `lm_eval` command runs offline on an export with the project's tasks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.core import tokenizer

from ..conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# The kinds added with issue 14, and issue 24's factored window (tensor_cache, the first kind
# through the CLI, has its own test).
NEW_KINDS = ("tensor_cache_delta", "tensor_cache_sinks", "swa_sinks", "infini", "infini_delta", "tpa_kvonly",
             "tensor_cache_factored")


def cli_args(export: Path, tasks: str, out: Path) -> list[str]:
    """The arguments of `lm_eval` on one export: 2 episodes per task at 256 bytes of context."""
    return ["--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
            "--include_path", "pipeline/evaluate/tasks", "--tasks", tasks, "--device", "cpu", "--limit", "2",
            "--metadata", json.dumps({"context_lengths": [256]}), "--output_path", str(out)]


def samples(out: Path, task: str) -> list[dict]:
    """The per-episode records `--log_samples` wrote for `task`."""
    return [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]


def test_stock_lm_eval_cli(exports, tmp_path):
    """The `lm_eval` command on an export: the log-likelihood it gives each choice is what `models`
    gives the choice's bytes after the context's (lm-eval moves the context's trailing spaces into
    the continuation); nothing else is scored and no token is added."""
    root, models = exports
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--log_samples",
           *cli_args(root / "hf" / "tensor_cache", "kvf_passkey,kvf_multi_needle_mc", tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert set(results) == {"kvf_passkey", "kvf_multi_needle_mc"}
    assert 0.0 <= results["kvf_passkey"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["kvf_multi_needle_mc"]["acc,none"] <= 1.0
    episodes = samples(tmp_path / "out", "kvf_multi_needle_mc")
    assert len(episodes) == 2
    for episode in episodes:
        for request, (loglikelihood, _) in zip(episode["arguments"].values(), episode["filtered_resps"]):
            context = request["arg_0"].rstrip()
            ids = torch.as_tensor(tokenizer.encode(request["arg_0"] + request["arg_1"]))[None]
            with torch.no_grad():
                logp = models["tensor_cache"](ids)[0].log_softmax(-1)
            n = len(tokenizer.encode(context))
            want = logp[n - 1 : -1].gather(-1, ids[0, n:, None]).sum()
            assert abs(float(loglikelihood) - float(want)) < 1e-3, f"episode {episode['doc_id']}"


def test_stock_lm_eval_cli_generates_like_models_for_every_new_kind(exports, bpe_export, tmp_path):
    """Each new kind through the stock CLI: what the harness's `generate()` wrote for each passkey
    episode is what `models` greedy decoding writes from the same context. One process runs the
    `lm_eval` script's own entry point, `cli_evaluate()`, once per export (a process per kind would
    spend ~20 s each importing lm-eval and transformers again), lm-eval's index of its ~15k
    built-in task files read once (each call would read them again: 6-12 s here; the first call is
    the stock command's, untouched). Last, an export with a trained BPE tokenizer: the harness
    reads text through that tokenizer, for generation and log-likelihoods."""
    root, models = exports
    runs = [["lm_eval", *cli_args(root / "hf" / kind, "kvf_passkey", tmp_path / kind), "--log_samples"]
            for kind in NEW_KINDS]
    runs.append(["lm_eval", *cli_args(bpe_export[0], "kvf_passkey,kvf_multi_needle_mc", tmp_path / "bpe"),
                 "--log_samples"])
    script = ("import json, sys\nfrom lm_eval.__main__ import cli_evaluate\n"
              "from lm_eval.tasks._index import TaskIndex\n"
              "built, build = {}, TaskIndex.build\n"
              "def once(paths, **kw):\n"
              "    paths = list(paths)\n"
              "    key = (tuple(map(str, paths)), tuple(sorted(kw.items())))\n"
              "    if key not in built:\n        built[key] = build(paths, **kw)\n"
              "    return dict(built[key])\n"
              "TaskIndex.build = staticmethod(once)\n"
              "for argv in json.loads(sys.argv[1]):\n    sys.argv = argv\n    cli_evaluate()\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "hf" / NEW_KINDS[0], trust_remote_code=True)  # the harness's
    for kind in NEW_KINDS:
        episodes = samples(tmp_path / kind, "kvf_passkey")
        assert len(episodes) == 2, kind
        for sample in episodes:
            request = sample["arguments"]["gen_args_0"]
            context, gen_kwargs = request["arg_0"], request["arg_1"]
            ids = torch.as_tensor(tokenizer.encode(context))[None]
            gen = models[kind].generate(ids, gen_kwargs["max_gen_toks"], eos_token_id=tok.eos_token_id)
            want = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split(gen_kwargs["until"][0])[0]
            assert sample["filtered_resps"] == [want], f"{kind}: episode {sample['doc_id']}"
    _check_bpe_export(*bpe_export, tmp_path / "bpe")


def _check_bpe_export(export: Path, model, tok, out: Path) -> None:
    """The BPE export's CLI run: its generations are the model's greedy decode of the BPE ids of
    each context, and each choice's log-likelihood is the model's over the choice's BPE ids."""
    from transformers import AutoTokenizer

    bundled = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    encode = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    text = "What is the pass key? \u00e9t\u00e9 \U0001F600"
    assert len(bundled) == len(tok) == 512 and bundled(text).input_ids == encode(text)
    for sample in samples(out, "kvf_passkey"):
        context, gen_kwargs = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
        ids = torch.as_tensor(encode(context))[None]
        assert ids.shape[1] < len(context.encode())  # BPE ids, not bytes
        gen = model.generate(ids, gen_kwargs["max_gen_toks"], eos_token_id=tok.eos_token_id)
        want = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split(gen_kwargs["until"][0])[0]
        assert sample["filtered_resps"] == [want], f"bpe: episode {sample['doc_id']}"
    for episode in samples(out, "kvf_multi_needle_mc"):
        for request, (loglikelihood, _) in zip(episode["arguments"].values(), episode["filtered_resps"]):
            context = request["arg_0"].rstrip()  # lm-eval moves the context's trailing spaces on
            ids = torch.as_tensor(encode(context + request["arg_0"][len(context):] + request["arg_1"]))[None]
            with torch.no_grad():
                logp = model(ids)[0].log_softmax(-1)
            n = len(encode(context))
            want = logp[n - 1 : -1].gather(-1, ids[0, n:, None]).sum()
            assert abs(float(loglikelihood) - float(want)) < 1e-3, f"bpe: episode {episode['doc_id']}"
