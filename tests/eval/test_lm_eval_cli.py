"""The stock `lm_eval` command runs offline on an export with the project's tasks."""
import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def test_stock_lm_eval_cli(exports, tmp_path):
    root, _ = exports
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={root / 'hf' / 'tensor_cache'},trust_remote_code=True",
           "--include_path", "pipeline/tasks", "--tasks", "kvf_passkey,kvf_multi_needle_mc",
           "--device", "cpu", "--limit", "2", "--metadata", json.dumps({"context_lengths": [256]}),
           "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert set(results) == {"kvf_passkey", "kvf_multi_needle_mc"}
    assert 0.0 <= results["kvf_passkey"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["kvf_multi_needle_mc"]["acc,none"] <= 1.0
