"""The project's lm-eval tasks: the YAMLs in `pipeline/evaluate/tasks` (run by the evaluate stage,
or by the stock `lm_eval --include_path`), and the names they define (what `eval.lm_eval_tasks`
may list: params checks them)."""
from __future__ import annotations

from pipeline import SOURCE_ROOT

# The folder of the task YAMLs (and their utils.py), found by a task it holds, wherever it sits in pipeline/.
TASKS_DIR = next((SOURCE_ROOT / "pipeline").rglob("kvf_passkey.yaml")).parent


def task_names() -> set[str]:
    """The tasks `pipeline/evaluate/tasks` defines (read from the YAMLs, without lm-eval's slow index)."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's `!function` tags are not needed for the names
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    docs = (yaml.load(path.read_text(), Loader=Loader) for path in TASKS_DIR.glob("*.yaml"))
    return {doc["task"] for doc in docs if isinstance(doc, dict) and "task" in doc}

