"""InternVL (``InternVLForConditionalGeneration``, the ``*-hf`` checkpoints): tiles, pixel shuffle 0.5.

Each image is ``<img>`` + tiles × ``image_seq_length`` ``<IMG_CONTEXT>`` + ``</img>``; the tiles of one
image are the rows of ``pixel_values`` whose placeholders form one contiguous run.
"""

from __future__ import annotations

import torch

from .base import Family


class InternVLFamily(Family):
    model_type = "internvl"
    model_class_names = ("InternVLForConditionalGeneration",)
    image_markers = ("<img>", "</img>", "<IMG_CONTEXT>")
    # vision attention rows (pre-LLM pruners): InternViT has a CLS token; mlp1 acts on each shuffled token
    capabilities = Family.capabilities | {"vision_cls", "token_projector"}
    lacks = {**Family.lacks, "vision_resize": "reshapes each tile's features to a square of √n cells for its pixel "
                                              "shuffle and splits an image's budget over its tiles: smaller tiles "
                                              "are not built"}

    @property
    def vision_layers(self):
        return self.vision_tower.encoder.layer

    @property
    def grid(self) -> tuple[int, int]:
        h, w = super().grid
        r = self.config.downsample_ratio  # pixel shuffle merges (1/r)² patches into one token
        return int(h * r), int(w * r)

    def tiles_per_image(self, input_ids: torch.Tensor | None, num_tiles: int) -> list[int]:
        if input_ids is None:
            return [1] * num_tiles
        is_ph = (input_ids == self.placeholder_id).long()
        # A run starts where a placeholder follows a non-placeholder (or the row start).
        prev = torch.nn.functional.pad(is_ph, (1, 0))[:, :-1]
        starts = (is_ph == 1) & (prev == 0)
        run_id = torch.cumsum(starts.flatten(), 0).reshape(is_ph.shape) * is_ph
        lengths = torch.bincount(run_id.flatten())[1:].tolist()
        bad = [n for n in lengths if n % self.tokens_per_tile]
        if bad:
            raise ValueError(
                f"image placeholder runs of length {bad} are not multiples of the {self.tokens_per_tile} "
                "tokens of one InternVL tile"
            )
        return [n // self.tokens_per_tile for n in lengths]
