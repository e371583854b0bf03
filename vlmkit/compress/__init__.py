"""Visual-token compressors: FoPru (``fopru``), PVC (``pvc``) and the baselines ``random`` and ``divprune``.

Each method lives in its own module and is reached through the stage registry (``vlmkit.config``), so
importing this package does no work beyond defining the shared budget rules below.

Budget (``keep_ratio`` / ``num_keep``), shared by every pruning stage:
  exactly one of the two is set; ``keep_ratio`` ∈ (0, 1] keeps ``max(1, floor(G · keep_ratio))`` of the
  G uncompressed *grid* tokens of *each image* (all its tiles together); ``num_keep`` keeps exactly that
  many per image and must not exceed the tokens of one tile (checked at ``wrap()`` time). Image-newline
  tokens (``VisualTokens.source == -1``, LLaVA-NeXT / OneVision AnyRes) are always kept and never counted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from ..config import StageConfig
from ..stage import CompressorStage

if TYPE_CHECKING:
    import torch

    from ..families.base import Family
    from ..tokens import VisualTokens


def keep_count(num_tokens: int, fraction: float) -> int:
    """The budget rule every pruner shares: ``max(1, floor(num_tokens · fraction))`` (0 for no tokens); the
    epsilon keeps e.g. 100 · 0.29 = 28.999… at 29."""
    return 0 if num_tokens == 0 else max(1, math.floor(num_tokens * float(fraction) + 1e-9))


@dataclasses.dataclass
class PruneConfig(StageConfig):
    """Base config of a pruning compressor: how many visual tokens each image keeps."""

    pruner = True
    keep_ratio: float | None = None
    num_keep: int | None = None

    def validate(self) -> None:
        if (self.keep_ratio is None) == (self.num_keep is None):
            raise ValueError(
                f"{type(self).__name__}: set exactly one of keep_ratio / num_keep "
                f"(got keep_ratio={self.keep_ratio!r}, num_keep={self.num_keep!r})"
            )
        if self.keep_ratio is not None:
            if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
                raise ValueError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
            if not 0.0 < float(self.keep_ratio) <= 1.0:
                raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.num_keep is not None:
            if isinstance(self.num_keep, bool) or not isinstance(self.num_keep, int) or self.num_keep < 1:
                raise ValueError(f"num_keep must be an int >= 1, got {self.num_keep!r}")

    @classmethod
    def example(cls) -> "PruneConfig":
        return cls(keep_ratio=0.5)

    def num_to_keep(self, num_tokens: int) -> int:
        """How many of ``num_tokens`` uncompressed tokens one image keeps (ValueError if more than it has)."""
        if self.num_keep is not None:
            k = self.num_keep
        else:
            k = keep_count(num_tokens, self.keep_ratio)
        if k > num_tokens:
            raise ValueError(f"num_keep={k} is larger than the {num_tokens} visual tokens of this image")
        return k


def same_size_groups(sizes: list[int]) -> list[list[int]]:
    """Indices of ``sizes`` grouped by equal value, groups in order of first appearance: the images a batched
    selection can take at once."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(sizes):
        groups.setdefault(n, []).append(i)
    return list(groups.values())


class PruneStage(CompressorStage):
    """Base of pruning stages: budget check at ``attach``; ``compress`` keeps ``select(tokens, k)`` of each
    image's grid tokens, plus its newline tokens (see the module docstring)."""

    def attach(self, family: "Family") -> None:
        n = family.tokens_per_tile
        if self.config.num_keep is not None and self.config.num_keep > n:
            raise ValueError(
                f"{self.config.type}: num_keep={self.config.num_keep} is larger than the {n} visual tokens "
                f"of one {family.model_type} image tile (grid {family.grid}); accepted: 1..{n}"
            )

    def select(self, tokens: "VisualTokens", num_keep: int) -> "torch.Tensor":
        """[K] strictly increasing positions into ``tokens`` (grid tokens only) to keep (override)."""
        raise NotImplementedError

    def select_many(self, tokens: list["VisualTokens"], num_keep: int) -> "torch.Tensor | None":
        """[n, K] positions for n ≥ 2 images of equal size without newline tokens, chosen in one batched pass
        (override where the method's selection loop batches; the result must equal ``select`` on each image
        alone). None: ``select`` one image at a time."""
        return None

    def compress(self, tokens: list["VisualTokens"]) -> list["VisualTokens"]:
        for t in tokens:
            if t.num_tokens != t.num_uncompressed:
                raise ValueError(
                    f"{self.config.type} prunes uncompressed images ({t.num_uncompressed} tokens) but got "
                    f"{t.num_tokens}: put it before other compressors"
                )
        out: list["VisualTokens | None"] = [None] * len(tokens)
        grids = [t.grid_positions() for t in tokens]
        plain = [i for i, (t, g) in enumerate(zip(tokens, grids)) if g.numel() == t.num_tokens]  # no newlines
        for group in same_size_groups([tokens[i].num_tokens for i in plain]):
            group = [plain[i] for i in group]
            picked = None if len(group) < 2 else \
                self.select_many([tokens[i] for i in group], self.config.num_to_keep(tokens[group[0]].num_tokens))
            if picked is not None:
                for i, keep in zip(group, picked):
                    out[i] = tokens[i].select(keep)
        for i, (t, grid) in enumerate(zip(tokens, grids)):
            if out[i] is not None:
                continue
            if grid.numel() == t.num_tokens:
                out[i] = t.select(self.select(t, self.config.num_to_keep(t.num_tokens)))
                continue
            sub = t.select(grid)
            out[i] = t.keep_with_newlines(grid[self.select(sub, self.config.num_to_keep(sub.num_tokens))])
        return out
