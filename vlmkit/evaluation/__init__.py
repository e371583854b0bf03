"""Evaluation harness: benchmark metrics (``metrics``), task definitions (``tasks``) and the runner (``runner``).

Import the submodules directly, e.g. ``from vlmkit.evaluation.metrics import vqa_accuracy``; this package
does no work at import time.
"""

# Lazy exports (no import-time work): ``from vlmkit.evaluation import evaluate``.
_LAZY = {
    "evaluate": "vlmkit.evaluation.runner",
    "load_task": "vlmkit.evaluation.tasks",
    "get_task": "vlmkit.evaluation.tasks",
    "list_tasks": "vlmkit.evaluation.tasks",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmkit.evaluation' has no attribute {name!r}")
