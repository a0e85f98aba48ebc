"""The code hash in every fingerprint: what the code says, not where it sits."""
import textwrap

import pytest

from pipeline.core import fingerprint

A = '''"""Module a."""
from __future__ import annotations

import numpy as np

SCALE = 3  # a constant


@staticmethod
def f(x):
    from pipeline.core import tokens  # a local import
    # a comment
    return np.sum(x) * SCALE


def g(y):
    """g."""
    return y + 1
'''


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "SOURCE_ROOT", tmp_path)
    return tmp_path


def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_statements_leave_out_docstrings_imports_and_comments():
    assert fingerprint.statements(A) == [
        "SCALE = 3",
        "@staticmethod\ndef f(x):\n    return np.sum(x) * SCALE",
        "def g(y):\n    return y + 1",
    ]


def test_moving_code_keeps_the_hash(root):
    write(root, "pkg/a.py", A)
    write(root, "pkg/t.yaml", "task: x\n")
    before = fingerprint.source_hash(["pkg"])
    (root / "pkg" / "a.py").unlink()
    (root / "pkg" / "t.yaml").unlink()
    # the same statements, split over two files in another package, with other imports
    f_and_const, g = A.split("def g(y):")
    write(root, "new/core/one.py", f_and_const.replace('"""Module a."""', '"""One."""\nfrom new.two import thing'))
    write(root, "new/two.py", '"""Two."""\nimport os\n\ndef g(y):' + g)
    write(root, "new/tasks/t.yaml", "task: x\n")
    write(root, "new/__init__.py", '"""A package."""\nfrom new.two import g  # noqa\n')
    assert fingerprint.source_hash(["new"]) == before


@pytest.mark.parametrize("edit", [
    lambda s: s.replace("* SCALE", "* SCALE + 1"),         # a body
    lambda s: s.replace("SCALE = 3", "SCALE = 4"),          # a constant
    lambda s: s.replace("@staticmethod\n", ""),             # a decorator
    lambda s: s.replace("return y + 1", "return y + 2"),
])
def test_changing_a_statement_changes_the_hash(root, edit):
    write(root, "a.py", A)
    before = fingerprint.source_hash(["a.py"])
    write(root, "a.py", edit(A))
    assert fingerprint.source_hash(["a.py"]) != before


def test_docstrings_and_comments_do_not_count(root):
    write(root, "a.py", A)
    before = fingerprint.source_hash(["a.py"])
    write(root, "a.py", A.replace('"""g."""', '"""g, said otherwise\n\n    over two lines."""')
          .replace("# a constant", "# another word").replace("    # a comment\n", ""))
    assert fingerprint.source_hash(["a.py"]) == before


def test_yaml_counts_by_its_bytes(root):
    write(root, "t/x.yaml", "a: 1\n")
    before = fingerprint.source_hash(["t"])
    write(root, "t/x.yaml", "a: 2\n")
    assert fingerprint.source_hash(["t"]) != before
