"""Where the modeling code finds `models` (and the `kernels` it calls).

In the repository SOURCES is empty and the installed packages are imported. In an export,
`pipeline/export/bundle.py` writes this file with SOURCES holding the source of `models/` and `kernels/`
(path -> text), and they are imported from memory as a private package named after their hash,
so an export runs where only torch and transformers are installed, and two exports of different
code never share modules.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.util
import linecache
import re
import sys

SOURCES: dict[str, str] = {}

# models/config.py needs pydantic only to validate; the export hands the model a resolved
# namespace, so where pydantic is missing an annotation-only stand-in is enough.
_CONFIG_STUB = "class ModelConfig:  # stand-in: the export passes a resolved config namespace\n    pass\n"
_ABSOLUTE = re.compile(r"^(\s*from\s+)(models|kernels)(\.|\s)", re.MULTILINE)


class _SourceImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `<root>.models...` and `<root>.kernels...` from SOURCES."""

    def __init__(self, root: str, sources: dict[str, str]):
        self.root, self.sources = root, sources

    def _path(self, fullname: str) -> tuple[str, bool] | None:
        if fullname == self.root:
            return "", True
        if not fullname.startswith(self.root + "."):
            return None
        rel = fullname[len(self.root) + 1:].replace(".", "/")
        if rel + ".py" in self.sources:
            return rel + ".py", False
        if any(p.startswith(rel + "/") for p in self.sources):
            return rel + "/__init__.py", True
        return None

    def find_spec(self, fullname, path=None, target=None):
        found = self._path(fullname)
        if found is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=found[1])

    def create_module(self, spec):
        return None

    def get_source(self, fullname: str) -> str:
        rel, _ = self._path(fullname)
        source = self.sources.get(rel, "")
        if rel == "models/config.py" and importlib.util.find_spec("pydantic") is None:
            source = _CONFIG_STUB
        return _ABSOLUTE.sub(lambda m: f"{m.group(1)}{self.root}.{m.group(2)}{m.group(3)}", source)

    def exec_module(self, module):
        rel, _ = self._path(module.__name__)
        source, filename = self.get_source(module.__name__), f"<{self.root}>/{rel}"
        # inspect.getsource (tracebacks, triton.jit) reads the lines from linecache
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), module.__dict__)


def bundle_root(sources: dict[str, str]) -> str:
    digest = hashlib.sha256(repr(sorted(sources.items())).encode()).hexdigest()[:12]
    return f"_kvf_bundle_{digest}"


def load(name: str):
    """The module `models.<name>` (e.g. "lm", "cache"): bundled in an export, installed in the repo."""
    if not SOURCES:
        return importlib.import_module(f"models.{name}")
    root = bundle_root(SOURCES)
    if not any(isinstance(f, _SourceImporter) and f.root == root for f in sys.meta_path):
        sys.meta_path.append(_SourceImporter(root, SOURCES))
    return importlib.import_module(f"{root}.models.{name}")
