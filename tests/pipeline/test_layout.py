"""The folder tree is the architecture: stages -> pipeline/<stage> -> pipeline/core -> models ->
kernels. A stage's package imports only itself and `core`; `core` imports no stage; no module
imports one that imports it back; each DVC stage depends on its package, `core` and `stages/`;
every file the fingerprints name exists."""
import ast
from pathlib import Path

import pytest
import yaml

from pipeline.core.fingerprint import source_files
from pipeline.core.runs import TRAIN_CODE
from pipeline.evaluate.driver import EVAL_CODE

from .conftest import REPO

STAGES = ("prepare", "train", "export", "evaluate", "report")
LAYERS = {"kernels": 0, "models": 1, "pipeline": 2, "stages": 3}  # an arrow points down only


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every first-party module -> the first-party modules it imports (anywhere in it)."""
    files = [p for top in LAYERS for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts]
    known = {_module(p) for p in files}
    graph = {}
    for path in files:
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            out |= {n for n in names if n in known}
        graph[_module(path)] = out
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


def test_arrows_point_down():
    bad = [(m, d) for m, deps in _imports().items() for d in deps
           if LAYERS[d.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert not bad, f"imports against the layers (stages -> pipeline -> models -> kernels): {bad}"


def test_a_stage_imports_only_itself_and_core():
    bad = []
    for module, deps in _imports().items():
        if not module.startswith("pipeline."):
            continue
        mine = _package(module)
        allowed = {"core"} if mine == "core" else {"core", mine}
        bad += [(module, d) for d in deps if d.startswith("pipeline.") and d != "pipeline"
                and _package(d) not in allowed]
    assert not bad, f"a stage's package reaches into another's (or core into a stage): {bad}"


def test_no_import_cycles():
    graph = _imports()
    graph = {m: {d for d in deps if d != m and not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_each_dvc_stage_depends_on_its_package_and_core():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in STAGES:
        deps = set(stages[stage]["deps"])
        code = {d for d in deps if d.startswith(("pipeline", "stages", "models", "kernels"))}
        expected = {"stages", "pipeline/core", f"pipeline/{stage}"}
        if stage in ("train", "export", "evaluate"):
            expected |= {"models", "kernels"}
        assert code == expected, f"dvc.yaml {stage}: code deps {sorted(code)}, expected {sorted(expected)}"
    assert set(p.name for p in (REPO / "pipeline").iterdir() if p.is_dir() and p.name != "__pycache__") \
        == {"core", *STAGES}, "pipeline/ holds one package per stage and core"


@pytest.mark.parametrize("name,code", [("TRAIN_CODE", TRAIN_CODE), ("EVAL_CODE", EVAL_CODE)])
def test_the_code_fingerprints_hash_exists(name, code):
    missing = [rel for rel in code if not source_files([rel])]
    assert not missing, f"{name} names files that are not there (a move would drop them from the hash): {missing}"
