"""Fingerprints: a short hash of everything a result depends on, so unchanged work is skipped.

`digest` hashes any JSON-able description (configs, seeds, other fingerprints); `source_hash`
hashes the code a result is computed by (files under `pipeline.SOURCE_ROOT`, by relative path).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from pipeline import SOURCE_ROOT


def digest(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), shortened."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]


SOURCE_SUFFIXES = (".py", ".yaml", "_yaml")  # `_yaml`: lm-eval templates that are not tasks


def source_files(paths: Iterable[str]) -> list[str]:
    """Relative paths: a folder stands for every source and YAML file below it; files as they are."""
    out = []
    for rel in paths:
        path = SOURCE_ROOT / rel
        if path.is_dir():
            out += sorted(p.relative_to(SOURCE_ROOT).as_posix() for p in path.rglob("*")
                          if p.name.endswith(SOURCE_SUFFIXES) and "__pycache__" not in p.parts)
        elif path.exists():
            out.append(rel)
    return out


def source_hash(paths: Iterable[str]) -> str:
    """sha256 over the named source files (name and bytes of each, in the given order)."""
    h = hashlib.sha256()
    for rel in source_files(paths):
        h.update(rel.encode() + b"\0" + (SOURCE_ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()
