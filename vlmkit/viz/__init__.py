"""Pictures a person would rather look at: pruning maps and mask overlays (PIL images, saved as PNG)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "pruning_map": "vlmkit.viz.pruning",
    "mask_overlay": "vlmkit.viz.masks",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlmkit.viz' has no attribute {name!r}")
