"""A test-only pruner written exactly as a user would write one: a config, a ``select`` and one registration line.

Importing this module is all it takes for ``test_largest_norm`` to appear in the conformance battery
(``tests/test_stage_contract.py``) and as a column of the compatibility matrix (``vlmkit.compat``).
"""

from __future__ import annotations

import dataclasses

import torch

from vlmkit.compress import PruneConfig, PruneStage
from vlmkit.config import register_stage


@dataclasses.dataclass
class LargestNormConfig(PruneConfig):
    """Keep the ``keep_ratio`` (or ``num_keep``) visual tokens of each image with the largest L2 norm."""

    type = "test_largest_norm"


def largest_norm_select(embeds: torch.Tensor, num_keep: int) -> torch.Tensor:
    """embeds [N, D] -> the positions of the ``num_keep`` largest L2 norms, increasing (ties: lower index)."""
    norms = embeds.detach().float().norm(dim=-1)
    order = torch.sort(norms, descending=True, stable=True).indices
    return order[:num_keep].sort().values


@register_stage(LargestNormConfig)
class LargestNorm(PruneStage):
    def select(self, tokens, num_keep: int) -> torch.Tensor:
        return largest_norm_select(tokens.embeds, num_keep)
