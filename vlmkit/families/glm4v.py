"""GLM-4.1V (``Glm4vForConditionalGeneration``): dynamic resolution, 2×2 patch merge, 3-D M-RoPE like Qwen2.5-VL.

What the model does (transformers 5.25, ``models/glm4v``):

- ``Glm4vImageProcessor`` resizes each image to a multiple of ``patch · merge`` (14 · 2 = 28 px) and flattens it
  into patches ``pixel_values [Σ H·W, C·2·14·14]`` (each patch duplicated over ``temporal_patch_size = 2``) in 2×2
  merge order, with ``image_grid_thw`` (1, H, W) per image. ``Glm4vProcessor`` repeats ``<|image|>`` ``H·W / 4``
  times; the chat template puts ``<|begin_of_image|>`` / ``<|end_of_image|>`` around it (without them two
  adjacent images would be one run for ``get_rope_index``), and the processor returns ``mm_token_type_ids``.
- The tower (``model.model.visual``): Conv3d patch embedding, a learned 2-D position embedding bicubically
  resized to each image's grid plus 2-D RoPE, full attention within each image (``cu_seqlens``, fused ``qkv``,
  no windows, no CLS), then a strided 2×2 ``downsample`` convolution and the ``merger`` MLP: one [h·w, D] tensor
  per image, h = H/2, w = W/2, row-major.
- The decoder uses M-RoPE (``mrope_section`` [8, 12, 12] over half of each head, ``partial_rotary_factor`` 0.5):
  ``Glm4vModel.get_rope_index`` follows exactly Qwen2.5-VL's rule for images: text tokens (p, p, p), the image
  starting at L gets (L + t, L + row, L + col), the text after it resumes at L + max(h, w).
  ``generate`` builds ``[4, B, S]`` position ids (row 0: ``attention_mask.cumsum - 1``) once and extends every
  row by one per step.

How vlmkit handles it: as Qwen2.5-VL (``qwen2_5_vl.py`` describes it), whose code this family inherits:
``VisualTokens`` per image with ``grid = (h, w)``; **pruning carries each kept token's (t, h, w) position**
(``language_inputs`` lays out the M-RoPE positions of the assembled batch with ``mrope_positions``: a kept token
keeps the position of its cell and the text after an image still resumes at L + max(h, w)); without pruning they
equal ``get_rope_index``'s exactly. Position stages (V2PE, MouSi) lay out their 3-D positions through the same
``mrope_positions`` (capability ``mrope``). What differs from Qwen2.5-VL:

- the tower has no windowed attention: every layer attends over a whole image (``global_vision_layers`` = all,
  no window permutation), so FoPru scores any layer, by default the last (whose output the ``downsample`` and the
  merger take), with the shared Qwen code (fused ``qkv``, the tower's rotary function, one attention group per
  image, 4 consecutive patches per merged token). There is still no fixed tile: PVC, VisionZip and VisPruner do
  not apply (``lacks``); random, DivPrune and the decoder-side pruners do;
- ``tokens_per_tile`` (upper bound for the ``num_keep`` check): the largest image ``Glm4vImageProcessor``'s
  default ``longest_edge`` (28·28·15000 px, counted over the 2 temporal copies) allows:
  28·28·15000 / 2 / 28² = 7500 tokens; ``grid`` the largest square within it (86×86). A checkpoint's
  ``preprocessor_config`` may allow larger images.
"""

from __future__ import annotations

from .qwen2_5_vl import Qwen2_5_VLFamily

#: Tokens of the largest image ``Glm4vImageProcessor``'s default ``longest_edge`` allows: 28·28·15000 / 2 / 28².
MAX_IMAGE_TOKENS = 7500


class Glm4vFamily(Qwen2_5_VLFamily):
    model_type = "glm4v"
    model_class_names = ("Glm4vForConditionalGeneration",)
    lacks = {
        **Qwen2_5_VLFamily.lacks,
        "token_projector": "merges 2×2 patches with a strided convolution and projects the merged tokens of all "
                           "images as one packed variable-length sequence, not per tile",
    }

    max_image_tokens = MAX_IMAGE_TOKENS  # the largest image the processor's default ``longest_edge`` allows
