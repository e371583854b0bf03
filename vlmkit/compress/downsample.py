"""Image downsampling baseline (VTC-Bench, Liao et al. 2025, "Are We Using the Right Benchmark: An Evaluation
Framework for Visual Token Compression Methods"): fewer pixels in, fewer visual tokens out; nothing is scored.

Reference: ``Chenfei-Liao/VTC-Bench@983e443ebb41fac8db19829499fe388c87885b58``,
``external/DART/lmms-eval/lmms_eval/models/qwen2_vl.py:243-283`` (the resize), ``scripts/dart.sh:18-49``,
``tools/analyze_results.py:18-21`` (the budget equivalence). There, every PIL image is resized to
``(w // r, h // r)`` with ``Image.BICUBIC`` before the processor (integer r from ``VTC_IMAGE_RATIO``), and
Qwen2-VL's own processor picks the (smaller) token grid; r = 2, 3, 4, 5, 10 stand for keep 0.25, 0.111, 0.0625,
0.04, 0.01 (≈ 1/r²).

How vlmkit does it, and why: a fixed-grid tower (LLaVA-1.5's CLIP at 336 px, 24×24 tokens) would scale a
smaller image back up to its tile size, so resizing before the processor gives the same 576 tokens of a
blurrier image. Two routes keep the budget: run the tower on fewer pixels (position embeddings interpolated to
the smaller patch grid), or blur the tile and average-pool the full token grid. The second is token pooling, a
different method; the first is VTC-Bench's "fewer pixels in → fewer tokens out", as Qwen2-VL's tower handles a
smaller image natively. So:

- Grid: for a budget of k tokens on a tile of h×w tokens the tower runs on an h'×w' grid (``downsample_grid``):
  each side within one cell of the aspect-preserving size ``h·s``, ``w·s`` with s = √(k / (h·w)) (a' ∈ {⌊·⌋,
  ⌈·⌉}), the smallest such grid with h'·w' ≥ k (ties: fewer rows). LLaVA-1.5 (24×24): keep 0.5 (288) → 17×17,
  0.25 (144) → 12×12 (A.8's r = 2), 0.11 (63) → 8×8; the shipped shapes model (8×8): 32 → 6×6, 16 → 4×4, 7 → 3×3.
- Exact count: when h'·w' > k (r·grid not an integer), the n = h'·w' small-grid tokens are trimmed to exactly
  k by keeping row-major positions ``⌊i·n/k⌋``, i = 0…k−1 (``trim_positions``: the n − k dropped tokens are
  spread evenly, e.g. 36 → 32 drops positions 8, 17, 26, 35). ``keep_count`` / ``num_keep`` therefore hold
  exactly, as for every pruner.
- Pixels: the processor's tile (already resized, cropped and normalised) is resized to (h'·t, w'·t) px, t the
  pixels per visual token (LLaVA: the patch size), by ``torch.nn.functional.interpolate(mode="bicubic",
  antialias=True)`` in float32 (PIL's BICUBIC is antialiased when it shrinks). Resizing after normalising equals
  resizing before (the normalisation is per-channel affine), except that PIL clamps to 0…255 and this does not
  (the stage does not know the processor's mean / std). VTC-Bench resizes the original image; here the tile
  the processor made of it.
- Tower: ``Family.on_resized_vision`` (capability ``vision_resize``): the model's own tower runs on the small
  tile with its position embeddings bicubically interpolated by transformers (``interpolate_pos_encoding``),
  its own feature layer and projector; the projector's output [tiles, h'·w', D] is laid back onto the full
  h×w grid (each cell takes the small-grid token whose area covers its centre, ``nearest_small``) so the rest of
  the model's code runs unchanged, and ``compress`` keeps exactly one cell per kept small-grid token
  (``representative_cells``: the cell under the token's centre; ``VisualTokens.index`` says where it sits).
  The kept embeddings are therefore the model's own projected features of the downsampled tile.
- Positions: the kept tokens are spliced as every pre-LLM pruner's (1-D RoPE: consecutive positions); Qwen2-VL
  in VTC-Bench lays M-RoPE out on the small grid, which a fixed-grid 1-D RoPE model does not have.
- ``keep_ratio=1`` (k = h·w) leaves the tower alone: the unwrapped model exactly. A budget whose grid is the
  full one (k close to h·w) runs the tower at full size and only trims.
- Refused (``requires``): families that do not declare ``vision_resize`` (each says why in ``Family.lacks``:
  tiled, AnyRes-stitched or dynamic-resolution images), and images of several tiles (``single_tile``). Exclusive:
  it changes what the tower sees for every other compressor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import torch

from . import PruneConfig, PruneStage
from ..config import register_stage
from ..tokens import VisualTokens


@dataclasses.dataclass
class DownsampleConfig(PruneConfig):
    """Downsampling baseline: run the vision tower on a tile resized so that it yields ``keep_ratio`` (or
    ``num_keep``) visual tokens per image (``downsample_grid``, then trimmed to exactly that many)."""

    type = "downsample"
    display_name = "Downsample"
    requires = ("vision_resize", "patch_grid", "single_tile")  # checked in order: the specific reason first
    exclusive = True  # the tower sees the resized tile: no other compressor can share the images


def downsample_grid(grid: tuple[int, int], num_keep: int) -> tuple[int, int]:
    """The (h', w') token grid a tile of ``grid`` = (h, w) tokens is resized to for a budget of ``num_keep``:
    each side ⌊·⌋ or ⌈·⌉ of the aspect-preserving size (h·s, w·s), s = √(k / (h·w)), the smallest area ≥ k
    (ties: fewer rows). Exact integer arithmetic (no float rounding at perfect squares)."""
    h, w = int(grid[0]), int(grid[1])
    k = int(num_keep)
    if h < 1 or w < 1 or not 1 <= k <= h * w:
        raise ValueError(f"downsample_grid needs a grid of at least 1×1 and 1 <= num_keep <= h·w, got grid {grid} "
                         f"and num_keep={num_keep}")

    def sides(a: int, b: int, limit: int) -> set[int]:  # ⌊√(k·a/b)⌋ and ⌈√(k·a/b)⌉, within 1..limit
        low = math.isqrt(k * a // b)
        high = low if low * low * b == k * a else low + 1
        return {min(max(v, 1), limit) for v in (low, high)}

    candidates = [(a, b) for a in sides(h, w, h) for b in sides(w, h, w) if a * b >= k]
    return min(candidates, key=lambda ab: (ab[0] * ab[1], ab[0]))


def trim_positions(n: int, num_keep: int) -> torch.Tensor:
    """[k] increasing positions ``⌊i·n/k⌋`` (i = 0…k−1) of ``n`` small-grid tokens that stay: the n − k dropped are
    spread evenly over the row-major order."""
    if not 1 <= num_keep <= n:
        raise ValueError(f"trim_positions needs 1 <= num_keep <= n, got num_keep={num_keep}, n={n}")
    return torch.arange(num_keep, dtype=torch.long) * n // num_keep


def representative_cells(grid: tuple[int, int], small: tuple[int, int]) -> torch.Tensor:
    """[h'·w'] row-major cell of the full (h, w) grid under the centre of each small-grid token (row-major):
    row ``⌊(2i'+1)·h / (2h')⌋``, column likewise."""
    (h, w), (hs, ws) = grid, small
    rows = (2 * torch.arange(hs) + 1) * h // (2 * hs)
    cols = (2 * torch.arange(ws) + 1) * w // (2 * ws)
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def nearest_small(grid: tuple[int, int], small: tuple[int, int]) -> torch.Tensor:
    """[h·w] small-grid token (row-major) whose area covers the centre of each full-grid cell: row
    ``⌊(2i+1)·h' / (2h)⌋``, column likewise. ``nearest_small(...)[representative_cells(...)]`` is the identity."""
    (h, w), (hs, ws) = grid, small
    rows = (2 * torch.arange(h) + 1) * hs // (2 * h)
    cols = (2 * torch.arange(w) + 1) * ws // (2 * w)
    return (rows[:, None] * ws + cols[None, :]).reshape(-1)


def downsample_select(grid: tuple[int, int], num_keep: int) -> torch.Tensor:
    """[k] increasing cells of the full grid the kept tokens sit at: the representative cells of the
    ``downsample_grid`` tokens, trimmed to ``num_keep`` (``trim_positions``)."""
    small = downsample_grid(grid, num_keep)
    return representative_cells(grid, small)[trim_positions(small[0] * small[1], num_keep)]


def resize_pixels(pixel_values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size]: antialiased bicubic (PIL-like when shrinking), in float32, back to the dtype."""
    x = torch.nn.functional.interpolate(pixel_values.float(), size=tuple(size), mode="bicubic", align_corners=False,
                                        antialias=True)
    return x.to(pixel_values.dtype)


@register_stage(DownsampleConfig)
class Downsample(PruneStage):
    """Pre-LLM: the tower runs on a smaller tile; training-free, nothing scored."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self._restored: list[int] | None = None  # tiles laid back on the full grid: lives only in vision_context

    def attach(self, family) -> None:
        super().attach(family)
        (ph, pw), factor = family.patch_pooling(self.config.type)
        (p1, p2) = family.patch_size
        self._grid = (ph // factor, pw // factor)
        self._pixels_per_token = (p1 * factor, p2 * factor)

    def plan(self) -> tuple[int, tuple[int, int]]:
        """(k, (h', w')): tokens each image keeps and the grid the tower runs on."""
        h, w = self._grid
        k = self.config.num_to_keep(h * w)
        return k, downsample_grid((h, w), k)

    @contextlib.contextmanager
    def vision_context(self, family) -> Iterator[None]:
        _, small = self.plan()
        if small == self._grid:  # the tower runs at full size: only trimmed in compress (if at all)
            self._restored = []
            try:
                yield
            finally:
                self._restored = None
            return
        size = (small[0] * self._pixels_per_token[0], small[1] * self._pixels_per_token[1])
        nearest = nearest_small(self._grid, small)
        restored: list[int] = []

        def restore(features: torch.Tensor) -> torch.Tensor:
            if features.dim() != 3 or features.shape[1] != small[0] * small[1]:
                raise ValueError(f"downsample: the projector returned {tuple(features.shape)} for tiles resized to "
                                 f"{small[0]}×{small[1]} tokens ({size[0]}×{size[1]} px)")
            restored.append(int(features.shape[0]))
            return features[:, nearest.to(features.device)]

        handle = family.on_resized_vision(lambda pixels: resize_pixels(pixels, size), restore)
        self._restored = restored
        try:
            yield
        finally:
            handle.remove()
            self._restored = None

    def compress(self, tokens: list[VisualTokens]) -> list[VisualTokens]:
        _, small = self.plan()
        if small != self._grid:
            if self._restored is None:
                raise RuntimeError("downsample.compress needs the resized tower run of its vision_context "
                                   "(use VLMWrapper)")
            tiles = sum(t.num_uncompressed // (self._grid[0] * self._grid[1]) for t in tokens)
            if sum(self._restored) != tiles:
                raise ValueError(f"downsample resized {sum(self._restored)} tower tiles but the images hold {tiles}: "
                                 "another stage re-ran the vision tower?")
        return super().compress(tokens)

    def select(self, tokens: VisualTokens, num_keep: int) -> torch.Tensor:
        h, w = self._grid
        if tokens.grid != (h, w) or tokens.num_tokens != h * w:
            raise ValueError(f"downsample prunes one tile of {h}×{w} tokens per image, got {tokens.num_tokens} tokens "
                             f"on grid {tokens.grid}")
        return downsample_select((h, w), num_keep).to(tokens.embeds.device)
