"""SmolVLM (``SmolVLMForConditionalGeneration``) and Idefics3 (``Idefics3ForConditionalGeneration``).

What the model does (transformers 5.24): the processor splits an image into ``rows × cols`` tiles of
``vision_config.image_size`` px plus one downscaled *global* tile, and writes per image::

    <fake_token_around_image><row_1_col_1><image>×n … <row_r_col_c><image>×n \\n …
    \\n<fake_token_around_image><global-img><image>×n<fake_token_around_image>

(without splitting only the global part). ``pixel_values`` is ``[B, max_tiles, C, H, W]``: every tile
of every image of a sample, zero-padded per sample; ``get_image_features`` drops the all-zero tiles, runs
the SigLIP tower (``pixel_attention_mask`` masks padded pixels), pixel-shuffles ``scale_factor × scale_factor``
patches into one token (``n = (H/p)²/scale²`` tokens per tile, 64 for SmolVLM-256M) and returns the features
*per sample*.

How vlmkit describes it (design choices of this module):

- One ``VisualTokens`` per image, its tiles in prompt order (split tiles row-major, global last), so
  ``frame`` = tile and ``index = frame·n + cell`` exactly as for InternVL. FoPru's per-tile scores line up.
- Tiles are grouped into images from ``input_ids``: every tile is one placeholder run of ``n`` tokens, and
  an image ends with the tile whose run follows ``<global-img>`` (the token before the last run of any
  sample with images; read from the ids, so no tokenizer is needed).
- The row/column marker tokens between the tiles stay text: an image's placeholder slots are *not one
  contiguous run*. ``assemble`` matches slots by their order, so that is fine for identity, pruning and
  V2PE (each tile run advances by ``stride/tokens_per_tile``); MouSi positions need one contiguous run per
  image and refuse such images (single-tile images, ``do_image_splitting=False``, work).
- The decoder is ``model.model.text_model`` (not ``language_model``): ``Family.language_model`` points there.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Family


class SmolVLMFamily(Family):
    model_type = "smolvlm"
    capabilities = frozenset({"patch_grid", "rope_1d", "fixed_grid"})
    lacks = {**Family.lacks, "tile_rows": "passes pixel_values as [images, tiles, C, H, W] with a pixel_attention_mask",
             # vision attention rows (pre-LLM pruners)
             "vision_cls": "runs a SigLIP tower, which has no CLS token",
             "token_projector": "pixel-shuffles patches inside its connector, whose input is therefore patches, "
                                "not visual tokens",
             "vision_resize": "cuts images into fixed-size tiles under a pixel_attention_mask and pixel-shuffles "
                              "them in its connector: smaller tiles are not built"}
    model_class_names = ("SmolVLMForConditionalGeneration",)
    image_kwarg_names = ("pixel_attention_mask",)
    part_paths = {"projector": "model.connector", "vision_tower": "model.vision_model",
                  "language_model": "model.text_model"}

    @property
    def vision_tower(self):
        return self.model.model.vision_model

    @property
    def language_model(self):
        return self.model.model.text_model

    @property
    def feature_layer(self) -> int:
        return -1  # last_hidden_state (after the tower's post-layernorm)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = super().grid
        s = int(self.config.scale_factor)
        return h // s, w // s

    def check_pixel_values(self, pixel_values: Any) -> None:
        self._check_pixel_shape(pixel_values, ("batch", "tiles"))

    def image_features(self, pixel_values: torch.Tensor, **image_kwargs) -> list[torch.Tensor]:
        """Per real tile (padding tiles dropped, sample order), [n, D] each."""
        out = self.model.model.get_image_features(pixel_values=pixel_values, **image_kwargs)
        n = self.tokens_per_tile
        return [t for f in out.pooler_output for t in f.reshape(-1, n, f.shape[-1])]

    def tiles_per_image(self, input_ids: torch.Tensor | None, num_tiles: int) -> list[int]:
        if input_ids is None:
            return [1] * num_tiles
        n = self.tokens_per_tile
        ph = self.placeholder_id
        tiles: list[int] = []
        for row in input_ids.tolist():
            starts = [i for i, t in enumerate(row) if t == ph and (i == 0 or row[i - 1] != ph)]
            if not starts:
                continue
            lengths = []
            for s in starts:
                e = s
                while e < len(row) and row[e] == ph:
                    e += 1
                lengths.append(e - s)
            if any(m != n for m in lengths):
                raise ValueError(
                    f"image placeholder runs of length {sorted(set(lengths))}; every {self.model_type} tile is "
                    f"a run of {n} tokens"
                )
            end_marker = row[starts[-1] - 1] if starts[-1] > 0 else None  # <global-img>
            count = 0
            for s in starts:
                count += 1
                if s > 0 and row[s - 1] == end_marker:
                    tiles.append(count)
                    count = 0
            if count:
                raise ValueError("the tiles of an image do not end with a <global-img> tile")
        return tiles


class Idefics3Family(SmolVLMFamily):
    model_type = "idefics3"
    model_class_names = ("Idefics3ForConditionalGeneration",)
