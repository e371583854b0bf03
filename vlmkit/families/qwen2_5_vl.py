"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, 2×2 patch merger, 3-D M-RoPE.

What the model does (transformers 5.24): the processor resizes each image to a multiple of 28 px and emits
``<|vision_start|>`` + ``t·h·w`` ``<|image_pad|>`` + ``<|vision_end|>``, where ``(t, H, W) = image_grid_thw``
(patches of 14 px) and ``h = H/2, w = W/2`` (the merger joins 2×2 patches; t = 1 for images).
``pixel_values`` are the flattened patches ``[Σ t·H·W, C·2·14·14]``. The decoder uses M-RoPE: every token has
a (temporal, height, width) position; ``Qwen2_5_VLModel.get_rope_index`` gives text tokens (p, p, p) with p
counting on, and the image tokens of an image starting at L the positions (L + t, L + row, L + col); the
text after the image resumes at ``L + max(h, w)``.

How vlmkit handles it (design choices of this module):

- One ``VisualTokens`` per image: ``grid = (h, w)`` (merged tokens), ``frame`` = t for t > 1, index
  ``t·h·w + row·w + col``, i.e. the model's own token order.
- **Pruning carries each kept token's (t, h, w) position**: ``language_inputs(batch)`` rebuilds the M-RoPE
  positions of the *assembled* (possibly pruned) batch from ``batch.visual_index``: a kept token keeps the
  (L + t, L + row, L + col) it had uncompressed, and the text after an image still resumes at
  ``L + max(h, w)`` (the image's uncompressed span), so pruning never moves the text. Without pruning the
  positions equal ``get_rope_index``'s exactly (padding 0), so identity is bit-exact. ``generate``
  continues every axis at ``last + 1`` (``_update_model_kwargs_for_generation``), which equals HF's
  ``rope_deltas`` rule because the last prompt token is text and holds the largest position.
  The positions are returned as ``[4, B, L]`` (row 0 = the integer text positions
  ``attention_mask.cumsum - 1`` HF's ``generate`` uses for masks, rows 1-3 = M-RoPE), as Qwen's own
  ``_prepare_position_ids_for_generation`` does.
- ``VLMWrapper`` passes ``family.language_inputs(batch)`` to the decoder before the position stages'
  ``position_ids``; the 1-D position schemes (V2PE, MouSi) refuse M-RoPE decoders at ``wrap()`` (the
  family lacks the capability ``rope_1d``; ``rope_kind`` is ``"mrope"``), so nothing overwrites these positions.
- There is no fixed tile: ``image_size`` / ``patch grid`` do not exist (FoPru refuses at ``wrap()``), and
  ``tokens_per_tile`` is an upper bound only: the tokens of the largest image the processor's default
  ``max_pixels`` (12 845 056 px = 16 384 tokens) allows, for the ``num_keep`` check of pruning stages.
- FoPru: the vision tower uses windowed attention (full attention only in ``fullatt_block_indexes``) with a
  fused ``qkv`` projection over a variable-size, window-permuted patch sequence; FoPru's per-tile
  recomputation (``q_proj``/``k_proj`` on a fixed grid) does not apply.

What the 1-D position schemes would mean under M-RoPE (not supported: ``vlmkit.position`` remaps a
``[B, S]`` position lookup inside the rotary embedding, Qwen's gets ``[3, B, S]``):

- V2PE (δ = stride / tokens_per_image): acts on the temporal/text axis. Text and the image's t axis advance
  by 1 per text token; an image of M tokens advances the text counter by ``ceil(M·δ)`` instead of
  ``max(h, w)``, its tokens' t component being L + j·δ (j-th token), while h/w keep their grid offsets.
- MouSi ``shared``: every token of an image takes (L, L, L) (span 1); ``row``: (L, L + row, L) (span h);
  ``original``: the full (L, L + row, L + col) grid (the M-RoPE default, span max(h, w)).
"""

from __future__ import annotations

from typing import Any

import torch

from ..sequence import integer_positions, visual_runs
from ..tokens import VisualTokens
from .base import Family

#: Default ``max_pixels`` of ``Qwen2VLImageProcessor`` (Qwen2.5-VL checkpoints): 16384 merged tokens.
DEFAULT_MAX_PIXELS = 12845056


class Qwen2_5_VLFamily(Family):
    model_type = "qwen2_5_vl"
    model_class_names = ("Qwen2_5_VLForConditionalGeneration",)
    # mm_token_type_ids describe the *original* sequence: the wrapper must not hand them to the decoder
    # with the assembled one, so the family takes (and ignores) them.
    image_kwarg_names = ("image_grid_thw", "mm_token_type_ids")
    capabilities = frozenset()
    lacks = {
        "patch_grid": "has dynamic resolution (there is no fixed tile size) and windowed vision attention with a "
                      "fused qkv",
        "rope_1d": "uses M-RoPE: position schemes need 1-D RoPE, not M-RoPE's 3-D (t, h, w) positions",
        "single_tile": "passes images as variable-size patch sequences, not pixel_values rows",
        "tile_rows": "passes images as variable-size patch sequences, not tiles",
        "fixed_grid": "has dynamic resolution: an image's token grid follows its size",
        # vision attention rows (pre-LLM pruners)
        "vision_cls": "has a vision tower without a CLS token",
        "token_projector": "merges 2×2 patches inside its merger, whose input is therefore patches, not visual tokens",
    }
    part_paths = {"projector": "model.visual.merger", "vision_tower": "model.visual",
                  "language_model": "model.language_model"}

    # --- vision -------------------------------------------------------------------------------
    @property
    def vision_tower(self):
        return self.model.model.visual

    @property
    def vision_layers(self):
        return self.vision_tower.blocks

    @property
    def merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def image_size(self) -> tuple[int, int]:
        raise ValueError(
            f"{type(self.model).__name__} has dynamic resolution (image_grid_thw per image): there is no fixed "
            "tile size, so stages that need one (FoPru's per-tile patch grid) do not apply"
        )

    @property
    def patch_size(self) -> tuple[int, int]:
        p = int(self.config.vision_config.patch_size)
        return p, p

    @property
    def grid(self) -> tuple[int, int]:
        """Upper bound only (no fixed tile): the largest square grid the processor's default allows."""
        side = int((DEFAULT_MAX_PIXELS ** 0.5) // (self.patch_size[0] * self.merge))
        return side, side

    @property
    def feature_layer(self) -> int:
        return -1

    def _no_patch_grid(self, what: str) -> ValueError:
        return ValueError(f"{type(self.model).__name__} {self.lacks['patch_grid']}: {what} does not apply")

    def vision_attention(self, layer_index: int):
        raise self._no_patch_grid("a per-layer q/k attention module")

    def vision_qk(self, layer_index: int, hidden: torch.Tensor):
        raise self._no_patch_grid("recomputing one layer's attention from its q/k projections")

    def vision_mlp(self, layer_index: int):
        """The gated MLP of ``blocks[layer_index]`` (input and output [S, C], all patches of the batch)."""
        return self.vision_layers[layer_index].mlp

    def vision_hidden_states(self, pixel_values: torch.Tensor, index: int) -> torch.Tensor:
        raise self._no_patch_grid("a per-tile hidden state of the vision tower")

    def on_vision_input(self, hook):
        """``hook(patches)``: the flattened patches [Σ t·H·W, C·2·14·14] the tower runs on."""
        def pre(module, args, kwargs):
            hook(args[0] if args else kwargs["hidden_states"])

        return self.vision_tower.register_forward_pre_hook(pre, with_kwargs=True)

    def check_pixel_values(self, pixel_values: Any) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        vc = self.config.vision_config
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        if pixel_values.dim() != 2 or pixel_values.shape[1] != width:
            raise ValueError(
                f"pixel_values must be flattened patches [num_patches, {width}] (Qwen2.5-VL processor output), "
                f"got shape {tuple(pixel_values.shape)}"
            )

    def encode_images(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None, **image_kwargs
    ) -> list[VisualTokens]:
        """One ``VisualTokens`` per image, ``grid`` = merged (h, w), ``frames`` = t."""
        self.check_pixel_values(pixel_values)
        grid_thw = image_kwargs.get("image_grid_thw")
        if grid_thw is None:
            raise ValueError(f"{type(self.model).__name__} needs image_grid_thw (from its processor) with pixel_values")
        feats = self.model.model.get_image_features(pixel_values, grid_thw).pooler_output
        out = []
        for embeds, (t, H, W) in zip(feats, grid_thw.tolist()):
            out.append(VisualTokens.full(embeds, (H // self.merge, W // self.merge), frames=int(t)))
        return out

    # --- language model -----------------------------------------------------------------------
    @property
    def rope_kind(self) -> str:
        return "mrope"

    def language_inputs(self, batch) -> dict[str, Any]:
        """``position_ids`` [4, B, L]: text positions, then the M-RoPE (t, h, w) rows of the assembled batch."""
        return {"position_ids": mrope_position_ids(batch)}


def mrope_position_ids(batch) -> torch.LongTensor:
    """M-RoPE positions of an ``AssembledBatch``: [4, B, L] LongTensor (row 0: ``cumsum(mask) - 1``).

    Per row, as ``get_rope_index``: a counter p starts at 0; a text token takes (p, p, p) and p += 1; an
    image of grid (h, w) starting at p = L gives its token with ``visual_index`` k (t = k // hw, row, col)
    the position (L + t, L + row, L + col), and afterwards p = L + max(h, w) (uncompressed, whatever was
    kept). Padding gets 0 on every axis.
    """
    mask = batch.attention_mask
    B, L = mask.shape
    pos = torch.zeros((3, B, L), dtype=torch.long, device=mask.device)
    for b, cols, segments in visual_runs(batch.visual_mask, mask, batch.image_id):
        row = torch.empty((3, cols.numel()), dtype=torch.long, device=mask.device)
        p = 0
        for start, end, key in segments:
            if key < 0:
                row[:, start:end] = torch.arange(p, p + end - start, device=mask.device)
                p += end - start
                continue
            h, w = batch.tokens[key].grid
            k = batch.visual_index[b, cols[start:end]].long()
            row[0, start:end] = p + k // (h * w)
            row[1, start:end] = p + (k % (h * w)) // w
            row[2, start:end] = p + k % w
            p += max(h, w)
        pos[:, b, cols] = row
    text = integer_positions(mask).to(pos.device)
    return torch.cat([text[None], pos], dim=0)
