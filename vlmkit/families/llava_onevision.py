"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's AnyRes packing on SigLIP tiles.

Differences from LLaVA-NeXT (``llava_next.py`` describes the shared layout and how vlmkit represents it):

- SigLIP has no CLS token; the checkpoints use ``vision_feature_select_strategy="full"`` and
  ``vision_feature_layer=-1``, so a tile is the whole ``(H/p) × (W/p)`` grid (729 tokens at 384/14).
- ``vision_aspect_ratio="anyres_max_N"``: an AnyRes grid larger than ~N tiles (ratio > 1.1) is bilinearly
  downsampled before the newlines are added; its tokens then mix several patches (``token_sources`` = -2;
  ``VisualTokens.source`` holds the patch nearest to each such token's sample point, so FoPru scores it
  with that patch's score).
- ``batch_num_images``: a sample with several images gets *no* AnyRes tiles, only the base tile plus one
  newline token per image (``blocks = [(0, (h, w)), (h·w, (1, 1))]``).
Videos (``pixel_values_videos``) are not handled by vlmkit (the wrapper passes images only).
"""

from __future__ import annotations

from typing import Any

import torch

from .llava_next import LlavaNextFamily


class LlavaOnevisionFamily(LlavaNextFamily):
    model_type = "llava_onevision"
    model_class_names = ("LlavaOnevisionForConditionalGeneration",)
    image_kwarg_names = ("image_sizes", "batch_num_images")
    # vision attention rows (pre-LLM pruners)
    capabilities = LlavaNextFamily.capabilities - {"vision_cls"}
    lacks = {**LlavaNextFamily.lacks, "vision_cls": "runs a SigLIP tower, which has no CLS token"}

    def _feature_kwargs(self, image_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**super()._feature_kwargs(image_kwargs), "vision_aspect_ratio": self.config.vision_aspect_ratio}

    def _num_patches(self, image_sizes: torch.Tensor, image_kwargs: dict[str, Any]) -> list[int]:
        patched = super()._num_patches(image_sizes, image_kwargs)
        counts = image_kwargs.get("batch_num_images")
        if counts is None:
            return patched
        single = [int(n) == 1 for n in counts for _ in range(int(n))]
        return [p if s else 1 for p, s in zip(patched, single)]

    def _pack(self, values: list[torch.Tensor], image_sizes: torch.Tensor, image_kwargs: dict[str, Any]):
        newline = torch.full((values[0].shape[-1],), -1.0, dtype=torch.float64)
        packed, _ = self.model.model.pack_image_features(
            values, image_sizes, image_newline=newline, vision_aspect_ratio=self.config.vision_aspect_ratio)
        return packed
