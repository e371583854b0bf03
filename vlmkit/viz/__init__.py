"""Pictures a person would rather look at: pruning maps and mask overlays (PIL images, saved as PNG)."""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "pruning_map": "vlmkit.viz.pruning",
    "mask_overlay": "vlmkit.viz.masks",
    "mask_comparison": "vlmkit.viz.masks",
    "line_plot": "vlmkit.viz.plot",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
