"""Evaluation harness: benchmark metrics (``metrics``), task definitions (``tasks``), the runner (``runner``)
and the loop for dense segmenters such as FrozenSeg (``semantic``).

Import the submodules directly, e.g. ``from vlmkit.evaluation.metrics import vqa_accuracy``; this package
does no work at import time.
"""

from .._lazy import lazy_exports

_LAZY = {
    "evaluate": "vlmkit.evaluation.runner",
    "evaluate_semantic": "vlmkit.evaluation.semantic",
    "load_task": "vlmkit.evaluation.tasks",
    "get_task": "vlmkit.evaluation.tasks",
    "list_tasks": "vlmkit.evaluation.tasks",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
