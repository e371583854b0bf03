"""Evaluation harness: benchmark metrics (``metrics``), task definitions (``tasks``) and the runner (``runner``).

Import the submodules directly, e.g. ``from vlmkit.evaluation.metrics import vqa_accuracy``; this package
does no work at import time.
"""
