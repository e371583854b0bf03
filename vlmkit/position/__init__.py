"""Position schemes: V2PE (fractional visual steps) and MouSi (shared / per-row / original positions).

Every scheme hands the language model ordinary integer ``position_ids`` and applies its own positions
inside the decoder's rotary embedding while the model runs (``rotary.py`` says why). Names resolve lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "V2PEConfig": "vlmkit.position.v2pe",
    "v2pe_position_ids": "vlmkit.position.v2pe",
    "MouSiPositionConfig": "vlmkit.position.mousi",
    "mousi_position_ids": "vlmkit.position.mousi",
    "PositionStage": "vlmkit.position.rotary",
    "integer_positions": "vlmkit.position.rotary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmkit.position' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
