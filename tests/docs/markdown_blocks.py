"""The fenced blocks of README.md and docs/*.md, read the way tests/docs runs them.

The convention (docs/contributing.md, "Docs that run"):
- ```python, ```bash, ```sh and ```shell blocks are examples and run; every other fence is not.
- `<!-- docs-test: skip (reason) -->` on the line before a block leaves that block out; the
  reason is printed at the end of the test run.
- A ```text block right after an example (only blank lines between) is its whole output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNNABLE = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")
_SKIP = re.compile(r"^\s*skip\s*\((?P<reason>.+)\)\s*$")


@dataclass(frozen=True)
class Block:
    page: str               # relative to the repo root: README.md, docs/studies.md
    line: int               # 1-based line of the opening fence
    lang: str               # the fence's first word: python, bash, text, yaml, ...
    code: str               # the block's lines, de-indented to the fence
    output: str | None      # the ```text block right after it, if any
    skip: str | None        # the reason given by a skip marker

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def kind(self) -> str | None:
        return RUNNABLE.get(self.lang)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _fences(lines: list[str]) -> list[tuple[int, int, str, str]]:
    """(opening index, closing index, language, de-indented code) of every fenced block."""
    found, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        lang = (m["info"].split() or [""])[0].lower()
        end = i + 1
        while end < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$",
                                               lines[end]):
            end += 1
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1:end]]
        found.append((i, end, lang, "\n".join(body) + "\n"))
        i = end + 1
    return found


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The page's blocks, and what is wrong with its markers (a marker that is not a skip with a
    reason, or that stands before no example)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(REPO).as_posix()
    fences = _fences(lines)
    blocks, problems = [], []
    marked: set[int] = set()
    for n, (start, end, lang, code) in enumerate(fences):
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        skip = None
        marker = _MARKER.match(lines[above]) if above >= 0 else None
        if marker:
            marked.add(above)
            reason = _SKIP.match(marker["body"])
            # A block under any marker is left out, even a malformed one: a marker means "do not
            # run this", and the malformed one fails test_markers_... instead.
            skip = reason["reason"].strip() if reason else f"malformed marker: {marker['body'].strip()!r}"
            if not reason:
                problems.append(f"{page}:{above + 1}: a docs-test marker must read "
                                f"'<!-- docs-test: skip (reason) -->', not {lines[above].strip()!r}")
            elif lang not in RUNNABLE:
                problems.append(f"{page}:{above + 1}: a skip marker before a ```{lang} block, "
                                "which never runs")
        output = None
        if n + 1 < len(fences) and fences[n + 1][2] == "text" and lang in RUNNABLE:
            nxt = fences[n + 1][0]
            if all(not ln.strip() for ln in lines[end + 1:nxt]):
                output = fences[n + 1][3]
        blocks.append(Block(page, start + 1, lang, code, output, skip))
    inside = {i for start, end, _, _ in fences for i in range(start, end + 1)}
    for i, ln in enumerate(lines):
        if _MARKER.match(ln) and i not in marked and i not in inside:
            problems.append(f"{page}:{i + 1}: a docs-test marker that stands before no block")
    return blocks, problems


def all_blocks() -> list[Block]:
    return [b for path in pages() for b in parse(path)[0]]
