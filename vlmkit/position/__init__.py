"""Position schemes: V2PE (fractional visual steps) and MouSi (shared / per-row / original positions).

Every scheme hands the language model ordinary integer ``position_ids`` and applies its own positions
inside the decoder's rotary embedding while the model runs (``rotary.py`` says why). Names resolve lazily.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "V2PEConfig": "vlmkit.position.v2pe",
    "v2pe_position_ids": "vlmkit.position.v2pe",
    "MouSiPositionConfig": "vlmkit.position.mousi",
    "mousi_position_ids": "vlmkit.position.mousi",
    "RotaryPositionStage": "vlmkit.position.rotary",
    "integer_positions": "vlmkit.position.rotary",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
