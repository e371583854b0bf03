"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP without CLS, 4×4 average pooling, bidirectional image blocks.

What the model does (transformers 5.25, ``modeling_gemma3.py``):

- **Tower and projector.** A SigLIP tower (no CLS token, no pooling head) runs each 896-px tile as 64×64 patches of
  14 px; ``Gemma3MultiModalProjector`` reshapes the last hidden state (after SigLIP's post-layernorm) to the 64×64
  patch grid, average-pools it with a k×k kernel, k = 64 / √``mm_tokens_per_image`` = 4, i.e. 16×16 = **256 tokens**
  per tile (row-major), then RMS-norms and projects them. ``pixel_values`` are ``[tiles, 3, 896, 896]``.
- **Placeholders.** ``Gemma3Processor`` replaces every ``<start_of_image>`` of the prompt with
  ``"\\n\\n<start_of_image>" + 256 × <image_soft_token> + "<end_of_image>\\n\\n"`` and returns ``token_type_ids``
  (1 on the soft tokens). With ``do_pan_and_scan`` an image of aspect ratio ≥ 1.2 is cut into 2-4 crops, each
  resized to one tile: ``pixel_values`` holds the whole image (thumbnail) then its crops, and the prompt holds one
  such 256-token sequence per tile, with text between them (``Here is the original image … and here are some
  crops to help you see better …``).
- **Attention.** From ``token_type_ids`` the model builds *blocks*: each maximal run of image tokens is one block
  (``get_block_sequence_ids_for_mask``), and inside a block tokens attend to each other in both directions:
  full-attention layers get ``causal OR same block``, sliding layers ``sliding window AND (causal OR same block)``
  (window: keys less than ``sliding_window`` slots before the query; every 6th layer is global, 5 of 6 slide).
  Text embeddings are scaled by √hidden; image features are scattered after scaling (not scaled).
- **Positions.** Plain 1-D RoPE (two bases: local layers 10⁴, global 10⁶), computed from ``position_ids``.

How vlmkit handles it (design choices of this module):

- One ``VisualTokens`` per image on the 16×16 token grid (``grid`` = √``mm_tokens_per_image``²), its tiles in
  ``pixel_values`` order (thumbnail, then crops), ``frame`` = tile, index ``tile·256 + cell``. Every tile keeps its
  own 256-token run; the text between the runs stays text (``assemble`` matches slots by order, as for SmolVLM).
  Which tiles form an image is not in the processor's output (``Gemma3Processor`` drops ``num_crops``): pass
  ``num_crops`` (crops per image, as ``Gemma3ImageProcessor`` returns it) to group a pan-and-scan image's crops
  with its thumbnail into one image (one pruning budget over all its tiles); without it every tile is its own
  image, which is exactly the unit the model itself treats separately (its own run and its own attention block).
- **Bidirectional image blocks survive pruning.** ``language_inputs`` hands the decoder ``token_type_ids`` = 1 on
  exactly the visual slots of the *assembled* (pruned, re-padded) batch, so the model builds its own blocks over
  the kept tokens: the kept tokens of a tile attend to each other in both directions and to nothing else beyond
  the causal mask. The processor's ``token_type_ids`` describe the unpruned sequence, so the family takes them
  (``image_kwarg_names``) and only checks that they mark exactly the image placeholders (vlmkit always runs the
  model as its processor does, with bidirectional image blocks).
- **Decoder-side pruning** (``vlmkit.decoder.prune``): layers after a drop get vlmkit's own masks; the family gives
  the blocks (``decoder_attention_blocks``: maximal runs of kept visual slots, the model's rule) and each layer's
  sliding window (``decoder_sliding_window``). Choice: after a drop the window counts the slots of the re-packed
  sequence that layer runs on (the tokens it holds, the last W − 1 of which its sliding KV cache keeps), as if
  the layer had been given the shorter sequence (which is what a pre-LLM pruner does).
- FoPru scores a vision layer's attention (every SigLIP layer is global) and gives a token the sum of the scores
  of the 4×4 patches it pools (``Family.vision_attention_groups`` with ``patch_pooling`` = ((64, 64), 4)).
  VisionZip / VisPruner stay refused: no CLS token (``vision_cls``), and the projector pools patches, so its
  input is not one row per visual token (``token_projector``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..tokens import VisualTokens
from .base import Family


class Gemma3Family(Family):
    model_type = "gemma3"
    model_class_names = ("Gemma3ForConditionalGeneration",)
    # token_type_ids describe the processor's (unpruned) sequence: the family takes them and the decoder gets the
    # assembled batch's own (language_inputs); num_crops (optional) groups pan-and-scan crops into images.
    image_kwarg_names = ("token_type_ids", "num_crops")
    image_markers = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
    capabilities = frozenset({"patch_grid", "rope_1d", "tile_rows", "fixed_grid"})
    lacks = {
        **Family.lacks,
        "single_tile": "cuts wide or tall images into pan-and-scan crops (one pixel_values row each, its processor's "
                       "do_pan_and_scan)",
        # vision attention rows (pre-LLM pruners)
        "vision_cls": "runs a SigLIP tower, which has no CLS token",
        "token_projector": "average-pools 4×4 patches inside its projector, whose input is therefore patches, not "
                           "visual tokens",
    }

    # --- ids and embeddings -------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids -> [B, S, D] scaled text embeddings; the image token id is looked up as 0 when it lies past the
        vocabulary, as ``Gemma3Model.forward`` does (its slots are overwritten by the visual tokens anyway)."""
        image = self.placeholder_id
        if image >= self.input_embeddings.num_embeddings:
            input_ids = input_ids.masked_fill(input_ids == image, 0)
        return self.input_embeddings(input_ids)

    # --- language model -----------------------------------------------------------------------
    def language_inputs(self, batch) -> dict[str, Any]:
        """``token_type_ids`` [B, L]: 1 on the visual slots of the assembled batch, so the model's bidirectional
        blocks span exactly the kept tokens of each image tile."""
        return {"token_type_ids": batch.visual_mask.long()}

    @contextlib.contextmanager
    def language_context(self, batch) -> Iterator[None]:
        """Let ``generate`` take ``inputs_embeds``: ``Gemma3ForConditionalGeneration.prepare_inputs_for_generation``
        forwards them (to ``GenerationMixin``'s, which uses them in the first step) but does not name them, and
        ``generate`` refuses ``inputs_embeds`` unless that signature does. Within the context the model instance
        gets a wrapper that names them and calls the original unchanged; the class method shows again on exit."""
        model = self.model
        had_own = "prepare_inputs_for_generation" in vars(model)
        original = model.prepare_inputs_for_generation

        def prepare_inputs_for_generation(input_ids, inputs_embeds=None, **kwargs):
            return original(input_ids, inputs_embeds=inputs_embeds, **kwargs)

        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        try:
            yield
        finally:
            if had_own:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    def decoder_sliding_window(self, layer_index: int) -> int | None:
        """The sliding window of ``decoder_layers[layer_index]`` (``sliding_window`` on the 5 of 6 local layers, None
        on the global ones)."""
        window = self.decoder_attention(layer_index).sliding_window
        return None if window is None else int(window)

    def decoder_attention_blocks(self, visual: torch.Tensor) -> torch.Tensor:
        """[B, S] block id of each slot (-1 text / padding): the maximal runs of visual slots of ``visual`` [B, S]
        bool, numbered per row, as ``get_block_sequence_ids_for_mask`` numbers the runs of ``token_type_ids``."""
        visual = visual.bool()
        start = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
        ids = torch.cumsum(start.long(), dim=1) - 1
        return torch.where(visual, ids, torch.full_like(ids, -1))

    # --- vision -------------------------------------------------------------------------------
    @property
    def feature_layer(self) -> int:
        return -1  # last_hidden_state (after SigLIP's post-layernorm), pooled by the projector

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of one tile's pooled tokens: √mm_tokens_per_image squared (16×16 = 256)."""
        side = int(round(int(self.config.mm_tokens_per_image) ** 0.5))
        if side * side != int(self.config.mm_tokens_per_image):
            raise ValueError(f"mm_tokens_per_image={self.config.mm_tokens_per_image} is not a square number of tokens")
        return side, side

    def image_features(self, pixel_values: torch.Tensor, **image_kwargs) -> list[torch.Tensor]:
        """Per-tile projected features [256, D] through the model's own tower, pooling and projection."""
        out = self.model.model.get_image_features(pixel_values=pixel_values)
        return list(out.pooler_output)

    def tiles_per_image(self, input_ids: torch.Tensor | None, num_tiles: int, num_crops=None) -> list[int]:
        """Tiles (rows of ``pixel_values``) of each image: ``1 + num_crops[i]`` (thumbnail + pan-and-scan crops) when
        ``num_crops`` is given, else one each (every tile its own image)."""
        if num_crops is None:
            return [1] * num_tiles
        crops = torch.as_tensor(num_crops).flatten().tolist()
        if any(int(c) != c or c < 0 for c in crops):
            raise ValueError(f"num_crops must hold one count >= 0 per image, got {crops}")
        tiles = [1 + int(c) for c in crops]
        if sum(tiles) != num_tiles:
            raise ValueError(f"num_crops={crops} gives {sum(tiles)} tiles (thumbnail + crops per image) but "
                             f"pixel_values holds {num_tiles}")
        return tiles

    def _check_token_types(self, input_ids: torch.Tensor | None, token_type_ids: torch.Tensor) -> None:
        if input_ids is None:
            return
        want = (input_ids == self.placeholder_id).long()
        if tuple(token_type_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"token_type_ids of shape {tuple(token_type_ids.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        wrong = torch.nonzero(token_type_ids.long().to(want.device) != want)
        if wrong.numel():
            b, s = wrong[0].tolist()
            raise ValueError(f"token_type_ids must be 1 exactly on the image placeholders of input_ids (what "
                             f"Gemma3Processor returns), but row {b} slot {s} holds {int(token_type_ids[b, s])} for "
                             f"token id {int(input_ids[b, s])}; vlmkit derives the decoder's token_type_ids from the "
                             "assembled batch")

    def encode_images(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None, num_crops=None, **image_kwargs) -> list[VisualTokens]:
        """One uncompressed ``VisualTokens`` per image: its tiles' 256-token grids one after the other
        (frame = tile)."""
        if image_kwargs:
            raise TypeError(f"{type(self.model).__name__} takes no image inputs {sorted(image_kwargs)}; accepted: "
                            f"{list(self.image_kwarg_names)}")
        self.check_pixel_values(pixel_values)
        if token_type_ids is not None:
            self._check_token_types(input_ids, token_type_ids)
        feats = self.image_features(pixel_values)
        tiles = self.tiles_per_image(input_ids, len(feats), num_crops)
        out, start = [], 0
        for n in tiles:
            out.append(VisualTokens.full(torch.cat(feats[start:start + n], dim=0), self.grid, frames=n))
            start += n
        return out
