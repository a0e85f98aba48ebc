"""The folder tree is the architecture: tools, benchmarks -> stages -> pipeline/<stage> ->
pipeline/core -> models -> kernels. A stage's package imports only itself and `core`; `core`
imports no stage; no module imports one that imports it back; each DVC stage depends on its
package, `core` and `stages/`, never on `tools/`; the tools and benchmarks on top use only the
public names of the layers below; every file the fingerprints name exists."""
import ast
from pathlib import Path

import pytest
import yaml

from pipeline.core.fingerprint import source_files
from pipeline.core.runs import TRAIN_CODE
from pipeline.evaluate.driver import EVAL_CODE
from tests.studies import REPO

STAGES = ("prepare", "train", "export", "evaluate", "report")
# an arrow points down only; tools (what only the Makefile runs) and benchmarks sit on top, side by side
LAYERS = {"kernels": 0, "models": 1, "pipeline": 2, "stages": 3, "tools": 4, "benchmarks": 4}


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _files() -> list[Path]:
    return [p for top in LAYERS for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts]


def _imported_names(path: Path) -> list[str]:
    """Every dotted name a module imports (anywhere in it): modules and `module.name`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def _imports() -> dict[str, set[str]]:
    """Every first-party module -> the first-party modules it imports (anywhere in it)."""
    files = _files()
    known = {_module(p) for p in files}
    return {_module(path): {n for n in _imported_names(path) if n in known} for path in files}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


def test_arrows_point_down():
    bad = [(m, d) for m, deps in _imports().items() for d in deps
           if LAYERS[d.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert not bad, f"imports against the layers (stages -> pipeline -> models -> kernels): {bad}"


def test_tools_and_benchmarks_use_only_public_names_below_them():
    """What sits on top reads the layers below through their public names: no `_private` name or
    module, and neither top folder imports the other."""
    bad = []
    for path in _files():
        top = path.relative_to(REPO).parts[0]
        if top not in ("tools", "benchmarks"):
            continue
        for name in _imported_names(path):
            first = name.split(".")[0]
            if first in LAYERS and first != top and (
                    LAYERS[first] == LAYERS[top] or any(part.startswith("_") for part in name.split(".")[1:])):
                bad.append((_module(path), name))
    assert not bad, f"tools/benchmarks reaching into private names or into each other: {bad}"


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
    on_tools = {name: [d for d in stage["deps"] if d.startswith(("tools", "benchmarks"))]
                for name, stage in stages.items()}
    assert not any(on_tools.values()), f"a DVC stage depends on what only the Makefile runs: {on_tools}"


@pytest.mark.parametrize("name,code", [("TRAIN_CODE", TRAIN_CODE), ("EVAL_CODE", EVAL_CODE)])
def test_the_code_fingerprints_hash_exists(name, code):
    missing = [rel for rel in code if not source_files([rel])]
    assert not missing, f"{name} names files that are not there (a move would drop them from the hash): {missing}"
