"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, 2×2 patch merger, 3-D M-RoPE.

What the model does (transformers 5.25): the processor resizes each image to a multiple of 28 px and emits
``<|vision_start|>`` + ``t·h·w`` ``<|image_pad|>`` + ``<|vision_end|>``, where ``(t, H, W) = image_grid_thw``
(patches of 14 px) and ``h = H/2, w = W/2`` (the merger joins 2×2 patches; t = 1 for images).
``pixel_values`` are the flattened patches ``[Σ t·H·W, C·2·14·14]``, the 4 patches of each merged token one after
the other. The decoder uses M-RoPE: every token has a (temporal, height, width) position;
``Qwen2_5_VLModel.get_rope_index`` gives text tokens (p, p, p) with p counting on, and the image tokens of an
image starting at L the positions (L + t, L + row, L + col); the text after the image resumes at
``L + max(h, w)``.

How vlmkit handles it (design choices of this module; Qwen2-VL, Qwen3-VL and GLM-4.1V families derive from it):

- One ``VisualTokens`` per image: ``grid = (h, w)`` (merged tokens), ``frame`` = t for t > 1, index
  ``t·h·w + row·w + col``, i.e. the model's own token order.
- **M-RoPE positions are laid out by the family** (``mrope_positions``) from the assembled batch
  (``batch.visual_index``): per row a counter p starts at 0; a text token takes (p, p, p) and p += 1; an image
  starting at p = L gives its token of cell (t, row, col) the position L + f(t, row, col), where f maps the
  model's own offsets ``o = (t, row, col)`` (``mrope_offsets``) of *every uncompressed* cell; the text after the
  image resumes at ``ceil(L + max over all its cells of f's height and width offsets) + 1``. The model's own
  scheme is f = identity: (L + t, L + row, L + col) and the text resumes at ``L + max(h, w)`` (get_rope_index's
  rule), so without pruning the positions equal ``get_rope_index``'s exactly (padding 0) and identity is
  bit-exact. **Pruning carries each kept token's (t, h, w) position**: a kept token keeps the position of its
  cell and the text after an image resumes where it would unpruned, so pruning never moves the text.
- ``language_inputs`` hands the decoder ``position_ids`` [4, B, L] (row 0 = the integer text positions
  ``attention_mask.cumsum - 1`` HF's ``generate`` uses for masks, rows 1-3 = M-RoPE, ``mrope_input``), as Qwen's
  own ``_prepare_position_ids_for_generation`` does. ``generate`` continues every row at ``last + 1``
  (``_update_model_kwargs_for_generation``), which equals HF's ``rope_deltas`` rule because the last prompt
  token is text (``<|vision_end|>`` closes every image) and holds the largest position.
- **Position schemes** (capability ``mrope``, so ``rope_positions``: V2PE, MouSi) give f per image
  (``layout(image, offsets)``, from ``RotaryPositionStage.mrope_layout``); as with 1-D RoPE the decoder gets
  integer positions (here on all four rows) and the rotary embedding looks up the scheme's 3-D positions
  (``vlmkit.position.rotary``), so masks and ``generate``'s bookkeeping never see fractions. What each scheme
  means for 3-D positions (o = (t, row, col) of a cell, L = the image's first position, (h, w) its grid)::

      scheme              f(o)                       text after the image resumes at
      model's own         (t, row, col)              L + max(h, w)
      MouSi original      (t, row, col)              L + max(h, w)           (= the model's own)
      MouSi row           (t, row, 0)                L + h                   (one position per row)
      MouSi shared        (0, 0, 0)                  L + 1                   (the image is one position)
      V2PE δ              δ·(1 + o) − 1, per axis    L + ceil(δ·max(h, w))   (δ = 1: the model's own)

  V2PE in 3-D is 1-D V2PE's ``prev + j·δ`` with j = 1 + offset on every axis (prev = L − 1, the token before the
  image): the image's extent shrinks by δ along each axis and the text continues after the scaled extent.
  ``row`` keeps the height axis and puts every column at column 0 (tokens of a row share their position);
  ``shared`` puts every token at (L, L, L). Unlike the 1-D schemes, which count the tokens present, every
  scheme here lays out the *cells*: a pruned image keeps its kept cells' positions and its uncompressed extent.
- There is no fixed tile: ``image_size`` / a per-tile patch grid do not exist (``patch_grid``: PVC refuses at
  ``wrap()``), and ``tokens_per_tile`` is an upper bound only: the tokens of the largest image the processor's
  default ``max_pixels`` (12 845 056 px = 16 384 tokens) allows, for the ``num_keep`` check of pruning stages
  (and V2PE's default δ = stride / tokens_per_tile: set ``tokens_per_tile`` for another δ).
- **Vision attention** (capability ``vision_attention``, FoPru): the tower runs all images as one packed patch
  sequence, permuted into windows (``window_index``: the 2×2 merge units of each window together), with a fused
  ``qkv``, a 2-D rotary embedding and, in a full-attention layer, a block-diagonal mask (``cu_seqlens``: one block
  per image and frame); the other layers attend within windows of ``window_size`` px only. Only the
  full-attention layers (``fullatt_block_indexes``, ``global_vision_layers``: 7, 15, 23, 31 of the 32 layers of
  every released Qwen2.5-VL) see a whole image, so they are the ones whose attention ranks an image's tokens;
  the last of them (31) is also the layer whose output the merger projects, so FoPru's default (the feature
  layer) is a full-attention layer. ``on_vision_attention`` hooks that layer's attention module (the tower keeps
  its own SDPA / flash kernel) and recomputes, per ``cu_seqlens`` block, q and k from the module's own fused
  ``qkv`` with the tower's rotary embedding applied (``vision_qk``); each position is mapped back from the window
  order to the merged token it feeds (its 2×2 merge unit in the model's token order). A tower without windows
  (Qwen2-VL, Qwen3-VL, GLM-4.1V: no ``fullatt_block_indexes``) attends globally in every layer and is served by
  the same code with ``window_index`` = the identity.
- VisionZip and VisPruner stay refused: their method is the CLS token's attention row, and this tower has no CLS
  token (``vision_cls``); their merge step also needs a projector that takes one visual token's feature
  (``token_projector``), while the merger takes 2×2 patches.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..sequence import integer_positions, visual_runs
from ..tokens import VisualTokens
from .base import AttentionGroup, Family, HookHandles

#: Default ``max_pixels`` of ``Qwen2VLImageProcessor`` (Qwen2.5-VL checkpoints): 16384 merged tokens.
DEFAULT_MAX_PIXELS = 12845056


class Qwen2_5_VLFamily(Family):
    model_type = "qwen2_5_vl"
    model_class_names = ("Qwen2_5_VLForConditionalGeneration",)
    # mm_token_type_ids describe the *original* sequence: the wrapper must not hand them to the decoder
    # with the assembled one, so the family takes (and ignores) them.
    image_kwarg_names = ("image_grid_thw", "mm_token_type_ids")
    capabilities = frozenset({"mrope", "vision_attention"})
    lacks = {
        "patch_grid": "has dynamic resolution: there is no fixed tile whose patch grid a stage could split",
        "rope_1d": "uses M-RoPE (3-D (t, h, w) positions), not 1-D RoPE",
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
            "tile size, so stages that need one do not apply"
        )

    @property
    def patch_size(self) -> tuple[int, int]:
        p = int(self.config.vision_config.patch_size)
        return p, p

    #: a subclass whose processor bounds an image by its token count: the tokens of the largest image its default
    #: allows (``grid`` and ``tokens_per_tile`` follow it); None: Qwen2.5-VL's pixel bound
    max_image_tokens: int | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """Upper bound only (no fixed tile): the largest square grid the processor's default allows."""
        if self.max_image_tokens is not None:
            side = math.isqrt(self.max_image_tokens)
        else:
            side = int((DEFAULT_MAX_PIXELS ** 0.5) // (self.patch_size[0] * self.merge))
        return side, side

    @property
    def tokens_per_tile(self) -> int:
        """Upper bound only (for ``num_keep`` checks and V2PE's default δ): ``max_image_tokens``, else the grid's."""
        return self.max_image_tokens if self.max_image_tokens is not None else super().tokens_per_tile

    @property
    def feature_layer(self) -> int:
        return -1

    def _no_patch_grid(self, what: str) -> ValueError:
        return ValueError(f"{type(self.model).__name__} {self.lacks['patch_grid']}: {what} does not apply")

    # --- vision attention (FoPru) ---------------------------------------------------------------
    @property
    def global_vision_layers(self) -> list[int]:
        """The full-attention layers (``fullatt_block_indexes``); every layer for a tower without windows."""
        n = len(self.vision_layers)
        full = getattr(self.config.vision_config, "fullatt_block_indexes", None)
        return list(range(n)) if full is None else sorted({int(i) % n for i in full})

    def vision_attention(self, layer_index: int):
        """The attention module of ``blocks[layer_index]``; it receives the layer-normed hidden states of all patches
        of the batch, [S, C] in the tower's (window) order, with ``cu_seqlens`` and ``position_embeddings``."""
        return self.vision_layers[layer_index].attn

    def check_vision_attention(self, layer_index: int, stage: str) -> None:
        attn = self.vision_attention(layer_index)
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scaling")):
            raise ValueError(f"{stage}: {type(attn).__name__} has no fused qkv projection to recompute attention from")

    def vision_qk(self, layer_index: int, hidden: torch.Tensor, position_embeddings=None):
        """Queries and keys of vision layer ``layer_index`` for its attention input ``hidden`` [S, C] (all patches,
        packed) and the ``position_embeddings`` (cos, sin) [S, d] it receives: ``(q [1, H, S, d], k [1, H, S, d],
        scale)`` from the module's own fused ``qkv`` and the tower's rotary function, as its forward computes them
        (the per-image block-diagonal mask is not applied here: ``vision_attention_groups``)."""
        if position_embeddings is None:
            raise ValueError("Qwen vision attention needs the position_embeddings (cos, sin) its layer receives")
        import sys

        attn = self.vision_attention(layer_index)
        S = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision  # what the module's forward calls
        cos, sin = position_embeddings
        q, k = rope(q, k, cos, sin)
        return q.transpose(0, 1)[None], k.transpose(0, 1)[None], float(attn.scaling)

    def vision_window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """The tower's window permutation for ``grid_thw`` [N, 3]: LongTensor [Σ merge units], entry j = the merge
        unit (merged token, in the model's order over all images) at unit slot j of the tower's sequence; None for a
        tower without windows (its order is the model's)."""
        vc = self.config.vision_config
        if getattr(vc, "fullatt_block_indexes", None) is None or getattr(vc, "window_size", None) is None:
            return None
        tower = self.vision_tower
        if hasattr(tower, "get_window_index"):  # transformers releases that keep it on the tower
            return tower.get_window_index(grid_thw)[0]
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(grid_thw, spatial_merge_size=self.merge, window_size=vc.window_size,
                                       patch_size=vc.patch_size)[0]

    def vision_attention_groups(self, layer_index: int, hidden: torch.Tensor, cu_seqlens=None,
                                position_embeddings=None, window_index: torch.Tensor | None = None, **_) -> list:
        """One ``AttentionGroup`` per ``cu_seqlens`` block (an image, or one frame of it) of the packed attention
        input ``hidden`` [S, C]: q/k from ``vision_qk``; position j of the block feeds the merged token
        ``window_index[j // merge²]`` (the identity without ``window_index``) minus the block's first token, i.e. the
        token's index in the image's (frame's) row-major grid; no prefix (no CLS)."""
        if cu_seqlens is None:
            raise ValueError("Qwen vision attention needs the cu_seqlens its layer receives")
        q, k, scale = self.vision_qk(layer_index, hidden, position_embeddings)
        unit = self.merge**2
        S = hidden.shape[0]
        units = torch.arange(S // unit, device=hidden.device) if window_index is None else window_index.to(hidden.device)
        token_of = units.long().repeat_interleave(unit)  # [S] merged token (model order) of each position
        bounds = [int(b) for b in cu_seqlens.tolist()]
        groups = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            tok = token_of[s:e]
            first, n = int(tok.min()), (e - s) // unit
            if (e - s) % unit or int(tok.max()) - first + 1 != n:
                raise ValueError(f"vision attention block {s}:{e} does not hold whole merge units of one image")
            groups.append(AttentionGroup(q[0, :, s:e], k[0, :, s:e], scale, 0, tok - first, n))
        return groups

    def on_vision_attention(self, layer_index: int, hook):
        """``hook(groups)`` whenever vision layer ``layer_index``'s attention runs: a pre-hook on the tower records
        its ``grid_thw`` (for the window permutation), one on the layer's attention module reads its input,
        ``cu_seqlens`` and ``position_embeddings``; nothing the model computes changes."""
        seen: dict[str, Any] = {}

        def tower_pre(module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            given = kwargs.get("window_index")  # a caller's precomputed permutation, which the tower then uses
            seen["window_index"] = given if given is not None else self.vision_window_index(grid)

        def attention_pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
            pe = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
            hook(self.vision_attention_groups(layer_index, hidden, cu_seqlens=cu, position_embeddings=pe,
                                              window_index=seen.get("window_index")))

        return HookHandles([
            self.vision_tower.register_forward_pre_hook(tower_pre, with_kwargs=True),
            self.vision_attention(layer_index).register_forward_pre_hook(attention_pre, with_kwargs=True),
        ])

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

    # --- language model: M-RoPE ---------------------------------------------------------------
    @property
    def rope_kind(self) -> str:
        return "mrope"

    def language_inputs(self, batch) -> dict[str, Any]:
        """``position_ids`` [4, B, L]: text positions, then the model's own M-RoPE (t, h, w) rows of the assembled
        batch (``mrope_positions``)."""
        return {"position_ids": self.mrope_input(integer_positions(batch.attention_mask), self.mrope_positions(batch))}

    def mrope_input(self, text_positions: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decoder's ``position_ids``: text positions [B, L] stacked over the M-RoPE rows [3, B, L] → [4, B, L]."""
        return torch.cat([text_positions[None].to(device=positions.device, dtype=positions.dtype), positions], dim=0)

    def mrope_offsets(self, tokens: VisualTokens) -> torch.LongTensor:
        """The model's own offsets [3, N] of every uncompressed cell of an image from its first position L:
        cell k (= ``VisualTokens.index``) → (t, row, col) = (k // hw, (k % hw) // w, k % w)."""
        if tokens.blocks is not None or tokens.source is not None:
            raise ValueError("M-RoPE positions need an image of one (frames × h × w) grid, without blocks or a source map")
        h, w = tokens.grid
        k = torch.arange(int(tokens.num_uncompressed), device=tokens.index.device)
        return torch.stack([k // (h * w), (k % (h * w)) // w, k % w])

    def mrope_positions(self, batch, layout: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """M-RoPE positions [3, B, L] of an ``AssembledBatch`` (module docstring): LongTensor by the model's own rule
        (``layout=None``; padding 0), else float64 with image i's offsets ``o`` [3, N] (``mrope_offsets``) replaced
        by ``layout(i, o)`` [3, N].

        Per row: a counter p starts at 0; a text token takes (p, p, p) and p += 1; an image starting at p = L gives
        its token of cell k the position L + f[:, k] (f = its offsets, mapped), and then
        p = L + ceil(max(f[1:])) + 1 over *all* its cells (uncompressed: pruning never moves the text). The model's
        own f = o gives get_rope_index's ``L + max(h, w)``.
        """
        mask = batch.attention_mask
        B, L = mask.shape
        dtype = torch.long if layout is None else torch.float64
        pos = torch.zeros((3, B, L), dtype=dtype, device=mask.device)
        offsets: dict[int, torch.Tensor] = {}
        for b, cols, segments in visual_runs(batch.visual_mask, mask, batch.image_id):
            row = torch.empty((3, cols.numel()), dtype=dtype, device=mask.device)
            p = 0
            for start, end, key in segments:
                if key < 0:
                    row[:, start:end] = torch.arange(p, p + end - start, device=mask.device)
                    p += end - start
                    continue
                if key not in offsets:
                    offsets[key] = self._image_offsets(batch.tokens[key], key, layout, mask.device)
                f = offsets[key]
                k = batch.visual_index[b, cols[start:end]].long()
                row[:, start:end] = p + f[:, k]
                p += math.ceil(f[1:].max().item()) + 1
            pos[:, b, cols] = row
        return pos

    def _image_offsets(self, tokens: VisualTokens, key: int, layout, device) -> torch.Tensor:
        native = self.mrope_offsets(tokens).to(device)
        if layout is None:
            return native
        f = layout(key, native)
        if not isinstance(f, torch.Tensor) or f.shape != native.shape or not bool(torch.isfinite(f).all()):
            raise ValueError(f"a position layout must map the offsets [3, {native.shape[1]}] of image {key} to finite "
                             f"offsets of the same shape, got {getattr(f, 'shape', type(f).__name__)}")
        return f.to(device=device, dtype=torch.float64)
