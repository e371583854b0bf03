"""DivPrune (Alvar et al., CVPR 2025): keep the most *diverse* tokens, a max–min (farthest-point) subset
under cosine distance of the projected visual tokens (reference: ``vbdi/divprune``, ``llava_arch.py``).

The first pick is the token farthest from its nearest neighbour; each next pick maximises the distance
to the closest already-kept token. Kept indices are returned in original order. Training-free.
Image-newline tokens (``VisualTokens.source == -1``, LLaVA-NeXT / OneVision) are always kept and the budget
counts grid tokens only (``PruneStage.compress``); the diversity search runs on the grid
tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from . import PruneConfig, PruneStage
from ..config import register_stage
from ..tokens import VisualTokens


@dataclasses.dataclass
class DivPruneConfig(PruneConfig):
    """Keep ``keep_ratio`` (or ``num_keep``) tokens per image by max–min diversity."""

    type = "divprune"
    display_name = "DivPrune"


def divprune_select(embeds: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Max–min diverse subset: embeds [N, D] -> LongTensor [K] of increasing indices (ties: lower index)."""
    N = embeds.shape[0]
    if not 1 <= num_keep <= N:
        raise ValueError(f"num_keep must be in 1..{N}, got {num_keep}")
    x = torch.nn.functional.normalize(embeds.detach().float(), dim=-1)
    dist = 1.0 - x @ x.T  # [N, N] cosine distance
    nearest = dist.masked_fill(torch.eye(N, dtype=torch.bool, device=dist.device), float("inf")).amin(dim=1)
    first = int(torch.argmax(nearest)) if N > 1 else 0
    chosen = torch.zeros(N, dtype=torch.bool, device=dist.device)
    chosen[first] = True
    min_dist = dist[first].clone()  # distance of every token to its closest kept token
    for _ in range(num_keep - 1):  # index tensors, never read back to the host: no device sync per pick
        nxt = torch.argmax(min_dist.masked_fill(chosen, float("-inf"))).view(1)
        chosen.index_fill_(0, nxt, True)
        min_dist = torch.minimum(min_dist, dist.index_select(0, nxt)[0])
    return chosen.nonzero().flatten()


@register_stage(DivPruneConfig)
class DivPrune(PruneStage):
    """Training-free baseline: diversity-based selection on the tokens the language model would see."""

    def select(self, tokens: VisualTokens, num_keep: int) -> torch.Tensor:
        return divprune_select(tokens.embeds, num_keep)
