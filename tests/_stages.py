"""Test-only stages: a compressor that keeps every other visual token and scales them (one parameter)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vlmkit.config import StageConfig, register_config_class
from vlmkit.stage import Stage


@register_config_class
@dataclasses.dataclass
class DropEveryOtherConfig(StageConfig):
    """Keep visual tokens 0, 2, 4, … of every image; multiply them by a trainable ``scale``."""

    type = "test_drop_every_other"
    role = "compressor"
    stage_class = "_stages:DropEveryOther"
    scale: float = 1.0

    def validate(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


class DropEveryOther(Stage):
    def __init__(self, config: DropEveryOtherConfig) -> None:
        super().__init__(config)
        self.scale = nn.Parameter(torch.tensor(float(config.scale)))

    def compress(self, tokens):
        out = []
        for t in tokens:
            kept = t.select(torch.arange(0, t.num_tokens, 2))
            out.append(dataclasses.replace(kept, embeds=kept.embeds * self.scale))
        return out
