"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one CLIP tile per image, CLS dropped, 576 tokens at 336 px."""

from __future__ import annotations

from .base import Family


class LlavaFamily(Family):
    model_type = "llava"
    model_class_names = ("LlavaForConditionalGeneration",)
    image_kwarg_names = ("image_sizes",)
    capabilities = frozenset({"patch_grid", "rope_1d", "single_tile", "tile_rows", "fixed_grid",
                          "vision_cls", "token_projector",  # these two: vision attention rows (pre-LLM pruners)
                          "vision_resize"})  # CLIP / SigLIP interpolate their position embeddings (downsampling)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = super().grid
        if self.config.vision_feature_select_strategy != "default":
            # "full" keeps CLS: 1 + h·w tokens that do not form a grid; index them as one row.
            return 1, h * w + 1
        return h, w
