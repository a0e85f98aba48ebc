"""Docs that run: every example in README.md and docs/*.md, one test per block (`page:line`).

Python blocks run in order in one namespace per page, from the repo root; a `print(...)` line with
a comment after it (`print(x)  # 201 163840 163840`) asserts what that print wrote. Shell blocks
run as one `bash -euo pipefail` script from the repo root and must exit 0. A ```text block right
after an example is its whole output. Blocks marked `<!-- docs-test: skip (reason) -->` are not
collected; conftest.py lists them at the end of the run. The convention: docs/contributing.md,
"Docs that run".
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import importlib.util
import io
import os
import re
import signal
import subprocess
import sys
import tokenize

import pytest

from tests.docs.markdown_blocks import REPO, RUNNABLE, all_blocks, pages, parse

EXAMPLES = [b for b in all_blocks() if b.kind and not b.skip]
PAGES = [p.relative_to(REPO).as_posix() for p in pages()]


def _lines(text: str) -> list[str]:
    """Output as compared: trailing spaces and leading / trailing blank lines ignored."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _expected_prints(code: str) -> dict[tuple[int, int], str]:
    """(first line, last line) of each print statement that has a comment on its last line ->
    the comment's text: what that print must write."""
    comments = {tok.start[0]: tok.string[1:].strip()
                for tok in tokenize.generate_tokens(io.StringIO(code).readline)
                if tok.type == tokenize.COMMENT}
    expected = {}
    for node in ast.walk(ast.parse(code)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "print"
                and node.end_lineno in comments):
            expected[(node.lineno, node.end_lineno)] = comments[node.end_lineno]
    return expected


def _run_python(block, namespace: dict) -> None:
    # Padded so that line numbers in tracebacks are the page's own lines.
    source = "\n" * block.line + block.code
    filename = str(REPO / block.page)
    printed: list[tuple[int, str]] = []

    def recording_print(*args, **kwargs):
        if kwargs.get("file") is not None:
            return builtins.print(*args, **kwargs)
        buf = io.StringIO()
        builtins.print(*args, **kwargs, file=buf)
        sys.stdout.write(buf.getvalue())
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename != filename:
            frame = frame.f_back
        printed.append((frame.f_lineno if frame else -1, buf.getvalue()))

    namespace["print"] = recording_print
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(source, filename, "exec"), namespace)
    for (first, last), want in _expected_prints(source).items():
        calls = [text for line, text in printed if first <= line <= last]
        assert calls, f"{block.page}:{last}: this print never ran; the page says it prints {want!r}"
        got = "".join(calls).rstrip("\n")
        assert got == want, f"{block.page}:{last}: printed {got!r}, the page says {want!r}"
    if block.output is not None:
        assert _lines(stdout.getvalue()) == _lines(block.output), (
            f"{block.id}: the output differs from the ```text block after it")


def _run_shell(block, timeout: float = 60) -> None:
    # A session of its own, so that a block that outlives its time (a server started by mistake)
    # goes with everything it started, not just its bash.
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.code], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{block.id}: still running after {timeout:.0f} s (mark a long block "
                    f"<!-- docs-test: skip (reason) -->)\n{out}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left running in the background
    assert proc.returncode == 0, f"{block.id}: exit {proc.returncode}\n{out}"
    if block.output is not None:
        assert _lines(out) == _lines(block.output), (
            f"{block.id}: the output differs from the ```text block after it:\n{out}")


_namespaces: dict[str, tuple[dict, set[int]]] = {}


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda b: b.id)
def test_example(block, monkeypatch):
    monkeypatch.chdir(REPO)
    if block.kind == "shell":
        _run_shell(block)
        return
    namespace, done = _namespaces.setdefault(block.page, ({"__name__": "__docs__"}, set()))
    # A block may use what the page's earlier blocks defined: run those first when this test is
    # picked alone (-k), as a reader would have.
    for earlier in EXAMPLES:
        if earlier.page == block.page and earlier.kind == "python" and earlier.line < block.line \
                and earlier.line not in done:
            done.add(earlier.line)  # once, even when it fails: its own test reports that
            _run_python(earlier, namespace)
    done.add(block.line)
    _run_python(block, namespace)


@pytest.mark.parametrize("page", PAGES)
def test_markers_name_a_reason_and_stand_before_an_example(page):
    assert parse(REPO / page)[1] == []


# --- what the pages name must exist --------------------------------------------------------------

_PREFIXES = ("models", "kernels", "pipeline", "stages", "tools", "configs", "benchmarks", "install", "tests",
             "docs")
_PATH = re.compile(rf"^(?:{'|'.join(_PREFIXES)})/[\w./-]*$")
_MODULE = re.compile(r"python -m ([\w.]+)(?=[\s`]|$)")
# design.md has its own owner and is checked for its examples only; BENCHMARKS.md, the record of
# what was measured, for the commands and paths it gives (it has no examples that run).
_PATH_PAGES = [p for p in PAGES if p != "docs/design.md"] + ["BENCHMARKS.md"]


def _prose(page: str) -> tuple[str, str]:
    """The page's text outside fences, and the text of its shell and Python blocks."""
    lines = (REPO / page).read_text(encoding="utf-8").splitlines()
    inside = set()
    for block in parse(REPO / page)[0]:
        n = block.line - 1
        inside.update(range(n, n + block.code.count("\n") + 2))
    prose = "\n".join("" if i in inside else ln for i, ln in enumerate(lines))
    code = "\n".join(b.code for b in parse(REPO / page)[0] if b.lang in RUNNABLE)
    return prose, code


def _named_paths(page: str) -> set[str]:
    prose, code = _prose(page)
    texts = [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)] + [code]
    named = set()
    for text in texts:
        for token in re.split(r"[\s=,;()'\"]+", text):
            token = token.rstrip(":.")
            if _PATH.match(token) and "..." not in token:
                named.add(token)
        for module in _MODULE.findall(text):
            named.add("python -m " + module)
    return named


def _exists(named: str) -> bool:
    if named.startswith("python -m "):
        name = named.removeprefix("python -m ")
        if name.split(".")[0] not in _PREFIXES:  # an installed tool's module (pytest, mlflow)
            return importlib.util.find_spec(name) is not None
        module = REPO / name.replace(".", "/")
        return module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()
    return (REPO / named).exists()


@pytest.mark.parametrize("page", _PATH_PAGES)
def test_named_paths_and_modules_exist(page):
    missing = sorted(n for n in _named_paths(page) if not _exists(n))
    assert missing == [], f"{page} names what the repo does not hold: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: str) -> set[str]:
    prose, _ = _prose(page)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose, flags=re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    prose, _ = _prose(page)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (REPO / page).parent / path if path else REPO / page
        if not file.exists():
            broken.append(target)
        elif anchor and anchor not in _anchors(file.resolve().relative_to(REPO).as_posix()):
            broken.append(target)
    assert broken == [], f"{page}: links that lead nowhere: {broken}"


# --- design.md's module tree is the tree ----------------------------------------------------------

_TREE_TOPS = ("stages", "tools", "pipeline")


def _design_tree() -> tuple[set[str], set[str]]:
    """(files, folders named whole) of the module tree under design.md's "The pipeline": a line's
    names are the tokens before its description (two or more spaces), each `x.py` or `x/`; two
    spaces of indent a level, a line naming one folder alone opens that folder."""
    text = (REPO / "docs/design.md").read_text(encoding="utf-8")
    section = text[text.index("## The pipeline\n"):]
    tree = re.search(r"```text\n(.*?)```", section, flags=re.S).group(1)
    stack: list[str] = []
    files, folders = set(), set()
    for line in tree.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split()
        names = [n for n in names if n.endswith((".py", "/"))]
        stack = stack[:depth]
        for name in names:
            path = "/".join(stack + [name.rstrip("/")])
            (folders if name.endswith("/") else files).add(path)
        if len(names) == 1 and names[0].endswith("/"):
            stack.append(names[0].rstrip("/"))
    return files, folders


def test_the_design_module_tree_names_every_module_and_only_modules():
    files, folders = _design_tree()
    opened = {f for f in folders if any(x.startswith(f + "/") for x in files | folders)}
    whole = folders - opened - set(_TREE_TOPS)
    modules = {p.relative_to(REPO).as_posix() for top in _TREE_TOPS for p in (REPO / top).rglob("*.py")
               if p.name != "__init__.py" and "__pycache__" not in p.parts}
    unnamed = sorted(m for m in modules if m not in files and not any(m.startswith(w + "/") for w in whole))
    absent = sorted(n for n in files | folders if not (REPO / n).exists())
    assert (unnamed, absent) == ([], []), (f"design.md's module tree misses {unnamed} and names what is not "
                                           f"there: {absent}")
