"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): Qwen2.5-VL's layout and M-RoPE, a tower without windows.

What the model does (transformers 5.25, ``models/qwen2_vl``): exactly Qwen2.5-VL's image path (``qwen2_5_vl.py``
describes it): ``Qwen2VLImageProcessor`` resizes each image to a multiple of ``patch · merge`` = 28 px (checkpoint
default ``max_pixels`` 12 845 056), ``pixel_values`` are the flattened patches ``[Σ t·H·W, C·2·14·14]``, the
processor repeats ``<|image_pad|>`` ``t·H·W / 4`` times between ``<|vision_start|>`` / ``<|vision_end|>`` and
returns ``mm_token_type_ids``; ``get_image_features`` gives one ``[h·w, D]`` tensor per image (h = H/2, w = W/2,
row-major). ``Qwen2VLModel.get_rope_index`` is Qwen2.5-VL's rule: text (p, p, p), the image starting at L gets
(L + t, L + row, L + col), text resumes at L + max(h, w); for videos 5.25 does not scale the temporal ids by
seconds (``time_interval`` 1), and images have t = 1 anyway. The decoder's rotary embedding takes contiguous
``mrope_section`` chunks ([16, 24, 24]) of the frequencies from the t, h and w rows.

What differs from Qwen2.5-VL, and how this family handles it (everything else is inherited, including the M-RoPE
positions of pruned batches, the position schemes and the vision-attention hooks):

- The tower (``model.model.visual``, ``Qwen2VisionTransformerPretrainedModel``) attends globally in every block
  (one ``cu_seqlens`` block per image, no window permutation: ``vision_window_index`` is None), with LayerNorm and a
  quick-GELU ``fc1``/``fc2`` MLP; every layer is a ``global_vision_layers`` layer, so FoPru scores its default, the
  last block (whose output the merger projects).
- Its width is ``vision_config.embed_dim`` (1280); ``vision_config.hidden_size`` is the merger's *output* width
  (the decoder's, 1536 for Qwen2-VL-2B), so ``vision_width`` reads ``embed_dim``.
- The merger (``PatchMerger``: LayerNorm over each patch, then an MLP on the 2×2 concatenation) takes patches, as
  Qwen2.5-VL's does: ``token_projector`` stays lacking.
"""

from __future__ import annotations

from .qwen2_5_vl import Qwen2_5_VLFamily


class Qwen2VLFamily(Qwen2_5_VLFamily):
    model_type = "qwen2_vl"
    model_class_names = ("Qwen2VLForConditionalGeneration",)
    lacks = {
        **Qwen2_5_VLFamily.lacks,
        "token_projector": "merges 2×2 patches inside its merger (LayerNorm + MLP over the concatenated patches), whose "
                           "input is therefore patches, not visual tokens",
    }

    @property
    def vision_width(self) -> int:
        """Width C of the tower's blocks: ``embed_dim`` (``vision_config.hidden_size`` is the merger's output)."""
        return int(self.config.vision_config.embed_dim)
