"""DivPrune (Alvar et al., CVPR 2025): keep the most *diverse* tokens, a max–min (farthest-point) subset
under cosine distance of the projected visual tokens (reference: ``vbdi/divprune``, ``llava_arch.py``).

The first pick is the token farthest from its nearest neighbour; each next pick maximises the distance
to the closest already-kept token. Kept indices are returned in original order. Training-free.
Image-newline tokens (``VisualTokens.source == -1``, LLaVA-NeXT / OneVision) are always kept and the budget
counts grid tokens only (``PruneStage.compress``); the diversity search runs on the grid
tokens.

Where vlmkit differs from the reference (each with the reference's rule as an option):

- Budget (``budget``). The reference keeps ``int(round(r · L))`` tokens (Python's round, half to even);
  vlmkit's pruners share ``max(1, floor(L · r))`` (``vlmkit.compress.keep_count``), so 576 tokens at
  ``keep_ratio=0.1`` keep 57 by default and 58 with ``budget="round"`` (at least 1 either way).
- Distances (``distances``). The reference normalises the tokens and multiplies them in their own dtype
  (bfloat16 / float16 in practice), ``x / x.norm()`` without an epsilon, takes as first pick the column
  maximum of the *second smallest* distance (the smallest being, normally, the token's distance to itself)
  and ranks every later pick over all tokens. vlmkit's default (``"float32"``) computes in float32 with
  ``F.normalize`` (epsilon: a zero token gives distances of 1, not NaN), masks the diagonal for the first pick
  and never re-picks a kept token: the same picks wherever rounding does not reorder near-ties.
  ``distances="reference"`` reproduces the reference's arithmetic; a kept token is still never picked twice
  (the reference could re-pick one only when every remaining distance is at most a kept token's rounded
  self-distance).
"""

from __future__ import annotations

import dataclasses

import torch

from . import PruneConfig, PruneStage
from ..config import register_stage
from ..tokens import VisualTokens

#: ``DivPruneConfig.budget`` values: vlmkit's shared floor rule, or the reference's round.
BUDGETS = ("floor", "round")
#: ``DivPruneConfig.distances`` values: float32 (vlmkit) or the reference's dtype and first-pick rule.
DISTANCES = ("float32", "reference")


@dataclasses.dataclass
class DivPruneConfig(PruneConfig):
    """Keep ``keep_ratio`` (or ``num_keep``) tokens per image by max–min diversity.

    ``budget``: ``"floor"`` (default; ``max(1, floor(G · keep_ratio))`` like every vlmkit pruner) or ``"round"``
    (the reference's ``int(round(keep_ratio · G))``, at least 1): 576 × 0.1 keeps 57 or 58. ``distances``:
    ``"float32"`` (default) or ``"reference"`` (the embeddings' own dtype and the reference's first pick);
    see the module docstring. ``num_keep`` is exact under either budget.
    """

    type = "divprune"
    display_name = "DivPrune"

    budget: str = "floor"
    distances: str = "float32"

    def validate(self) -> None:
        super().validate()
        if self.budget not in BUDGETS:
            raise ValueError(f"DivPruneConfig.budget must be one of {list(BUDGETS)}, got {self.budget!r}")
        if self.distances not in DISTANCES:
            raise ValueError(f"DivPruneConfig.distances must be one of {list(DISTANCES)}, got {self.distances!r}")

    def num_to_keep(self, num_tokens: int) -> int:
        if self.num_keep is None and self.budget == "round":
            return 0 if num_tokens == 0 else max(1, int(round(float(self.keep_ratio) * num_tokens)))
        return super().num_to_keep(num_tokens)


def _distances(embeds: torch.Tensor, distances: str) -> torch.Tensor:
    """Cosine distances [N, N] of one image's tokens [N, D] (``distances``: module docstring)."""
    if distances == "reference":  # the reference's pairwise_cosine_similarity, in the input dtype
        x = embeds.detach()
        x = x / x.norm(dim=1, keepdim=True)
        return 1.0 - torch.mm(x, x.t())
    x = torch.nn.functional.normalize(embeds.detach().float(), dim=-1)
    return 1.0 - x @ x.T


def divprune_select(embeds: torch.Tensor, num_keep: int, distances: str = "float32") -> torch.Tensor:
    """Max–min diverse subset: embeds [N, D] -> LongTensor [K] of increasing indices (ties: lower index); or
    embeds [B, N, D] (B images of N tokens) -> [B, K], each row what its image alone gives (one distance product
    per image, so the values are the same; one greedy loop for all B, so B× fewer kernel launches per pick).

    ``distances``: ``"float32"`` or ``"reference"`` (module docstring)."""
    if embeds.dim() not in (2, 3):
        raise ValueError(f"embeds must be [N, D] or [B, N, D], got shape {tuple(embeds.shape)}")
    batch = embeds if embeds.dim() == 3 else embeds[None]
    B, N = batch.shape[:2]
    if not 1 <= num_keep <= N:
        raise ValueError(f"num_keep must be in 1..{N}, got {num_keep}")
    if distances not in DISTANCES:
        raise ValueError(f"distances must be one of {list(DISTANCES)}, got {distances!r}")
    dist = torch.stack([_distances(x, distances) for x in batch])  # [B, N, N]
    if N == 1:
        first = torch.zeros(B, dtype=torch.long, device=dist.device)
    elif distances == "reference":  # per column, the second smallest (the smallest: the token itself)
        first = torch.topk(dist, 2, dim=1, largest=False).values[:, 1].argmax(dim=-1)
    else:  # the token farthest from its nearest other token
        eye = torch.eye(N, dtype=torch.bool, device=dist.device)
        first = dist.masked_fill(eye, float("inf")).amin(dim=2).argmax(dim=-1)
    rows = lambda idx: dist.gather(1, idx[:, :, None].expand(B, 1, N))[:, 0]  # dist[b, idx[b]]: [B, N]
    chosen = torch.zeros(B, N, dtype=torch.bool, device=dist.device)
    chosen.scatter_(1, first[:, None], True)
    min_dist = rows(first[:, None])  # distance of every token to its closest kept token
    for _ in range(num_keep - 1):  # index tensors, never read back to the host: no device sync per pick
        nxt = min_dist.masked_fill(chosen, float("-inf")).argmax(dim=-1, keepdim=True)  # [B, 1]
        chosen.scatter_(1, nxt, True)
        min_dist = torch.minimum(min_dist, rows(nxt))
    kept = chosen.nonzero()[:, 1].view(B, num_keep)  # row-major: each row's indices increasing
    return kept if embeds.dim() == 3 else kept[0]


@register_stage(DivPruneConfig)
class DivPrune(PruneStage):
    """Training-free baseline: diversity-based selection on the tokens the language model would see."""

    def select(self, tokens: VisualTokens, num_keep: int) -> torch.Tensor:
        return divprune_select(tokens.embeds, num_keep, self.config.distances)

    def select_many(self, tokens: list[VisualTokens], num_keep: int) -> torch.Tensor:
        return divprune_select(torch.stack([t.embeds for t in tokens]), num_keep, self.config.distances)
