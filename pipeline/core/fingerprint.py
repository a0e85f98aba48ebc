"""Fingerprints: a short hash of everything a result depends on, so unchanged work is skipped.

`digest` hashes any JSON-able description (configs, seeds, other fingerprints); `source_hash`
hashes the code a result is computed by (files under `pipeline.SOURCE_ROOT`), by what it does,
not where it sits or how it is explained: each top-level statement of each Python file is hashed
on its own, without its imports, docstrings and comments, and the statements' hashes are sorted.
Moving a file, a function from one module to another, re-pointing an import or editing a
docstring or a comment reruns nothing; changing code does. YAML files count by their bytes.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import tokenize
from pathlib import Path
from typing import Any, Iterable

from pipeline import SOURCE_ROOT


def digest(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), shortened."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]


SOURCE_SUFFIXES = (".py", ".yaml", "_yaml")  # `_yaml`: lm-eval templates that are not tasks


def source_files(paths: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Relative paths: a folder stands for every source and YAML file below it; files as they are;
    none of `exclude` (files)."""
    exclude, out = set(exclude), []
    for rel in paths:
        path = SOURCE_ROOT / rel
        if path.is_dir():
            out += sorted(p.relative_to(SOURCE_ROOT).as_posix() for p in path.rglob("*")
                          if p.name.endswith(SOURCE_SUFFIXES) and "__pycache__" not in p.parts)
        elif path.exists():
            out.append(rel)
    return [rel for rel in out if rel not in exclude]


def _docstring(node) -> ast.AST | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def statements(source: str) -> list[str]:
    """The top-level statements of a Python module as text, decorators included. Left out: every
    import statement and every docstring (module, class, function), comments, blank lines. A
    statement that was only these is no statement."""
    tree, lines = ast.parse(source), source.splitlines()
    drop = set()
    for node in ast.walk(tree):
        doc = _docstring(node) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                    ast.AsyncFunctionDef)) else None
        if doc is not None and (isinstance(node, ast.Module) or doc.lineno > node.lineno):
            drop.update(range(doc.lineno, doc.end_lineno + 1))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            drop.update(range(node.lineno, node.end_lineno + 1))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    out = []
    for node in tree.body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        kept = [lines[i - 1].rstrip() for i in range(first, node.end_lineno + 1)
                if i not in drop and lines[i - 1].strip()]
        if kept:
            out.append("\n".join(kept))
    return out


def source_hash(paths: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """sha256 over the sorted hashes of the named files' statements (Python) and bytes (YAML),
    `exclude` left out."""
    parts = []
    for rel in source_files(paths, exclude):
        path = Path(SOURCE_ROOT / rel)
        if rel.endswith(".py"):
            parts += [hashlib.sha256(s.encode()).hexdigest() for s in statements(path.read_text())]
        else:
            parts.append(hashlib.sha256(path.read_bytes()).hexdigest())
    h = hashlib.sha256()
    for part in sorted(parts):
        h.update(part.encode())
    return h.hexdigest()
