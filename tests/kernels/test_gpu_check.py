"""`make gpu-check`'s script runs as it stands: benchmarks/gpu_check.py --smoke (CPU, Triton
interpreter, tiny sizes) prints every section, and its tables hold values that pass."""
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from ..helpers import needs_triton

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["mha", "gqa", "mla", "tpa", "swa", "linear", "tensor_cache", "tensor_cache_chunk_mean",
            "tensor_cache_factored", "tensor_cache_delta"]


def tables(text: str) -> dict[str, list[list[str]]]:
    """{a '### ' title: its rows as lists of cells, the header and the |---| rule dropped}."""
    out, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
            out[title] = []
        elif line.startswith("| ") and title is not None:
            out[title].append([c.strip() for c in line.strip("|").split("|")])
    return {title: rows[1:] for title, rows in out.items()}


def table(all_tables, start: str):
    (rows,) = [rows for title, rows in all_tables.items() if title.startswith(start)]
    return rows


@needs_triton
def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "tables.md"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    text = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=True).stdout
    assert out.read_text() == text  # the tables file holds what was printed
    assert "skipped: time budget" not in text and "failed:" not in text
    for section in ("## 1. CUDA-only tests", "## 2. Kernel benchmarks", "## 3. The delta write",
                    "## 4. Training per family"):
        assert section in text
    found = tables(text)

    # 1. the CUDA-only tests were found and ran (skipped on a CPU); every kernel within tolerance
    tests = table(found, "CUDA-only tests")
    for name in ("test_l2_scan.py::test_triton_on_gpu_low_precision",
                 "test_tc_decode.py::test_triton_on_gpu_low_precision",
                 "test_tpa_decode.py::test_triton_on_gpu_low_precision",
                 "test_window_attention.py::test_gpu_paths", "test_gated_delta.py::test_fla_path_on_gpu"):
        assert any(name in row[0] for row in tests), name
    assert all(row[1] == "skipped at setup" for row in tests)
    accuracy = table(found, "Triton kernels against")
    assert [row[0].split()[0] for row in accuracy] == ["l2_scan", "window_attention", "tc_decode",
                                                       "tpa_decode"]
    for row in accuracy:
        err, scale, rel, tol = map(float, row[4:8])
        assert row[8] == "PASS" and 0 < scale and rel <= tol == 1e-5, row
        assert math.isclose(err / scale, rel, rel_tol=0.06), row

    # 2. decode (bandwidth against the copy bandwidth measured), scan, fused decode step
    (title,) = [t for t in found if t.startswith("Decode, one query token")]
    copy_gbs = float(re.search(r"copy bandwidth: (\d+) GB/s", title).group(1))
    assert copy_gbs > 0
    for row in table(found, "Decode, one query token"):  # printed rounded: GB/s to 1, fraction to .01
        ms, gbs, fraction = float(row[3]), float(row[4]), float(row[5])
        assert ms > 0 and abs(fraction - gbs / copy_gbs) <= 0.5 / copy_gbs + 0.005, row
    scan = table(found, "L2 evicted-write scan")
    methods = [row[2] for row in scan]
    assert methods[:2] == ["Triton", "torch chunked"]
    if importlib.util.find_spec("fla"):  # fla-core is Linux only; the lock installs it there
        assert methods[2].startswith("fla naive_chunk_simple_gla")
    assert all(float(row[3]) > 0 and float(row[4]) <= 1e-5 for row in scan)
    assert [row[1] for row in table(found, "Tensor Cache decode step")] == [
        "fused step (Triton)", "torch reference"]

    # 3. the delta write: every path within fp32 precision of float64; the dispatch picks torch
    delta = table(found, "Delta write")
    assert delta[0][2].startswith("torch chunked") and delta[0][7] == "yes"
    if importlib.util.find_spec("fla"):
        assert delta[1][2].startswith("fla naive_chunk_gated_delta_rule") and delta[1][7] == ""
    assert all(float(row[4]) <= 1e-5 and float(row[5]) <= 1e-5 for row in delta)

    # 4. tokens/s for every family at both lengths; train_run learned, the two runs agree (on a
    # CPU both are fp32 and train_run is deterministic: equal to the last digit)
    speed = table(found, "Training tokens/s")
    assert sorted((row[0], row[1]) for row in speed) == sorted(
        (f, T) for f in FAMILIES for T in ("32", "64"))
    assert all(float(row[3].replace(",", "")) > 0 and float(row[4].replace(",", "")) > 0
               for row in speed)
    assert "| step | " + " | ".join(FAMILIES) + " |" in text
    curves = table(found, "Training loss, train_run")
    first, last, gap = curves[0], curves[-2], curves[-1]
    assert [row[0] for row in curves[:-1]] == ["5", "10", "15", "20"]
    for i, family in enumerate(FAMILIES, start=1):
        start, end = (float(row[i].split(" / ")[0]) for row in (first, last))
        assert end < start - 0.5, (family, start, end)
        assert float(gap[i]) == 0.0, family
