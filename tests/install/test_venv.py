"""install/venv.py: which torch build `make venv` picks, and what it leaves out for the CPU one."""
import importlib.util
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("kvf_install_venv", REPO / "install" / "venv.py")
venv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(venv)

LOCK = tomllib.loads((REPO / "uv.lock").read_text())
TORCH = next(p["version"] for p in LOCK["package"] if p["name"] == "torch")


def cpu_wheel(path: Path) -> Path:
    """A wheel whose METADATA requires what torch's CPU build does (and an extra's requirement)."""
    wheel = path / f"torch-{TORCH}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    meta = "\n".join(["Metadata-Version: 2.1", "Name: torch", f"Version: {TORCH}+cpu",
                      "Requires-Dist: filelock", "Requires-Dist: typing-extensions>=4.10.0",
                      'Requires-Dist: setuptools; python_version >= "3.12"', "Requires-Dist: sympy>=1.13.3",
                      "Requires-Dist: networkx>=2.5.1", "Requires-Dist: jinja2", "Requires-Dist: fsspec>=0.8.5",
                      'Requires-Dist: opt-einsum>=3.3; extra == "opt-einsum"'])
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"torch-{TORCH}+cpu.dist-info/METADATA", meta)
    return wheel


def test_wheel_requires_reads_names_without_extras(tmp_path):
    assert venv.wheel_requires(cpu_wheel(tmp_path)) == ["filelock", "typing-extensions", "setuptools", "sympy",
                                                         "networkx", "jinja2", "fsspec"]


def test_the_cpu_build_leaves_out_exactly_the_cuda_runtime(tmp_path):
    left_out = set(venv.only_torch_needs(LOCK, venv.wheel_requires(cpu_wheel(tmp_path))))
    cuda = {p["name"] for p in LOCK["package"] if p["name"].startswith(("nvidia-", "cuda-"))}
    assert cuda and left_out == cuda
    # without the CPU wheel's own requirements, sympy (and its mpmath) would wrongly go too
    assert {"sympy", "mpmath"} <= set(venv.only_torch_needs(LOCK, [])) - cuda


@pytest.mark.parametrize("system, gpus, cpu_found, want, build", [
    ("Linux", ["GPU 0: NVIDIA H200 (UUID: GPU-1)"], True, "auto", "cuda"),
    ("Linux", [], True, "auto", "cpu"),
    ("Linux", [], False, "auto", "public"),
    ("Linux", ["GPU 0: NVIDIA H200 (UUID: GPU-1)"], True, "cpu", "cpu"),
    ("Linux", [], True, "cuda", "cuda"),
    ("Darwin", [], False, "auto", "public"),
])
def test_choice_per_machine(monkeypatch, tmp_path, system, gpus, cpu_found, want, build):
    monkeypatch.setattr(venv.platform, "system", lambda: system)
    monkeypatch.setattr(venv, "nvidia_gpus", lambda: gpus)
    wheel = cpu_wheel(tmp_path)
    monkeypatch.setattr(venv, "fetch_cpu_torch", lambda *a: (wheel, "") if cpu_found else
                        (None, "ERROR: No matching distribution found for torch==2.13.0+cpu"))
    got, reason, got_wheel = venv.choose(want, TORCH, "3.11", "python3", tmp_path)
    assert got == build
    assert (got_wheel is not None) == (build == "cpu")
    if build == "public" and system == "Linux":
        assert "No matching distribution" in reason and "runs on a CPU" in reason
    if build == "cuda" and gpus:
        assert "NVIDIA H200" in reason


@pytest.mark.parametrize("system, want, message", [
    ("Linux", "cpu", "TORCH=cpu, but no CPU build"),
    ("Darwin", "cuda", "no CUDA build for macOS"),
    ("Windows", "auto", "Windows is not a platform uv.lock covers"),
])
def test_impossible_choices_fail_naming_why(monkeypatch, tmp_path, system, want, message):
    monkeypatch.setattr(venv.platform, "system", lambda: system)
    monkeypatch.setattr(venv, "nvidia_gpus", lambda: [])
    monkeypatch.setattr(venv, "fetch_cpu_torch", lambda *a: (None, "ERROR: unreachable"))
    with pytest.raises(SystemExit, match=message):
        venv.choose(want, TORCH, "3.12", "python3", tmp_path)
