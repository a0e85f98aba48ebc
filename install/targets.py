"""`make lock-targets`: check that uv.lock installs on every machine it is for, from this one.

For each target (Linux x86_64, Linux aarch64, macOS arm64) and each CPython (3.11, 3.12, 3.13),
the lock's packages for that target (`uv export --frozen`, markers evaluated by uv for the
target) are resolved again with `uv pip compile --python-platform ... --only-binary :all:`:
every pinned version must have a wheel for the target's tags. The few the lock holds only as
source distributions (pure Python: the plays' package, lm-eval's scorers' antlr4, jieba, ...)
are built by `make venv` on any machine and are listed, not checked. Needs the package index,
not the target machine. Prints a markdown table and exits non-zero when any target fails.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

PLATFORMS = {"Linux x86_64": "x86_64-manylinux_2_28", "Linux aarch64": "aarch64-manylinux_2_28",
             "macOS arm64 (14+)": "aarch64-apple-darwin"}
PYTHONS = ["3.11", "3.12", "3.13"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uv", required=True)
    args = ap.parse_args()
    lock = tomllib.loads(Path("uv.lock").read_text())
    source_only = sorted(p["name"] for p in lock["package"] if "registry" in p["source"] and not p.get("wheels"))
    print(f"Source distributions only (built on the machine): {', '.join(source_only)}\n")
    env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": "14.0", "UV_PYTHON_DOWNLOADS": "never"}
    with tempfile.TemporaryDirectory(dir=Path(".uv").absolute()) as tmp:
        req = Path(tmp) / "lock.txt"
        exported = subprocess.run([args.uv, "export", "--frozen", "--all-extras", "--all-groups", "--no-hashes",
                                   "--no-emit-project", "--format", "requirements.txt"],
                                  capture_output=True, text=True, check=True, env=env).stdout
        req.write_text("".join(line + "\n" for line in exported.splitlines()
                               if line.split("==")[0] not in source_only))
        print("| target | Python | packages | wheels for every one | seconds |\n|---|---|---|---|---|")
        failed = 0
        for name, triple in PLATFORMS.items():
            for py in PYTHONS:
                start = time.perf_counter()
                run = subprocess.run([args.uv, "pip", "compile", str(req), "--no-deps", "--only-binary", ":all:",
                                      "--python-platform", triple, "--python-version", py, "--no-header",
                                      "--no-annotate", "--quiet"], capture_output=True, text=True, env=env)
                pins = [line for line in run.stdout.splitlines() if "==" in line]
                ok = run.returncode == 0
                failed += not ok
                why = "yes" if ok else "NO: " + " ".join(run.stderr.split())[:300]
                took = time.perf_counter() - start
                print(f"| {name} | {py} | {len(pins)} + {len(source_only)} | {why} | {took:.1f} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
