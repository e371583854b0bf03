"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes tiles packed with image-newline embeddings.

What the model does (transformers 5.24, ``LlavaNextModel.get_image_features`` / ``pack_image_features``):
each image is split by the processor into a *base* tile (the whole image resized to one tile) plus the
``nph × npw`` tiles of the best ``image_grid_pinpoints`` resolution; ``pixel_values`` is
``[num_images, max_tiles, C, H, W]`` (or the 4-D concatenation of every image's tiles). The tower runs on
every tile; the tiles after the base are stitched into one ``(nph·h) × (npw·w)`` grid, the rows/columns
the processor padded are cropped (``unpad_image``, from ``image_sizes``), and the learned
``image_newline`` embedding is appended after every row. One image's placeholder run is therefore::

    [base tile: h·w tokens, row-major] [AnyRes grid: R rows of (C grid tokens + 1 newline)]

How vlmkit describes it (``VisualTokens`` of one image; design choices of this module):

- ``embeds`` are the model's own packed features (``pooler_output``), so identity is bit-exact, and
  ``index`` is the position in that run (what ``assemble`` needs).
- ``grid`` is ``(h, w)`` of one tile (``Family.grid`` / ``tokens_per_tile`` too: 576 for the 336-px CLIP
  checkpoints), the unit V2PE's ``tokens_per_tile`` and the pruning budget ``num_keep`` refer to.
- ``blocks = [(0, (h, w)), (h·w, (R, C + 1))]``: the base tile and the AnyRes grid *including* its
  newline column. Position schemes that read blocks (MouSi) lay the two out one after the other; a
  newline shares its row's position.
- ``frame`` is the tower tile each token came from (0 = base, 1… = AnyRes tiles row-major over the
  ``nph × npw`` pinpoint grid) and **-1 for image-newline tokens**, which come from no tile.
- ``source`` is the tower patch token each run position came from (``tile · h·w + cell``, tiles in the
  order the tower runs them: base, then AnyRes tiles row-major), -1 for image-newline tokens;
  ``num_sources = tiles · h·w``. ``token_sources`` gives the same map with -2 for tokens OneVision
  interpolated (``source`` takes the nearest patch there).
- Image newlines are not visual-grid tokens, but they sit in placeholder slots, so they travel inside the
  image's ``VisualTokens``: identity keeps them, and the pruning stages (FoPru, ``random``, ``divprune``)
  always keep them and count only grid tokens toward their budget. FoPru gathers its per-tile scores
  through ``source``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..tokens import VisualTokens
from .base import Family


class LlavaNextFamily(Family):
    model_type = "llava_next"
    capabilities = frozenset({"patch_grid", "rope_1d", "fixed_grid",
                              "vision_cls", "token_projector"})  # last two: vision attention rows (pre-LLM pruners)
    lacks = {**Family.lacks, "tile_rows": "lays its AnyRes tiles out as one stitched, cropped grid with image-newline "
                                          "tokens, decided by image_sizes",
             "vision_resize": "stitches its AnyRes tiles into one grid with image-newline tokens by image_sizes: "
                              "smaller tiles would change that layout (not built)"}
    model_class_names = ("LlavaNextForConditionalGeneration",)
    image_kwarg_names = ("image_sizes",)

    # --- vision -------------------------------------------------------------------------------
    def _tower_has_cls(self) -> bool:
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        return hasattr(getattr(tower, "embeddings", None), "class_embedding")

    @property
    def grid(self) -> tuple[int, int]:
        h, w = super().grid
        if self.config.vision_feature_select_strategy != "default" and self._tower_has_cls():
            raise ValueError(
                f"{type(self.model).__name__} with vision_feature_select_strategy='full' on a CLS tower: "
                "the tile tokens do not form a grid; vlmkit supports 'default' (CLS dropped) or a tower without CLS"
            )
        return h, w

    def check_pixel_values(self, pixel_values: Any) -> None:
        """``pixel_values`` [images, max_tiles, C, H, W] or [tiles, C, H, W] at the tower's tile size."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        C = self.config.vision_config.num_channels
        H, W = self.image_size
        if pixel_values.dim() not in (4, 5) or tuple(pixel_values.shape[-3:]) != (C, H, W):
            raise ValueError(
                f"pixel_values must be [num_images, tiles, {C}, {H}, {W}] (or [tiles, {C}, {H}, {W}]) for this "
                f"{self.model_type} model, got shape {tuple(pixel_values.shape)}"
            )

    def _feature_kwargs(self, image_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "vision_feature_layer": self.config.vision_feature_layer,
            "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
        }

    def image_features(self, pixel_values: torch.Tensor, **image_kwargs) -> list[torch.Tensor]:
        """Per-image packed features (base tile, AnyRes grid, newlines): list of [N_i, D]."""
        if image_kwargs.get("image_sizes") is None:
            raise ValueError(f"{type(self.model).__name__} needs image_sizes (from its processor) with pixel_values")
        out = self.model.model.get_image_features(
            pixel_values=pixel_values, **image_kwargs, **self._feature_kwargs(image_kwargs))
        return list(out.pooler_output)

    # --- layout -------------------------------------------------------------------------------
    def _num_patches(self, image_sizes: torch.Tensor, image_kwargs: dict[str, Any]) -> list[int]:
        """Tiles (base included) the model takes per image, exactly as ``get_image_features`` counts them."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in image_sizes
        ]

    def _pack(self, values: list[torch.Tensor], image_sizes: torch.Tensor, image_kwargs: dict[str, Any]):
        """Run the model's own ``pack_image_features`` on per-tile values [tiles, h·w, C] (newline = -1)."""
        newline = torch.full((values[0].shape[-1],), -1.0, dtype=torch.float64)
        packed, _ = self.model.model.pack_image_features(
            values, image_sizes, vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=newline)
        return packed

    def _sources(self, image_sizes: torch.Tensor, image_kwargs: dict[str, Any], nearest: bool):
        """Per image: [N_i] tower patch token of each run position (-1 newline) and the image's tile count.

        Packs, with the model's own code, each AnyRes tile patch's (row, col) in the padded stitched grid
        (bilinear downsampling of a linear ramp returns the sampled coordinate), then maps the coordinates
        back to ``tile · h·w + cell``. The first h·w run positions are always the base tile. A token
        OneVision interpolated from several patches gets -2, or with ``nearest`` the patch nearest to its
        sample point (ties to the top / left patch).
        """
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        image_sizes = torch.as_tensor(image_sizes).cpu()
        h, w = self.grid
        hw = h * w
        counts = self._num_patches(image_sizes, image_kwargs)
        values, widths = [], []
        for size, n in zip(image_sizes, counts):
            v = torch.zeros(n, hw, 2, dtype=torch.float64)
            npw = 1
            if n > 1:
                _, npw = get_anyres_image_grid_shape(
                    size.tolist(), self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                tile = torch.arange(n - 1, dtype=torch.float64)[:, None]
                cell = torch.arange(hw, dtype=torch.float64)[None]
                v[1:, :, 0] = (tile // npw) * h + cell // w  # row in the padded stitched grid
                v[1:, :, 1] = (tile % npw) * w + cell % w
            values.append(v)
            widths.append(int(npw))
        out = []
        for p, npw in zip(self._pack(values, image_sizes, image_kwargs), widths):
            row, col = p[:, 0], p[:, 1]
            newline = (row == -1) & (col == -1)
            r, c = torch.ceil(row - 0.5).long(), torch.ceil(col - 0.5).long()  # nearest, ties to top / left
            src = (1 + (r // h) * npw + c // w) * hw + (r % h) * w + c % w
            src[:hw] = torch.arange(hw)
            if not nearest:
                mixed = ((row - row.round()).abs() > 1e-6) | ((col - col.round()).abs() > 1e-6)
                mixed[:hw] = False
                src[mixed & ~newline] = -2
            src[newline] = -1
            out.append(src)
        return out, counts

    def token_sources(self, image_sizes: torch.Tensor, **image_kwargs) -> list[torch.Tensor]:
        """Per image, [N_i] LongTensor: the tower patch-token (``tile · h·w + cell``) at each run position.

        -1 marks image-newline tokens; -2 marks tokens the model interpolated from several patches
        (LLaVA-OneVision's ``anyres_max`` downsampling of very large grids). Computed by packing patch
        coordinates with the model's own packing code, on CPU (also for meta-device models).
        """
        return self._sources(image_sizes, image_kwargs, nearest=False)[0]

    def layout(self, sources: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, tuple[int, int]]]]:
        """``frame`` [N] and ``blocks`` of one image from its ``token_sources`` (see the module docstring)."""
        h, w = self.grid
        n = int(sources.numel())
        frame = torch.where(sources >= 0, sources // (h * w), torch.full_like(sources, -1))
        rows = int((sources[h * w:] == -1).sum())
        if n < h * w or rows == 0 or (n - h * w) % rows:
            raise ValueError(f"a packed image of {n} tokens is not a {h}×{w} base tile plus newline-ended rows")
        return frame, [(0, (h, w)), (h * w, (rows, (n - h * w) // rows))]

    def encode_images(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None, **image_kwargs
    ) -> list[VisualTokens]:
        """One ``VisualTokens`` per image: packed features, ``frame`` = source tile (-1 newline), two blocks."""
        self.check_pixel_values(pixel_values)
        feats = self.image_features(pixel_values, **image_kwargs)
        image_sizes = image_kwargs.pop("image_sizes")
        sources, tiles = self._sources(image_sizes, image_kwargs, nearest=True)
        h, w = self.grid
        out = []
        for embeds, src, n_tiles in zip(feats, sources, tiles):
            if src.numel() != embeds.shape[0]:
                raise ValueError(f"packed image of {embeds.shape[0]} tokens but its layout has {src.numel()}")
            frame, blocks = self.layout(src)
            n = embeds.shape[0]
            out.append(VisualTokens(
                embeds=embeds, index=torch.arange(n, device=embeds.device), grid=self.grid,
                frame=frame.to(embeds.device), num_uncompressed=n, blocks=blocks,
                # a meta-device model keeps the map on CPU: meta tensors would drop its values
                source=src if embeds.is_meta else src.to(embeds.device), num_sources=n_tiles * h * w))
        return out
