"""LLaVA-OneVision-1.5 (``LlavaOnevision15ForConditionalGeneration``): a Qwen2-VL-style dynamic-resolution tower
(RICE-ViT) in front of a Qwen3 decoder with ordinary 1-D RoPE.

What the model does (transformers 5.25, ``models/llava_onevision1_5``):

- Images go through ``Qwen2VLImageProcessor`` (the auto mapping of ``llava_onevision1_5``) with
  ``temporal_patch_size = 1``: each image is resized to a multiple of ``patch · merge`` (14 · 2 = 28 px) and
  flattened into patches ``pixel_values [Σ H·W, C·p·p]`` in 2×2 merge order, with ``image_grid_thw`` (1, H, W)
  per image (H, W in 14-px patches). The placeholder ``<|image_pad|>`` is repeated ``H·W / 4`` times
  (``Exaone4_5_Processor.replace_image_token``); prompts put ``<|vision_start|>`` / ``<|vision_end|>`` around it.
- The tower (``model.model.visual``) prepends one CLS token per image, runs full attention within each image
  (``cu_seqlens``, a fused ``qkv``, 2-D RoPE), drops the CLS tokens and merges 2×2 patches in its ``merger``
  (LayerNorm + MLP to the text width): ``get_image_features(...).pooler_output`` is one [h·w, D] tensor per
  image, h = H/2, w = W/2, in row-major order of the merged grid.
- The decoder takes **1-D** positions: ``forward`` without ``position_ids`` uses ``arange(S)`` (+ cache length),
  ``generate`` its usual ``attention_mask.cumsum(-1) - 1``. There is no M-RoPE and no ``rope_deltas``.

How vlmkit handles it (design choices of this module):

- One ``VisualTokens`` per image, ``grid = (h, w)`` of merged tokens, index ``row·w + col`` (the model's order);
  everything about the tower is shared with Qwen2.5-VL (``Qwen2_5_VLFamily``), everything about positions
  with the 1-D families (``Family``): ``language_inputs`` adds nothing, so the decoder computes its own positions
  on the assembled batch, exactly as the unwrapped model does (identity is bit-exact). Pruned visual tokens
  leave the sequence, and the tokens after them take the next positions (as for LLaVA and every 1-D family:
  the decoder numbers what it sees); position stages (V2PE, MouSi) apply because the decoder's RoPE is 1-D
  (V2PE's default δ = stride / ``tokens_per_tile`` below; set ``V2PEConfig.tokens_per_tile`` to normalise by
  another image size).
- ``tokens_per_tile`` is an upper bound only (there is no fixed tile): the tokens of the largest image the
  processor class's default ``max_pixels`` allows (28·28·1280 px → 1280 tokens), for the ``num_keep`` check of
  pruning stages; ``grid`` is the largest square within it (35×35). A checkpoint's ``preprocessor_config`` may
  allow larger images.
- FoPru (capability ``vision_attention``): every tower layer attends over a whole image, so any layer can be
  scored (default: the last, whose output the merger takes). ``vision_attention_groups`` cuts the packed
  attention input at the tower's ``cu_seqlens`` (which count the CLS tokens): one group per image, prefix 1 (its
  CLS token), then its patches in merge order, 4 consecutive patches per merged token. FoPru counts the CLS query
  row and drops the CLS key column, as for CLIP towers. Everything else (q/k from the fused ``qkv`` and the
  tower's rotary function) is Qwen2.5-VL's code.
- Pre-LLM pruners that need a fixed tile (VisionZip, VisPruner, PVC) do not apply: the tower runs one packed,
  variable-length patch sequence of all images, and its projector (the merger) takes 2×2 patches, not visual
  tokens. Random and DivPrune (which only need the tokens) and the decoder-side pruners (FastV, PDrop, DART, VTW)
  apply.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import AttentionGroup, Family
from .qwen2_5_vl import Qwen2_5_VLFamily

#: Tokens of the largest image ``Qwen2VLImageProcessor``'s default ``max_pixels`` (28·28·1280) allows: 1280.
MAX_IMAGE_TOKENS = 1280


class LlavaOnevision15Family(Qwen2_5_VLFamily):
    model_type = "llava_onevision1_5"
    model_class_names = ("LlavaOnevision15ForConditionalGeneration",)
    # The model takes mm_token_type_ids (and ignores them); they describe the original sequence, so the family
    # takes them when a processor emits them rather than letting them reach the decoder with the assembled one.
    image_kwarg_names = ("image_grid_thw", "mm_token_type_ids")
    # vision_cls: each image's sequence in the tower starts with its CLS token (prefix 1 of its attention group)
    capabilities = frozenset({"rope_1d", "vision_attention", "vision_cls"})
    lacks = {
        "patch_grid": "has dynamic resolution: there is no fixed tile whose patch grid a stage could split",
        "mrope": "uses 1-D RoPE",
        "single_tile": "passes images as variable-size patch sequences, not pixel_values rows",
        "tile_rows": "passes images as variable-size patch sequences, not tiles",
        "fixed_grid": "has dynamic resolution: an image's token grid follows its size",
        "token_projector": "merges 2×2 patches inside its merger, whose input is therefore patches, not visual tokens",
    }

    max_image_tokens = MAX_IMAGE_TOKENS  # the largest image the processor's default ``max_pixels`` allows

    def on_vision_input(self, hook):
        """``hook(patches)``: the flattened patches [Σ H·W, C·p·p] the tower runs on."""
        def pre(module, args, kwargs):
            hook(args[0] if args else kwargs["pixel_values"])

        return self.vision_tower.register_forward_pre_hook(pre, with_kwargs=True)

    def vision_attention_groups(self, layer_index: int, hidden: torch.Tensor, cu_seqlens=None,
                                position_embeddings=None, **_) -> list[AttentionGroup]:
        """One ``AttentionGroup`` per ``cu_seqlens`` block of the packed attention input ``hidden`` [S, C] (an image:
        its CLS token, then its patches in merge order): q/k from ``vision_qk``, prefix 1, position 1 + j feeds the
        merged token j // merge² (the model's row-major token order)."""
        if cu_seqlens is None:
            raise ValueError("LLaVA-OneVision-1.5 vision attention needs the cu_seqlens its layer receives")
        q, k, scale = self.vision_qk(layer_index, hidden, position_embeddings)
        unit = self.merge**2
        bounds = [int(b) for b in cu_seqlens.tolist()]
        groups = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            n, rest = divmod(e - s - 1, unit)
            if rest or n < 1:
                raise ValueError(f"vision attention block {s}:{e} is not one CLS token plus whole merge units of "
                                 f"{unit} patches")
            token = torch.arange(e - s - 1, device=hidden.device) // unit
            groups.append(AttentionGroup(q[0, :, s:e], k[0, :, s:e], scale, 1, token, n))
        return groups

    def check_pixel_values(self, pixel_values: Any) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        vc = self.config.vision_config
        width = vc.in_channels * vc.patch_size**2
        if pixel_values.dim() != 2 or pixel_values.shape[1] != width:
            raise ValueError(
                f"pixel_values must be flattened patches [num_patches, {width}] (Qwen2VLImageProcessor output with "
                f"temporal_patch_size=1), got shape {tuple(pixel_values.shape)}"
            )

    # --- language model: 1-D RoPE, the decoder's own positions ----------------------------------
    @property
    def rope_kind(self) -> str | None:
        return Family.rope_kind.fget(self)

    def language_inputs(self, batch) -> dict[str, Any]:
        """Nothing: the decoder numbers the assembled sequence itself (1-D RoPE), as the unwrapped model does."""
        return {}
