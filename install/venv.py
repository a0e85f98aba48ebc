"""`make venv`: install exactly uv.lock into .venv, with the torch build this machine should use.

uv.lock is one universal lock (CPython 3.11-3.13; Linux x86_64 and aarch64, macOS arm64). Its
torch is the public index's build: the CUDA build on Linux (it also runs on a CPU), the CPU and
MPS build on macOS. On Linux this script picks the build per machine:

- an NVIDIA GPU (`nvidia-smi -L` lists one): the lock's CUDA build, as locked;
- no GPU: the CPU build of the same torch release (`torch==X+cpu`, no CUDA libraries), when one
  can be had: from pip's own configuration (its indexes and find-links) or PyTorch's CPU index;
- no GPU and no CPU build reachable: the lock's build again, which runs on a CPU.

Every other package is the lock's, installed by `uv sync --locked` (the lock must match
pyproject.toml; nothing resolved, hashes checked). With the CPU build, the lock's CUDA-only
packages (those only torch needs) are left out and the CPU wheel is installed in torch's place,
without dependencies: they are the lock's.
`--torch cpu|cuda` (make venv TORCH=...) overrides the choice; cpu fails when no CPU build can be
had. The choice and its reason are printed and written to .venv/.installed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

if not (3, 11) <= sys.version_info[:2] <= (3, 13):  # before tomllib: 3.10 has none
    sys.exit(f"make venv: Python {sys.version_info[0]}.{sys.version_info[1]}: uv.lock is for CPython 3.11-3.13; "
             "name one with PYTHON=, e.g. make venv PYTHON=python3.12 (then rm -rf .uv/tool)")
import tomllib  # noqa: E402

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ROOT = "kv-frontier"


def say(msg: str) -> None:
    print(f"make venv: {msg}", flush=True)


def interpreter(python: str) -> tuple[str, str]:
    """The interpreter's own path (not a version manager's shim) and its X.Y version."""
    out = subprocess.run([python, "-c", "import sys; print(sys.executable); print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return out[0], out[1]


def nvidia_gpus() -> list[str]:
    """The lines `nvidia-smi -L` prints ("GPU 0: NVIDIA H200 (UUID: ...)"), or none."""
    if platform.system() != "Linux" or shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.startswith("GPU ")]


def wheel_requires(wheel: Path) -> list[str]:
    """The names a wheel requires (its METADATA's Requires-Dist, extras' requirements aside)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = [line.split(":", 1)[1] for line in lines if line.startswith("Requires-Dist:")]
    return [re.split(r"[\s;<>=!~\[(]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for r in reqs if "extra ==" not in r]


def only_torch_needs(lock: dict, keep: list[str]) -> list[str]:
    """Packages the lock installs for torch alone and the CPU build does not need (its CUDA
    runtime on Linux): reached from torch, but neither from the project (every extra and group)
    with torch cut out nor from `keep`, the CPU wheel's own requirements."""
    packages = {p["name"]: p for p in lock["package"]}

    def edges(name: str, extras: frozenset) -> list[tuple[str, frozenset]]:
        p = packages[name]
        deps = list(p.get("dependencies", []))
        for extra in extras:
            deps += p.get("optional-dependencies", {}).get(extra, [])
        if name == ROOT:
            deps += [d for extra in p.get("optional-dependencies", {}).values() for d in extra]
            deps += [d for group in p.get("dev-dependencies", {}).values() for d in group]
        return [(d["name"], frozenset(d.get("extra", []))) for d in deps]

    def reach(start: list[tuple[str, frozenset]], cut: str | None) -> set[str]:
        seen, todo = set(), list(start)
        while todo:
            node = todo.pop()
            if node in seen or node[0] == cut:
                continue
            seen.add(node)
            todo += edges(*node)
        return {name for name, _ in seen}

    without = reach([(ROOT, frozenset())] + [(name, frozenset()) for name in keep if name in packages], cut="torch")
    return sorted(reach([("torch", frozenset())], cut=None) - without - {"torch"})


def fetch_cpu_torch(pip_python: str, version: str, python_version: str, dest: Path) -> tuple[Path | None, str]:
    """Download `torch==version+cpu` for this machine's tags with pip (its configured sources,
    plus PyTorch's CPU index; a wheel already in `dest` is reused). Returns the wheel, or None
    and what pip said."""
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    wanted = f"torch-{version}+cpu-{abi}-{abi}-"
    for old in dest.glob("torch-*.whl"):
        if not old.name.startswith(wanted):
            old.unlink()
    cmd = [pip_python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", python_version, "--implementation", "cp", "--abi", abi,
           "--platform", f"manylinux_2_28_{platform.machine()}",
           "--extra-index-url", CPU_INDEX, "--retries", "1", "--timeout", "15", "--progress-bar", "off",
           f"torch=={version}+cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(wanted + "*.whl"))
    if run.returncode == 0 and wheels:
        return wheels[0], ""
    lines = (run.stderr + run.stdout).splitlines()
    unreachable = any("/whl/cpu/" in line and ("connection" in line or "Failed" in line) for line in lines)
    errors = [line for line in lines if line.startswith("ERROR")]
    said = errors[0] if errors else f"pip exited {run.returncode}"
    return None, ("PyTorch's CPU index unreachable; pip: " if unreachable else "pip: ") + said


def choose(want: str, version: str, python_version: str, pip_python: str, wheels: Path) -> tuple[str, str, Path | None]:
    """(build, reason, cpu wheel): build is "cuda", "cpu" or "public" (the lock's build where
    it is not the CUDA one: macOS, or a CPU-only machine with no CPU build to be had)."""
    system = platform.system()
    if system == "Darwin":
        if want == "cuda":
            sys.exit("make venv: TORCH=cuda: there is no CUDA build for macOS")
        return "public", "macOS: the public index's build is the CPU (and Apple MPS) build", None
    if system != "Linux":
        sys.exit(f"make venv: {system} is not a platform uv.lock covers (Linux x86_64/aarch64, macOS arm64)")
    gpus = nvidia_gpus()
    if want == "cuda" or (want == "auto" and gpus):
        why = f"NVIDIA GPU found ({gpus[0]})" if gpus else "TORCH=cuda asked for it (no GPU seen by nvidia-smi)"
        return "cuda", f"{why}: the lock's CUDA build from the public index", None
    wheel, error = fetch_cpu_torch(pip_python, version, python_version, wheels)
    head = "TORCH=cpu asked for it" if want == "cpu" else "no NVIDIA GPU (nvidia-smi lists none)"
    if wheel is not None:
        return "cpu", f"{head}: the CPU build {wheel.name} (pip's sources or PyTorch's CPU index)", wheel
    if want == "cpu":
        sys.exit(f"make venv: TORCH=cpu, but no CPU build of torch {version} for Python {python_version} "
                 f"could be had: {error}")
    return "public", (f"{head}, and no CPU build of torch {version} for Python {python_version} could be had "
                      f"({error}): the public index's Linux build, which runs on a CPU (its CUDA libraries "
                      f"are installed and unused)"), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uv", required=True)
    ap.add_argument("--python", default="python3")
    ap.add_argument("--venv", default=".venv")
    ap.add_argument("--torch", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()

    lock = tomllib.loads(Path("uv.lock").read_text())
    version = next(p["version"] for p in lock["package"] if p["name"] == "torch")
    exe, python_version = interpreter(args.python)
    say(f"Python {python_version} ({exe}); uv.lock's torch is {version}")
    build, reason, wheel = choose(args.torch, version, python_version, sys.executable, Path(".uv/wheels"))
    say(f"torch build: {build}: {reason}")

    venv = Path(args.venv).absolute()
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never"}
    skip = ["torch", *only_torch_needs(lock, wheel_requires(wheel))] if wheel is not None else []
    # --compile-bytecode: every package's .pyc written now, once. Python writes none itself where
    # PYTHONDONTWRITEBYTECODE is set (as on these machines), and each process (a stage, a Ray
    # worker) would compile torch, transformers, mlflow and ray again: 5-10 s each (BENCHMARKS.md)
    sync = [args.uv, "sync", "--locked", "--all-extras", "--compile-bytecode", "--python", exe]
    sync += [arg for name in skip for arg in ("--no-install-package", name)]
    subprocess.run(sync, env=env, check=True)
    if wheel is not None:
        python = str(venv / "bin" / "python")
        # a venv that had another build: its CUDA packages go (uv sync leaves skipped ones in place)
        if skip[1:]:
            subprocess.run([args.uv, "pip", "uninstall", "--quiet", "--python", python, *skip[1:]], env=env,
                           check=True, capture_output=True)
        subprocess.run([args.uv, "pip", "install", "--quiet", "--python", python, "--compile-bytecode",
                        "--no-deps", "--reinstall-package", "torch", str(wheel)], env=env, check=True)

    probe = ("import json, sys, torch; print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__,"
             " 'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}))")
    got = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                                    check=True).stdout)
    if got["torch"].split("+")[0] != version:
        sys.exit(f"make venv: installed torch {got['torch']}, but uv.lock pins {version}")
    if (build == "cpu") != got["torch"].endswith("+cpu") or (build == "cuda" and not got["cuda"]):
        sys.exit(f"make venv: installed torch {got['torch']} (CUDA {got['cuda']}), not the {build} build chosen")
    say(f"installed torch {got['torch']} (CUDA {got['cuda'] or 'none'}, a GPU usable now: {got['cuda_available']}) "
        f"on Python {got['python']}; left out for the CPU build: {', '.join(skip[1:]) or 'nothing'}")
    (venv / ".installed").write_text(json.dumps({"build": build, "reason": reason, **got}, indent=1) + "\n")


if __name__ == "__main__":
    main()
