"""``VisualTokens``: the one data structure that crosses stage boundaries, one per image."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class VisualTokens:
    """The visual tokens of one image, and where each came from.

    Fields:
      embeds: [K, D] token embeddings in the language model's width.
      index:  [K] LongTensor, strictly increasing: the position of each token in the image's
              *uncompressed* placeholder run. For a single-grid image that is the row-major cell
              ``row * w + col``; for an image of several tiles/frames it is ``frame * h * w + cell``.
      grid:   (h, w) of one uncompressed tile/frame.
      frame:  [K] LongTensor (tile or frame of each token) or None for single-grid images.
      scores: [N] per-token significance over the uncompressed tokens (N = frames·h·w), set by a
              compressor that scores tokens (e.g. FoPru); None otherwise.
      num_uncompressed: N, the length of the placeholder run the processor emitted for this image.
      blocks: optional layout of an image made of several sub-grids (MouSi poly-visual experts):
              ``[(offset, (h, w)), ...]`` in run order; block k covers the uncompressed run positions
              ``offset .. offset + h·w - 1``, row-major over its own (h, w) grid. Blocks are contiguous
              from 0 and cover all ``num_uncompressed`` positions. None (default): one grid, ``grid``.
              Position schemes (MouSi ``shared`` / ``row``) lay the blocks out one after the other.
      source: optional [K] LongTensor: the vision-tower patch token each token came from, as a flat index
              ``tile · (patches per tile) + patch`` over the image's tiles in the order the tower ran them
              (the order FoPru records its per-tile scores), or -1 for an *image-newline* token (LLaVA-NeXT /
              OneVision AnyRes rows end with a learned embedding that comes from no patch). None (default):
              the identity, token ``index`` i came from tower token i (no newlines).
      num_sources: the length of the sequence ``source`` indexes (tiles · patches per tile of this image);
              required with ``source``, None without.

    Pruning rule for images with newline tokens (``source == -1``): they are always kept and do not count
    toward the budget; ``keep_ratio`` / ``num_keep`` count *grid* tokens only (``grid_positions``).
    """

    embeds: torch.Tensor
    index: torch.Tensor
    grid: tuple[int, int]
    frame: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    num_uncompressed: int | None = None
    blocks: list[tuple[int, tuple[int, int]]] | None = None
    source: torch.Tensor | None = None
    num_sources: int | None = None

    def __post_init__(self) -> None:
        if self.embeds.dim() != 2:
            raise ValueError(f"VisualTokens.embeds must be [K, D], got shape {tuple(self.embeds.shape)}")
        if self.index.shape != (self.embeds.shape[0],):
            raise ValueError(
                f"VisualTokens.index must be [K={self.embeds.shape[0]}], got shape {tuple(self.index.shape)}"
            )
        if self.num_uncompressed is None:
            self.num_uncompressed = int(self.embeds.shape[0])
        if self.blocks is not None:
            self.blocks = check_blocks(self.blocks, self.num_uncompressed)
        if (self.source is None) != (self.num_sources is None):
            raise ValueError(
                f"VisualTokens.source and num_sources go together, got source "
                f"{'None' if self.source is None else 'set'} and num_sources={self.num_sources!r}"
            )
        if self.source is not None:
            if self.source.shape != (self.embeds.shape[0],) or self.source.dtype != torch.long:
                raise ValueError(
                    f"VisualTokens.source must be a LongTensor [K={self.embeds.shape[0]}], got "
                    f"{self.source.dtype} of shape {tuple(self.source.shape)}"
                )
            n = int(self.num_sources)
            if self.source.numel() and (int(self.source.min()) < -1 or int(self.source.max()) >= n):
                raise ValueError(
                    f"VisualTokens.source must hold tower token indices in 0..{n - 1} (num_sources={n}) or -1 "
                    f"for newlines, got values in {int(self.source.min())}..{int(self.source.max())}"
                )

    @classmethod
    def full(cls, embeds: torch.Tensor, grid: tuple[int, int], frames: int = 1) -> "VisualTokens":
        """Uncompressed tokens of an image of ``frames`` tiles of ``grid`` cells each: embeds [frames·h·w, D]."""
        h, w = grid
        n = frames * h * w
        if embeds.shape[0] != n:
            raise ValueError(f"expected {frames}×{h}×{w}={n} visual tokens, got {embeds.shape[0]}")
        index = torch.arange(n, device=embeds.device)
        frame = index // (h * w) if frames > 1 else None
        return cls(embeds=embeds, index=index, grid=(h, w), frame=frame, num_uncompressed=n)

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def cell(self) -> torch.Tensor:
        """[K] row-major cell of each token within its own tile/frame."""
        return self.index % (self.grid[0] * self.grid[1])

    def select(self, keep: torch.Tensor) -> "VisualTokens":
        """Keep the tokens at positions ``keep`` ([K'] LongTensor into this object's tokens), in increasing order.

        The kept tokens keep their original order, so ``keep`` must be strictly increasing.
        """
        keep = keep.to(device=self.embeds.device, dtype=torch.long)
        if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
            raise ValueError(f"select() needs strictly increasing positions, got {keep.tolist()}")
        return dataclasses.replace(
            self,
            embeds=self.embeds[keep],
            index=self.index[keep],
            frame=None if self.frame is None else self.frame[keep],
            source=None if self.source is None else self.source[keep.to(self.source.device)],
        )

    @property
    def is_newline(self) -> torch.Tensor:
        """[K] bool: image-newline tokens (``source == -1``); all False without ``source``."""
        if self.source is None:
            return torch.zeros(self.num_tokens, dtype=torch.bool, device=self.embeds.device)
        return (self.source == -1).to(self.embeds.device)

    def grid_positions(self) -> torch.Tensor:
        """[G] LongTensor: positions (into this object's tokens) of the grid tokens, i.e. not newlines."""
        return torch.nonzero(~self.is_newline).flatten()

    def keep_with_newlines(self, keep: torch.Tensor) -> "VisualTokens":
        """``select`` the grid-token positions ``keep`` (any order) plus every newline token, in run order."""
        keep = keep.to(device=self.embeds.device, dtype=torch.long)
        if bool(self.is_newline[keep].any()):
            raise ValueError(
                f"keep_with_newlines() takes grid-token positions, got newline positions in {keep.tolist()}")
        if torch.unique(keep).numel() != keep.numel():
            raise ValueError(f"keep_with_newlines() needs distinct positions, got {keep.tolist()}")
        return self.select(torch.cat([keep, torch.nonzero(self.is_newline).flatten()]).sort().values)


def check_blocks(blocks, length: int) -> list[tuple[int, tuple[int, int]]]:
    """Validate ``VisualTokens.blocks`` against a run of ``length`` positions; return them normalised.

    Each block is ``(offset, (h, w))`` with h, w ≥ 1; offsets start at 0 and each block begins where the
    previous one ends; the last one ends at ``length``. ValueError naming the first offending block.
    """
    out: list[tuple[int, tuple[int, int]]] = []
    expected = 0
    for k, block in enumerate(blocks):
        try:
            offset, (h, w) = block
            offset, h, w = int(offset), int(h), int(w)
        except (TypeError, ValueError):
            raise ValueError(f"VisualTokens.blocks[{k}] must be (offset, (h, w)), got {block!r}") from None
        if h < 1 or w < 1 or offset != expected:
            raise ValueError(
                f"VisualTokens.blocks[{k}] = {block!r}: expected offset {expected} and a grid of h, w >= 1 "
                "(blocks are contiguous from 0)"
            )
        out.append((offset, (h, w)))
        expected = offset + h * w
    if not out or expected != length:
        raise ValueError(f"VisualTokens.blocks cover {expected} positions, but the run has {length}")
    return out
