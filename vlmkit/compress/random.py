"""Random pruning baseline: keep a uniformly random subset of each image's tokens, in original order.

Images with image-newline tokens (``VisualTokens.source == -1``, LLaVA-NeXT / OneVision AnyRes) keep every
newline and draw the budget from their grid tokens only (``PruneStage.compress``), so
``keep_ratio`` / ``num_keep`` count exactly the kept grid tokens, as in FoPru.
"""

from __future__ import annotations

import dataclasses

import torch

from . import PruneConfig, PruneStage
from ..config import register_stage
from ..tokens import VisualTokens


@dataclasses.dataclass
class RandomPruneConfig(PruneConfig):
    """Keep ``keep_ratio`` (or ``num_keep``) random tokens per image.

    The generator is re-seeded with ``seed`` for every image, so the kept positions depend only on
    (seed, number of tokens): reproducible and independent of the batch an image comes in.
    """

    type = "random"
    display_name = "random"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


@register_stage(RandomPruneConfig)
class RandomPrune(PruneStage):
    """Training-free baseline: a seeded random subset of ``K`` tokens per image."""

    def select(self, tokens: VisualTokens, num_keep: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed)
        return torch.randperm(tokens.num_tokens, generator=generator)[:num_keep].sort().values
