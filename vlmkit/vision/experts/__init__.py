"""MouSi poly-visual experts (Fan et al., arXiv 2401.17221): several vision encoders per image, each with its
own projector into the language model's width, fused into one run of visual tokens (the paper's
poly-expert fusion network).

``vlmkit.wrap(model, ExpertsConfig(experts=[{"name": "own"}, {"name": "sam", "variant": "vit_b",
"checkpoint": "sam_vit_b_01ec64.pth"}], fusion="mlp", positions="row"))`` replaces the family's image
encoding: every image becomes ``[own tower tokens | SAM tokens]`` and the wrapper resizes the processor's
placeholder run to that length, so prompts made by the model's own processor keep working.

MouSi released no code ("coming soon"); everything below marked *choice* is ours, written down here:

Experts (backbones), chosen by ``spec["name"]`` in ``EXPERT_TYPES`` (extend it with ``register_expert``):

- ``{"name": "own", "projector": "model" | "new", "layer": int}``: the wrapped model's own vision tower.
  *Choice*: ``"model"`` (default) yields the model's own projected tokens (``family.image_features``), i.e.
  exactly what the language model was trained on; its fusion is then the identity (MLP fusion, merge 1)
  and nothing new is trained for it. ``"new"`` takes the tower's hidden state at ``layer`` (default the
  model's ``vision_feature_layer``, CLS dropped) and gives it a new projector like any other expert.
- ``{"name": "open_clip", "model": "ViT-B-16" | "model_config": {...}, "checkpoint": PATH,
  "image_size": int, "layer": int, "mean": [3], "std": [3], "seed": int}``: an open_clip ViT. The
  architecture comes from open_clip's bundled config of ``model`` or from an inline ``model_config``
  (open_clip's JSON schema: ``embed_dim``, ``vision_cfg``, …); only the vision tower is built. The
  checkpoint (open_clip format, ``.bin``/``.pt`` read with ``torch.load(weights_only=True)`` or
  ``.safetensors``) is filtered to its ``visual.*`` keys and loaded strictly; ``image_size`` overrides the
  config's (positional embedding resized as open_clip does). Without a checkpoint the weights are random,
  seeded by ``seed`` (tests). Features: the patch tokens after block ``layer`` (default -2, the
  penultimate block as LLaVA uses CLIP), CLS dropped, before ``ln_post``. ``hf-hub:`` names are refused.
- ``{"name": "sam", "variant": "vit_b" | "vit_l" | "vit_h" | "tiny", "checkpoint": PATH, "seed": int}``: the
  segment-anything image encoder (``vlmkit.seg.sam.load_sam``, ``weights_only=True``); features are the
  neck output, ``out_chans`` × (img_size/16)² (256 × 64 × 64 = 4096 tokens for the released SAMs).
  ``"tiny"`` without a checkpoint is ``vlmkit.seg.sam.tiny_sam(seed)`` (random, tests).

Backbones are frozen: they live outside the stage's ``parameters()``/``state_dict()`` (so recipes and
optimizers never see them and ``save_pretrained`` does not copy them: they are re-read from their
checkpoint paths at ``wrap``/``load`` time), run under ``no_grad`` in eval mode, and follow the stage's
``.to()``. The ``own`` expert runs with autograd, since its modules belong to the model (a recipe may train
the model's projector).

Pixels. Experts see the model's ``pixel_values`` [N, 3, H, W] (one row per image): *choice*: they are
de-normalised with ``image_mean``/``image_std`` (the wrapped model's processor normalisation, default
OpenAI CLIP's = LLaVA's; set ``processor.image_processor.image_mean``/``image_std`` for other models),
resized bilinearly (antialiased) to the expert's input size and re-normalised with the expert's mean/std.
SAM gets the (square) image resized to its full input square, not letterboxed. Tiled inputs
(InternVL ``crop_to_patches``) are not supported: one pixel row is one image.

Fusion (``fusion``), one module per expert, trained (``stages.train: [experts]`` in a recipe):

- ``"mlp"``: LLaVA-1.5's ``mlp2x_gelu`` (Linear F·m → D, GELU, Linear D → D) per expert; the experts' token
  runs are concatenated in config order (MouSi's MLP fusion; not confirmed against the paper's full text).
  Multi-patch-one-token ``merge`` (config default, per-expert override ``spec["merge"]``): *choice*: an int m
  concatenates m horizontally adjacent patches (a 1×m window, so rows are kept: an R×C grid becomes R×(C/m));
  a pair [mh, mw] merges mh×mw windows (R/mh × C/mw). Window features are concatenated row-major within the
  window.
- ``"qformer"``: per expert a Q-Former-style resampler: ``queries`` learned queries (config default,
  per-expert ``spec["queries"]``) of the language model's width, ``qformer_layers`` pre-LN blocks of
  query self-attention, cross-attention to the expert's linearly projected features and a 4× GELU MLP,
  then LayerNorm + Linear. *Choice*: the Q queries of an expert form the most square grid h×w = Q
  (h the largest divisor ≤ √Q; 16 → 4×4, 8 → 2×4), which is what the ``row`` scheme counts.

Every fused module is initialised under ``torch.manual_seed(seed)`` (global RNG untouched), at ``wrap``
time, because its sizes need the model (language-model width, the own tower).

Output: one ``VisualTokens`` per image, ``num_uncompressed`` = Σ tokens of all experts, ``index`` the run
position, ``grid`` = (1, T) (the run has no single 2-D layout) and ``blocks`` = [(offset, grid)] per expert.

Positions (``positions``, reconstructed from the MouSi abstract; per-expert blocks laid out one after the
other, as ``vlmkit.position.mousi`` documents): ``"original"`` (default) leaves positions alone (each token
takes the next integer; a position stage given to ``wrap`` still applies, and ``MouSiPositionConfig`` honours
the expert blocks). ``"shared"`` (one position per expert block) and ``"row"`` (R positions for an R×C
expert) are realised by this stage itself: while the language model runs it remaps the decoder's rotary
embedding to ``mousi_position_ids(positions, …)``. *Choice*: since an encoder stage hands the model no
``position_ids``, the remap does not rely on the model's own integer numbering: the full prompt (the
call whose length is the assembled length) gets the scheme positions column by column, and later calls
(generated tokens) continue at ``last scheme position + (model position − model position of the last
prompt token)``, which is right whether the model numbers columns (``forward``) or real tokens
(``generate``). Combining ``positions="shared"|"row"`` with a position stage raises at ``wrap()`` time
(use ``positions="original"`` with ``MouSiPositionConfig(mode=...)`` instead, which gives the same
positions).

Layout: ``checks`` (spec value checks shared by the others: ``merge_window``, ``query_grid``),
``backbones`` (``ExpertBackbone`` and the ``own`` / ``open_clip`` / ``sam`` experts, their builders,
``EXPERT_TYPES`` and ``register_expert``), ``fusion`` (``MLPProjector``, the Q-Former resampler) and
``stage`` (``ExpertsConfig``, the ``ExpertsStage`` encoder stage and its position remap).
"""

# merge_window, QFormerBlock and the constants stay importable from here as before (public, not in __all__).
from .backbones import (
    EXPERT_TYPES, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ExpertBackbone, ExpertType, OpenCLIPExpert, OwnTowerExpert,
    SAMExpert, register_expert,
)
from .checks import merge_window, query_grid
from .fusion import MLPProjector, QFormerBlock, QFormerResampler
from .stage import COMMON_KEYS, FUSIONS, ExpertsConfig, ExpertsStage

__all__ = [
    "ExpertsConfig", "ExpertsStage", "ExpertBackbone", "ExpertType", "EXPERT_TYPES", "register_expert",
    "OwnTowerExpert", "OpenCLIPExpert", "SAMExpert", "MLPProjector", "QFormerResampler", "query_grid",
]
