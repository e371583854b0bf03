"""MouSi position schemes (Fan et al., arXiv 2401.17221): make an image occupy fewer positions.

MouSi released no code; the scheme definitions below are our reconstruction from the abstract ("4096 → 64 or
even 1" positions for SAM), not the paper's figure. Choices made where the abstract is silent, for every mode:
text tokens (image markers included) advance by 1; an image's block starts one after the token before it (a
block at the start of a row after position -1); the text after an image resumes one after the block's
*uncompressed* span, so pruning never moves text; tiles/frames of one image stack their rows (row =
``VisualTokens.index // w``).

Images made of several expert blocks (``VisualTokens.blocks``, MouSi poly-visual experts; a choice)
lay the blocks out one after the other, each by the same rule: with ``"shared"`` each block takes one
position (K experts → K positions), with ``"row"`` a block of an R×C grid takes R positions, with
``"original"`` R·C. Example, text a, an image of a 1×2 block then a 2×2 block, text b::

    slot       a   e0  e0  e1  e1  e1  e1  b
    shared     0   1   1   2   2   2   2   3
    row        0   1   1   2   2   3   3   4
    original   0   1   2   3   4   5   6   7

An image whose tiles reach the language model as several runs separated by text (SmolVLM / Idefics3 put
``<row_r_col_c>`` markers between tiles) lays out each run as its own block of the tiles it holds, by the
same rule, with the marker text between them advancing by 1 as any text ([choice]; a tile whose tokens
were all pruned takes no positions). Tiles t0..t1 of an h×w grid in one run: ``"shared"`` 1 position,
``"row"`` (t1-t0+1)·h, ``"original"`` (t1-t0+1)·h·w.

M-RoPE decoders (Qwen2.5-VL …; ``mousi_mrope_offsets``): an image's tokens have (t, h, w) positions, laid out from
its first position L by the family from the token's own offsets o = (t, row, col): ``"original"`` keeps them (the
model's own grid, text resumes at L + max(h, w)), ``"row"`` puts every column at column 0, (t, row, 0) (one
position per row, text resumes at L + h), ``"shared"`` puts every token at (0, 0, 0), i.e. (L, L, L) (text resumes at
L + 1). Text a, a 2×3 image, text b (a at 0, so L = 1)::

    slot        a          v00        v02        v12        b
    original    (0,0,0)    (1,1,1)    (1,1,3)    (1,2,3)    (4,4,4)
    row         (0,0,0)    (1,1,1)    (1,1,1)    (1,2,1)    (3,3,3)
    shared      (0,0,0)    (1,1,1)    (1,1,1)    (1,1,1)    (2,2,2)

Unlike 1-D ``"original"`` (the raster index, span h·w), M-RoPE's spans max(h, w): the model's own positions.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING, Sequence

import torch

from ..config import StageConfig, register_stage
from .rotary import RotaryPositionStage, check_masks, visual_runs

if TYPE_CHECKING:
    from ..sequence import AssembledBatch

MODES = ("shared", "row", "original")


@dataclasses.dataclass
class MouSiPositionConfig(StageConfig):
    """MouSi position scheme; ``mode`` is one of ``"shared"``, ``"row"`` (default), ``"original"``.

    ``"shared"``: every visual token of an image takes one position (span 1). Text a, 2×3 image, text b::

        slot      a   v00 v01 v02 v10 v11 v12  b
        cell      -   0   1   2   3   4   5    -
        position  0   1   1   1   1   1   1    2

    ``"row"``: one position per grid row (span = rows: CLIP 24, SAM 64). Same layout::

        slot      a   v00 v01 v02 v10 v11 v12  b
        row       -   0   0   0   1   1   1    -
        position  0   1   1   1   2   2   2    3

    ``"original"``: each token keeps the position of its grid cell in the uncompressed image (span = all
    cells), so after pruning the kept tokens, and the text after them, keep their unpruned positions.
    The same image pruned to cells 0, 2, 4::

        slot      a   v00 v02 v11  b
        cell      -   0   2   4    -
        position  0   1   3   5    7

    Shared positions make the tokens of a block indistinguishable to RoPE (only content tells them apart);
    ``"shared"`` loses the 2-D layout, which hurts grounding/OCR (expected; not a published MouSi result).
    """

    type = "mousi_position"
    display_name = "MouSi positions"
    requires = ("rope_positions",)
    mode: str = "row"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"MouSiPositionConfig.mode must be one of {list(MODES)}, got {self.mode!r}")


def mousi_position_ids(
    mode: str,
    attention_mask: torch.Tensor,
    image_id: torch.Tensor,
    visual_index: torch.Tensor,
    image_widths: Sequence[int],
    image_lengths: Sequence[int],
    image_blocks: Sequence[Sequence[tuple[int, tuple[int, int]]] | None] | None = None,
    image_heights: Sequence[int] | None = None,
) -> torch.LongTensor:
    """MouSi positions [B, S] (LongTensor; padding gets 1) for ``mode`` (see ``MouSiPositionConfig``).

    attention_mask [B, S]; image_id [B, S]: image of each visual slot, -1 elsewhere; visual_index [B, S]:
    the slot's cell in its image's uncompressed run (``VisualTokens.index``); image_widths[i] / image_lengths[i]:
    grid width and uncompressed token count of image i (all tiles). ``image_blocks[i]``, when given and not
    None, is image i's ``VisualTokens.blocks`` (expert sub-grids, laid out one after the other; its width
    is then unused). Slots are read per row in order. ``image_heights[i]`` (grid height of one tile) is
    needed only for an image whose tokens come as several runs (tiles separated by text): each run is then
    laid out as its own block of the tiles it holds (module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    visual_mask = image_id >= 0
    check_masks(visual_mask, attention_mask, image_id)
    if visual_index.shape != image_id.shape:
        raise ValueError(f"visual_index must be [B, S] like image_id, got {tuple(visual_index.shape)}")
    if len(image_widths) != len(image_lengths):
        raise ValueError(f"{len(image_widths)} image widths but {len(image_lengths)} image lengths")
    if image_blocks is not None and len(image_blocks) != len(image_lengths):
        raise ValueError(f"{len(image_blocks)} image block layouts but {len(image_lengths)} image lengths")
    B, S = attention_mask.shape
    out = torch.ones((B, S), dtype=torch.long, device=attention_mask.device)
    for b, cols, segments in visual_runs(visual_mask, attention_mask, image_id):
        pos = torch.empty(cols.numel(), dtype=torch.long, device=attention_mask.device)
        counter = -1
        runs_of = Counter(key for _, _, key in segments if key >= 0)
        for start, end, key in segments:
            n = end - start
            if key < 0:  # text
                pos[start:end] = torch.arange(counter + 1, counter + 1 + n, device=pos.device)
                counter += n
                continue
            if key >= len(image_lengths):
                raise ValueError(f"image_id {key} but only {len(image_lengths)} image sizes given")
            blocks = None if image_blocks is None else image_blocks[key]
            w, length = int(image_widths[key]), int(image_lengths[key])
            if blocks is None and (w <= 0 or length <= 0 or length % w):
                raise ValueError(f"image {key}: {length} tokens do not form rows of width {w}")
            index = visual_index[b, cols[start:end]].long()
            if bool((index < 0).any()) or bool((index >= length).any()):
                raise ValueError(f"image {key}: visual_index outside [0, {length})")
            L = counter
            if runs_of[key] > 1:  # tiles separated by text: this run is a block of the tiles it holds
                if blocks is not None or image_heights is None:
                    raise ValueError(f"the visual tokens of image {key} are not contiguous in row {b} "
                                     "(several runs need image_heights and no expert blocks)")
                offset, span = _tile_run_positions(mode, index, int(image_heights[key]), w)
                pos[start:end] = L + offset
                counter = L + span
                continue
            if blocks is not None:
                offset, span = _block_positions(mode, index, blocks, length, key)
                pos[start:end] = L + offset
                counter = L + span
                continue
            if mode == "shared":
                pos[start:end] = L + 1
                counter = L + 1
            elif mode == "row":
                pos[start:end] = L + 1 + torch.div(index, w, rounding_mode="floor")
                counter = L + length // w
            else:  # original
                pos[start:end] = L + 1 + index
                counter = L + length
        out[b, cols] = pos
    return out


def mousi_mrope_offsets(mode: str, offsets: torch.Tensor) -> torch.Tensor:
    """MouSi under M-RoPE: an image's own offsets [3, N] (t, row, col) → float64 [3, N]: ``"original"`` the same,
    ``"row"`` (t, row, 0), ``"shared"`` zeros (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    o = offsets.to(torch.float64)
    if mode == "shared":
        return torch.zeros_like(o)
    if mode == "row":
        return torch.stack([o[0], o[1], torch.zeros_like(o[2])])
    return o


def _tile_run_positions(mode: str, index: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int]:
    """Offsets from ``L + 1`` of one run of an image's tokens (run positions ``index`` [K], tiles of h×w),
    and the positions the run spans: the tiles from its first to its last token, uncompressed."""
    tile = h * w
    first, last = int(index.min()) // tile, int(index.max()) // tile
    local = index - first * tile
    if mode == "shared":
        return torch.ones_like(index), 1
    if mode == "row":
        return 1 + torch.div(local, w, rounding_mode="floor"), (last - first + 1) * h
    return 1 + local, (last - first + 1) * tile  # original


def _block_positions(mode: str, index: torch.Tensor, blocks, length: int, key: int) -> tuple[torch.Tensor, int]:
    """Offsets from ``L + 1`` of the tokens at run positions ``index`` [K] of an image of expert ``blocks``,
    and the number of positions the whole (uncompressed) image spans."""
    from ..tokens import check_blocks

    try:
        blocks = check_blocks(blocks, length)
    except ValueError as err:
        raise ValueError(f"image {key}: {err}") from None
    device = index.device
    offsets = torch.tensor([o for o, _ in blocks], dtype=torch.long, device=device)
    widths = torch.tensor([g[1] for _, g in blocks], dtype=torch.long, device=device)
    rows = torch.tensor([g[0] for _, g in blocks], dtype=torch.long, device=device)
    block = torch.bucketize(index, offsets, right=True) - 1  # [K] expert block of each token
    if mode == "shared":
        return 1 + block, len(blocks)
    if mode == "row":
        row_base = torch.cumsum(rows, 0) - rows  # positions used by the blocks before
        local = index - offsets[block]
        return 1 + row_base[block] + torch.div(local, widths[block], rounding_mode="floor"), int(rows.sum())
    return 1 + index, length  # original


@register_stage(MouSiPositionConfig)
class MouSiPosition(RotaryPositionStage):
    """MouSi position stage: reads grid cells from ``batch.visual_index`` and sizes from ``batch.tokens``."""

    def mrope_layout(self, batch: "AssembledBatch", training: bool | None = None):
        return lambda image, offsets: mousi_mrope_offsets(self.config.mode, offsets)

    def rope_positions(self, batch: "AssembledBatch", training: bool | None = None) -> torch.Tensor:
        return mousi_position_ids(
            self.config.mode, batch.attention_mask, batch.image_id, batch.visual_index,
            [t.grid[1] for t in batch.tokens], [t.num_uncompressed for t in batch.tokens],
            [getattr(t, "blocks", None) for t in batch.tokens], [t.grid[0] for t in batch.tokens],
        ).to(torch.float64)
