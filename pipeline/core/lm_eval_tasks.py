"""The project's lm-eval tasks: the YAMLs in `pipeline/evaluate/tasks` (run by the evaluate stage,
or by the stock `lm_eval --include_path`), and the names they define (what `eval.lm_eval_tasks`
may list: params checks them)."""
from __future__ import annotations

from pipeline import SOURCE_ROOT

# The folder of the task YAMLs (and their utils.py): the evaluate stage's, named here because params
# (in core) checks task names against it, and core may not import a stage's package.
TASKS_DIR = SOURCE_ROOT / "pipeline" / "evaluate" / "tasks"


def task_names() -> set[str]:
    """The tasks `pipeline/evaluate/tasks` defines (read from the YAMLs, without lm-eval's slow index)."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's `!function` tags are not needed for the names
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    docs = (yaml.load(path.read_text(), Loader=Loader) for path in TASKS_DIR.glob("*.yaml"))
    return {doc["task"] for doc in docs if isinstance(doc, dict) and "task" in doc}

