"""The GPU benchmark's window-attention table runs as it stands (tiny sizes, CPU interpreter)."""
import os
import subprocess
import sys
from pathlib import Path

from ..helpers import needs_triton

REPO = Path(__file__).resolve().parents[2]


@needs_triton
def test_window_table_smoke():
    cmd = [sys.executable, "benchmarks/gpu_kernels.py", "--smoke", "--tables", "window"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    rows = {line.split(" | ")[2]: line.split(" | ")[-2:] for line in out.splitlines()
            if line.startswith("| 40 |")}
    for method in ("Triton (kernels/window_attention)", "SDPA per query block (torch blocked form)",
                   "SDPA, T x T band mask (KV repeated per head)"):
        err_o, err_dk = (float(x.strip(" |")) for x in rows[method])
        assert err_o <= 1e-5 and err_dk <= 1e-5, (method, err_o, err_dk)
