"""VTW (Lin et al., 2024, "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal"): withdraw
every visual token before decoder layer K.

Reference: ``lzhxmu/VTW@a3d8cfc3c3f8c957b02b504f85e140d633c30453``, ``llava/model/language_model/VTW.py:15-29``
(defaults), ``:234-265`` (K search), ``:307-337`` (the drop), ``README.md:27-58``.

Kept from the reference: in the prefill, all visual tokens are removed from the hidden states entering layer K
(default K=15 for LLaVA-1.5-7B's 32 layers); text tokens keep their original positions (``pe_type="keep"``, the
default); layers < K cache the full prompt, layers ≥ K only the text.

Choices this module fixes where the reference is open or differs:

- **K for other depths**: ``layer`` (0-based K) when given; otherwise ``K = floor(L·layer_fraction + 0.5)`` with
  ``layer_fraction = 15/32`` (the reference's K for 32 layers; e.g. 28 layers → 13, 40 → 19), clamped to 1..L−1.
  The reference's K search (KL divergence of last-token logits over candidate K, ``findk=True``) only logs the
  divergences and leaves the threshold to the user: not implemented.
- **Image spans**: the reference slices constant spans (``system_token_nums=35``, ``image_token_nums=576``, same
  layout in every row); here each row's own visual slots (every image, any padding) are withdrawn; image-newline
  tokens (LLaVA-NeXT / OneVision) are visual tokens too and are withdrawn with them.
- **Mask**: the reference leaves the 4-D mask of the SDPA/eager path unsliced (unclear how the sizes agree); here
  each row gets its own mask over its remaining tokens (``vlmkit.decoder.prune``).
- ``pe_type`` re-numbering (truncated ids) is not offered; positions are always the original ones.
- **Nothing withdrawn**: ``layer = L`` (the decoder's depth: "after the last layer") is accepted and withdraws
  nothing: the unwrapped model exactly (the neutral setting, as ``keep_ratio=1`` for the other pruners). ``layer``
  above L is refused at ``wrap()``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import StageConfig, register_stage
from .prune import DecoderPruneStage, check_drop_schedule

DEFAULT_FRACTION = 15 / 32


@dataclasses.dataclass
class VTWConfig(StageConfig):
    """VTW: every visual token is withdrawn before decoder layer ``layer`` (None: ``layer_fraction`` of the depth;
    ``layer`` = the decoder's depth L withdraws nothing)."""

    type = "vtw"
    display_name = "VTW"
    layer: int | None = None
    layer_fraction: float = DEFAULT_FRACTION

    def validate(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1):
            raise ValueError(f"layer must be None or an int >= 1, got {self.layer!r}")
        if isinstance(self.layer_fraction, bool) or not isinstance(self.layer_fraction, (int, float)) or \
                not 0.0 < float(self.layer_fraction) < 1.0:
            raise ValueError(f"layer_fraction must be in (0, 1), got {self.layer_fraction!r}")

    def drop_layer(self, num_layers: int) -> int:
        if self.layer is not None:
            return self.layer
        return min(max(1, math.floor(num_layers * float(self.layer_fraction) + 0.5)), num_layers - 1)

    def drop_schedule(self, num_layers: int, num_visual: int) -> list[tuple[int, int]]:
        k = self.drop_layer(num_layers)
        if k == num_layers:  # withdrawn after the last layer: nothing is
            return []
        if k > num_layers:
            raise ValueError(f"{self.type}: layer={k} is past the decoder's {num_layers} layers; accepted: "
                             f"1..{num_layers} ({num_layers}: nothing withdrawn)")
        return check_drop_schedule([(k, 0)], num_layers, self.type)


@register_stage(VTWConfig)
class VTW(DecoderPruneStage):
    def score_layer(self, drop_layer):
        return None  # nothing to score: everything visual goes

    def drop_newlines(self) -> bool:
        return True

    def select(self, scores, num_keep):
        return torch.arange(num_keep)
