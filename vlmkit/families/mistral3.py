"""Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral-Small-3.1 / 3.2): Pixtral tower, patch merger, row breaks.

What the model does (transformers 5.25, ``Mistral3Model.get_image_features``, ``PixtralVisionModel``,
``PixtralProcessor``): the processor resizes each image so its longest side fits ``longest_edge`` (1540 px) and
its sides are multiples of ``patch_size · spatial_merge_size`` (14 · 2 = 28 px), pads the images of a batch to the
largest one (``pixel_values`` [N, C, H_max, W_max]) and reports each image's size in ``image_sizes`` [N, 2]. It
writes, per image of ``R × C`` merged tokens (R = H / 28, C = W / 28)::

    ([IMG] × C  [IMG_BREAK]) × (R − 1)   [IMG] × C  [IMG_END]

i.e. R rows of C + 1 tokens, the last row ending with ``[IMG_END]``. The Pixtral tower crops every image to its
size (H/14 × W/14 patches), concatenates all images into one sequence ``[1, Σ patches, C_v]`` with a 2-D rotary
embedding (each patch's (row, col) inside its own image) and a block-diagonal attention mask (one block per image;
FlashAttention gets the same blocks as ``cu_seqlens``); no CLS token. The projector (RMSNorm, then
``Mistral3PatchMerger``: each image's 2×2 patches unfolded into one vector, a linear layer, then Linear-GELU-Linear)
gives R·C features per image, row-major. Only ``[IMG]`` slots get features (``masked_scatter``); ``[IMG_BREAK]`` /
``[IMG_END]`` are ordinary tokens with their own text embeddings. The decoder (Mistral / Llama) uses plain 1-D RoPE.

How vlmkit describes it (design choices of this module):

- **Break and end tokens belong to the image**, as LLaVA-NeXT's image newlines do: ``image_run_mask`` marks the
  ``[IMG]`` slots and the one token after every row of ``[IMG]`` (the row's ``[IMG_BREAK]`` or the image's
  ``[IMG_END]``), so one image is one contiguous run of ``R·(C + 1)`` slots. Its ``VisualTokens`` have
  ``grid = (R, C + 1)``, ``index`` = run position ``r·(C + 1) + c``, ``embeds`` = the model's features at the
  ``[IMG]`` cells and the *text embedding* of the break / end token (read from ``input_ids``) in column C, so
  identity is bit-exact; ``source`` = the merged token ``r·C + c`` (the projector's order) and -1 for break / end
  tokens (``num_sources = R·C``). Pruners therefore always keep the break / end tokens and count only ``[IMG]``
  tokens toward their budget (``VisualTokens.is_newline``), decoder-side pruners keep them too, and position
  schemes see one run: MouSi ``row`` gives a break its row's position, ``original`` the model's own positions,
  V2PE δ = 1 the model's own positions. ``assemble`` keeps the ids and the caller's labels of break / end slots
  (they are text tokens the model itself is trained to predict).
- There is no fixed tile: ``image_size`` raises, and ``grid`` / ``tokens_per_tile`` are an upper bound only, the
  largest image the tower takes (``vision_config.image_size`` = 1540 px: 55 × 55 = 3025 merged tokens), for the
  ``num_keep`` check of pruning stages and V2PE's default δ (set ``tokens_per_tile`` for another δ).
- **Vision attention** (capability ``vision_attention``, FoPru): every Pixtral layer attends over a whole image
  (``global_vision_layers``: all), so FoPru's default is the feature layer (``vision_feature_layer`` -1: the last
  layer). ``on_vision_attention`` records ``image_sizes`` with a pre-hook on the tower and recomputes, per image
  (one block of the block-diagonal mask), q and k from the layer's own ``q_proj`` / ``k_proj`` with the same 2-D
  rotary (the ``position_embeddings`` the layer receives, Pixtral's ``apply_rotary_pos_emb``); patch (i, j) of an
  image of w patch columns feeds merged token ``(i // m)·(w / m) + j // m`` (m = ``spatial_merge_size``), so a
  token's score is the sum over its m×m patches.
- Decoder: ``MistralModel`` with standard HF attention, so decoder-side pruning (FastV, PDrop, DART, VTW) works.
  Mistral-Small-3.1 / 3.2 set ``sliding_window: null``; decoder pruning builds full causal masks for the layers
  after a drop, so a Mistral 3 config with a sliding window shorter than the prompt is not covered.
- VisionZip / VisPruner stay refused (no CLS token; the merger takes 2×2 patches, not one token's feature), and so
  are the stages that need a fixed tile (PVC, MouSi experts, PMP).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..tokens import VisualTokens
from .base import AttentionGroup, Family, HookHandles


class Mistral3Family(Family):
    model_type = "mistral3"
    model_class_names = ("Mistral3ForConditionalGeneration",)
    image_kwarg_names = ("image_sizes",)
    image_markers = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
    capabilities = frozenset({"rope_1d", "vision_attention"})
    lacks = {
        "patch_grid": "has dynamic resolution: there is no fixed tile whose patch grid a stage could split",
        "single_tile": "pads every image of a batch to the largest one and crops it by image_sizes (dynamic "
                       "resolution): a pixel_values row is not a tile of one fixed size",
        "tile_rows": "passes images as padded pixel_values rows cropped by image_sizes, not as tiles of one fixed grid",
        "fixed_grid": "has dynamic resolution: an image's token grid follows its size",
        "mrope": "uses 1-D RoPE",
        # vision attention rows (pre-LLM pruners)
        "vision_cls": "runs a Pixtral tower, which has no CLS token",
        "token_projector": "merges 2×2 patches inside its projector (patch merger), whose input is therefore patches, "
                           "not visual tokens",
    }

    # --- ids: the image runs ------------------------------------------------------------------
    def image_run_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: the ``[IMG]`` slots and the token right after every maximal run of them (the row's
        ``[IMG_BREAK]`` or the image's ``[IMG_END]``)."""
        ph = input_ids == self.placeholder_id
        after = torch.zeros_like(ph)
        after[:, 1:] = ph[:, :-1] & ~ph[:, 1:]
        return ph | after

    # --- vision -------------------------------------------------------------------------------
    @property
    def vision_layers(self):
        return self.vision_tower.transformer.layers

    @property
    def merge(self) -> int:
        """``spatial_merge_size`` m: one language-model token holds m×m patches."""
        return int(self.config.spatial_merge_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        p = int(self.config.vision_config.patch_size)
        return p, p

    @property
    def image_size(self) -> tuple[int, int]:
        raise ValueError(
            f"{type(self.model).__name__} has dynamic resolution (image_sizes per image): there is no fixed tile "
            "size, so stages that need one do not apply"
        )

    @property
    def grid(self) -> tuple[int, int]:
        """Upper bound only (no fixed tile): the merged tokens of the largest image the tower takes
        (``vision_config.image_size`` per side)."""
        side = int(self.config.vision_config.image_size) // (self.patch_size[0] * self.merge)
        return side, side

    @property
    def feature_layer(self):
        return self.config.vision_feature_layer

    def vision_attention(self, layer_index: int):
        """The ``PixtralAttention`` of ``layers[layer_index]``; it receives the layer-normed hidden states of every
        image of the batch packed into one sequence [1, S, C] and the 2-D rotary ``position_embeddings``."""
        return self.vision_layers[layer_index].attention

    def check_vision_attention(self, layer_index: int, stage: str) -> None:
        attn = self.vision_attention(layer_index)
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "head_dim", "scaling")):
            raise ValueError(f"{stage}: {type(attn).__name__} has no q_proj / k_proj / num_heads / head_dim / scaling "
                             "to recompute attention from")

    def vision_qk(self, layer_index: int, hidden: torch.Tensor, position_embeddings=None):
        """Queries and keys of vision layer ``layer_index`` for its attention input ``hidden`` [B, S, C] and the
        ``position_embeddings`` (cos, sin) [S, d] it receives: ``(q [B, H, S, d], k [B, H, S, d], scale)`` from the
        module's own projections and Pixtral's 2-D rotary function, as its forward computes them (the per-image
        block-diagonal mask is not applied here: ``vision_attention_groups``)."""
        if position_embeddings is None:
            raise ValueError("Pixtral vision attention needs the position_embeddings (cos, sin) its layer receives")
        attn = self.vision_attention(layer_index)
        B, S, _ = hidden.shape
        H, d = int(attn.num_heads), int(attn.head_dim)
        q = attn.q_proj(hidden).view(B, S, H, d).transpose(1, 2)
        k = attn.k_proj(hidden).view(B, S, H, d).transpose(1, 2)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # what the module's forward calls
        cos, sin = position_embeddings
        q, k = rope(q, k, cos, sin, unsqueeze_dim=0)
        return q, k, float(attn.scaling)

    def patch_grids(self, pixel_values: torch.Tensor, image_sizes=None) -> list[tuple[int, int]]:
        """(h, w) patches of every image the tower crops from ``pixel_values`` [N, C, H, W]: ``image_sizes // p``
        (the padded size without ``image_sizes``, as the tower does)."""
        p = self.patch_size[0]
        if image_sizes is None:
            N, _, H, W = pixel_values.shape
            return [(H // p, W // p)] * N
        return [(int(h) // p, int(w) // p) for h, w in torch.as_tensor(image_sizes).tolist()]

    def vision_attention_groups(self, layer_index: int, hidden: torch.Tensor, position_embeddings=None,
                                patch_grids=None, **_) -> list[AttentionGroup]:
        """One ``AttentionGroup`` per image of the packed attention input ``hidden`` [1, S, C] (``patch_grids``: the
        images' (h, w) patches in tower order, Σ h·w = S): q/k from ``vision_qk``; patch (i, j) feeds merged token
        ``(i // m)·(w / m) + j // m``; no prefix (no CLS)."""
        if patch_grids is None:
            raise ValueError("Pixtral vision attention groups need the images' patch grids (on_vision_attention)")
        m = self.merge
        S = hidden.shape[1]
        if hidden.shape[0] != 1 or sum(h * w for h, w in patch_grids) != S:
            raise ValueError(f"the vision attention input {tuple(hidden.shape)} does not pack the images of "
                             f"{patch_grids} patches into one sequence")
        q, k, scale = self.vision_qk(layer_index, hidden, position_embeddings)
        groups, start = [], 0
        for h, w in patch_grids:
            if h % m or w % m:
                raise ValueError(f"an image of {h}×{w} patches is not a whole number of {m}×{m} merge units (its "
                                 f"size must be a multiple of {m * self.patch_size[0]} px, as the processor makes it)")
            i = torch.arange(h, device=hidden.device)[:, None] // m
            j = torch.arange(w, device=hidden.device)[None, :] // m
            token = (i * (w // m) + j).reshape(-1)
            end = start + h * w
            groups.append(AttentionGroup(q[0, :, start:end], k[0, :, start:end], scale, 0, token, (h // m) * (w // m)))
            start = end
        return groups

    def on_vision_attention(self, layer_index: int, hook):
        """``hook(groups)`` whenever vision layer ``layer_index``'s attention runs: a pre-hook on the tower records the
        images' patch grids (``image_sizes``), one on the layer's attention module reads its input and
        ``position_embeddings``; nothing the model computes changes."""
        seen: dict[str, Any] = {}

        def tower_pre(module, args, kwargs):
            pixel_values = args[0] if args else kwargs["pixel_values"]
            sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
            seen["patch_grids"] = self.patch_grids(pixel_values, sizes)

        def attention_pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            pe = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
            hook(self.vision_attention_groups(layer_index, hidden, position_embeddings=pe,
                                              patch_grids=seen.get("patch_grids")))

        return HookHandles([
            self.vision_tower.register_forward_pre_hook(tower_pre, with_kwargs=True),
            self.vision_attention(layer_index).register_forward_pre_hook(attention_pre, with_kwargs=True),
        ])

    def vision_mlp(self, layer_index: int):
        """The gated MLP of ``layers[layer_index]`` (input and output [1, S, C], all images packed)."""
        return self.vision_layers[layer_index].feed_forward

    def vision_hidden_states(self, pixel_values: torch.Tensor, index: int) -> torch.Tensor:
        raise ValueError(f"{type(self.model).__name__} {self.lacks['patch_grid']}: a per-tile hidden state of the "
                         "vision tower does not apply")

    # --- images -> tokens ---------------------------------------------------------------------
    def check_pixel_values(self, pixel_values: Any) -> None:
        """``pixel_values`` [N, C, H, W]: one padded row per image (its size in ``image_sizes``)."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        C = int(self.config.vision_config.num_channels)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != C:
            raise ValueError(f"pixel_values must be [num_images, {C}, H, W] (padded images, Pixtral processor output) "
                             f"for this {self.model_type} model, got shape {tuple(pixel_values.shape)}")

    def token_grids(self, image_sizes) -> list[tuple[int, int]]:
        """(R, C) merged tokens of every image: ``image_sizes // (patch_size · spatial_merge_size)``, as the model
        splits its features and the processor writes its rows."""
        unit = self.patch_size[0] * self.merge
        return [(int(h) // unit, int(w) // unit) for h, w in torch.as_tensor(image_sizes).tolist()]

    def image_features(self, pixel_values: torch.Tensor, **image_kwargs) -> list[torch.Tensor]:
        """Per-image projected features through the model's own tower and projector: list of [R·C, D], row-major."""
        out = self.model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_kwargs["image_sizes"],
            vision_feature_layer=self.config.vision_feature_layer)
        return list(out.pooler_output)

    def image_tokens(self, features: list[torch.Tensor], image_sizes, input_ids: torch.Tensor) -> list[VisualTokens]:
        """One ``VisualTokens`` per image from its features [R·C, D] (module docstring): the break / end token of each
        row is read from the image's run in ``input_ids`` [B, S] (runs in reading order, ``image_run_mask``) and
        embedded with the language model's own embedding."""
        grids = self.token_grids(image_sizes)
        if len(features) != len(grids):
            raise ValueError(f"{len(features)} images of features but image_sizes gives {len(grids)}")
        run_ids = input_ids[self.image_run_mask(input_ids)].cpu()  # reading order (row-major over the batch)
        counts = [R * (C + 1) for R, C in grids]
        if run_ids.numel() != sum(counts):
            raise ValueError(
                f"input_ids hold {run_ids.numel()} image run tokens ([IMG] and the break / end token after each row), "
                f"but images of {grids} merged tokens (rows × cols, from image_sizes) need {sum(counts)}: the images "
                "do not match the image markers in the text")
        out, start = [], 0
        ph = self.placeholder_id
        for feats, (R, C), n in zip(features, grids, counts):
            ids = run_ids[start:start + n].view(R, C + 1)
            start += n
            if bool((ids[:, :C] != ph).any()) or bool((ids[:, C] == ph).any()):
                raise ValueError(f"an image of {R}×{C} tokens needs {R} rows of {C} [IMG] tokens each followed by one "
                                 f"break / end token, got the run {ids.tolist()}")
            if feats.shape[0] != R * C:
                raise ValueError(f"an image of {R}×{C} tokens got {feats.shape[0]} features")
            weight = self.input_embeddings.weight
            newline = self.embed(ids[:, C].to(weight.device)).to(device=feats.device, dtype=feats.dtype)  # [R, D]
            embeds = torch.cat([feats.reshape(R, C, -1), newline[:, None]], dim=1).reshape(R * (C + 1), -1)
            col = torch.arange(C + 1).repeat(R)
            row = torch.arange(R).repeat_interleave(C + 1)
            source = torch.where(col < C, row * C + col, torch.full_like(col, -1))
            n_run = R * (C + 1)
            out.append(VisualTokens(
                embeds=embeds, index=torch.arange(n_run, device=feats.device), grid=(R, C + 1), num_uncompressed=n_run,
                # a meta-device model keeps the map on CPU: meta tensors would drop its values
                source=source if feats.is_meta else source.to(feats.device), num_sources=R * C))
        return out

    def encode_images(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None, **image_kwargs
    ) -> list[VisualTokens]:
        """One ``VisualTokens`` per image: the model's features plus the break / end token column."""
        self.check_pixel_values(pixel_values)
        image_sizes = image_kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError(f"{type(self.model).__name__} needs image_sizes (from its processor) with pixel_values")
        if input_ids is None:
            raise ValueError(f"{type(self.model).__name__}: vlmkit needs input_ids to read each image's "
                             "[IMG_BREAK] / [IMG_END] tokens")
        sizes = torch.as_tensor(image_sizes)
        H, W = pixel_values.shape[-2:]
        if sizes.shape != (pixel_values.shape[0], 2) or bool((sizes[:, 0] > H).any()) or bool((sizes[:, 1] > W).any()):
            raise ValueError(f"image_sizes must be [{pixel_values.shape[0]}, 2] (height, width) within the padded "
                             f"{H}×{W} pixel_values, got {sizes.tolist()}")
        feats = self.image_features(pixel_values, image_sizes=image_sizes)
        return self.image_tokens(feats, image_sizes, input_ids)
