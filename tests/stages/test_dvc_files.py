"""DVC's own files must stay visible to git: `dvc repro` refuses a git-ignored dvc.lock."""
import subprocess

import pytest

from tests.studies import REPO


@pytest.mark.parametrize("path", ["dvc.lock", "dvc.yaml", "params.yaml", "metrics/eval.json"])
def test_dvc_files_are_not_git_ignored(path):
    if not (REPO / ".git").exists():
        pytest.fail("the tests run from a git checkout (CI clones the repo)")
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0
    assert not ignored, f"{path} is git-ignored: dvc repro stops with \"'{path}' is git-ignored\""
