"""Idempotent DVC setup (run by `make repro` before `dvc repro`): `dvc init` when `.dvc` is
missing, analytics off, and the site cache inside the repo (`.dvc/tmp/site_cache`, git-ignored)
instead of /var/tmp/dvc. Safe to run any number of times."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _dvc(root: Path, *args: str) -> None:
    exe = Path(sys.executable).with_name("dvc")
    subprocess.run([str(exe) if exe.exists() else "dvc", *args], cwd=root, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def setup(root: Path) -> None:
    root = root.resolve()
    if not (root / ".dvc").is_dir():
        _dvc(root, "init", "--quiet")
    _dvc(root, "config", "core.analytics", "false")
    # machine-specific absolute path: the local (uncommitted) config
    _dvc(root, "config", "--local", "core.site_cache_dir", str(root / ".dvc" / "tmp" / "site_cache"))


if __name__ == "__main__":
    setup(Path.cwd())
