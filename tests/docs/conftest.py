"""At the end of a run that collected tests/docs: the doc blocks it did not run, and why."""
import pytest

from tests.docs.markdown_blocks import all_blocks

_COLLECTED = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config, items):
    config.stash[_COLLECTED] = any(item.nodeid.startswith("tests/docs/") for item in items)


def pytest_terminal_summary(terminalreporter, config):
    if not config.stash.get(_COLLECTED, False):
        return
    blocks = [b for b in all_blocks() if b.kind]
    skipped = [b for b in blocks if b.skip]
    terminalreporter.section(f"doc examples: {len(blocks) - len(skipped)} run, {len(skipped)} not run "
                             "(<!-- docs-test: skip -->)")
    for b in skipped:
        first = next((ln.strip() for ln in b.code.splitlines() if ln.strip()), "")
        terminalreporter.write_line(f"{b.id:<24} {b.skip}")
        terminalreporter.write_line(f"{'':<24}   {first[:90]}")
