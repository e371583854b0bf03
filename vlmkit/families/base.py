"""``Family``: what vlmkit needs to know about one HF model family, behind one small interface."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..tokens import VisualTokens


#: What a stage may need from a family (``StageConfig.requires``); a family lists what it has in ``capabilities``.
CAPABILITIES: dict[str, str] = {
    "patch_grid": "a fixed tile whose visual tokens pool a grid of vision-tower patches, with the attention q/k and "
                  "MLP of every vision layer exposed by the family",
    "rope_1d": "a decoder whose rotary embedding takes 1-D positions",
    "single_tile": "one pixel_values row per image",
}


def _as_pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class Family:
    """Adapter for one ``*ForConditionalGeneration`` class of the LLaVA / InternVL shape.

    Subclasses name the model classes they accept and how tiles map to images; everything else
    (placeholder id, embeddings, the model's own ``get_image_features``) is shared.
    """

    model_type: ClassVar[str] = ""
    model_class_names: ClassVar[tuple[str, ...]] = ()
    image_kwarg_names: ClassVar[tuple[str, ...]] = ()  # extra processor outputs get_image_features takes
    #: token strings the family's prompts use around images (stages adding tokens must not reuse them)
    image_markers: ClassVar[tuple[str, ...]] = ()
    #: keys of ``CAPABILITIES`` this family has; ``lacks`` says why for each one it does not
    capabilities: ClassVar[frozenset[str]] = frozenset({"patch_grid", "rope_1d"})
    lacks: ClassVar[dict[str, str]] = {"single_tile": "tiles its images (several pixel_values rows per image)"}

    def __init__(self, model: nn.Module) -> None:
        # A PEFT model (LoRA on the HF model) is called as it is; attributes are read from the model inside.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if type(inner).__name__ not in self.model_class_names:
            raise ValueError(
                f"vlmkit's {self.model_type!r} family wraps {list(self.model_class_names)}, "
                f"got {type(inner).__name__}"
            )
        self.model = inner
        self.config = inner.config

    def require(self, capability: str, stage: str) -> None:
        """ValueError naming the stage, the capability and why this family lacks it (``wrap()`` time)."""
        if capability not in CAPABILITIES:
            raise ValueError(f"stage {stage!r} requires unknown capability {capability!r}; known: {sorted(CAPABILITIES)}")
        if capability not in self.capabilities:
            why = self.lacks.get(capability, "does not provide it")
            raise ValueError(f"stage {stage!r} needs {CAPABILITIES[capability]} ({capability!r}), but "
                             f"{self.model_type!r} {why}")

    # --- ids and embeddings -------------------------------------------------------------------
    @property
    def placeholder_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def pad_token_id(self) -> int:
        for cfg in (self.config, getattr(self.config, "text_config", None)):
            pad = getattr(cfg, "pad_token_id", None)
            if pad is not None:
                return int(pad)
        return 0

    @property
    def text_width(self) -> int:
        """Hidden size of the language model (= width of the projected visual tokens)."""
        return int(self.model.get_input_embeddings().embedding_dim)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids -> [B, S, D] input embeddings of the language model."""
        return self.model.get_input_embeddings()(input_ids)

    # --- language model -----------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The decoder backbone (``LlamaModel``/``Qwen2Model``…) that runs on ``inputs_embeds``."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's transformer layers, in order (what decoder stages act between)."""
        return self.language_model.layers

    @property
    def rotary_embedding(self) -> nn.Module | None:
        """The decoder's rotary-embedding module (what position schemes remap), or None if it has none."""
        return getattr(self.language_model, "rotary_emb", None)

    def language_inputs(self, batch) -> dict[str, Any]:
        """Extra keyword arguments the decoder needs for an ``AssembledBatch`` (default: none).

        Qwen2.5-VL returns its 3-D M-RoPE ``position_ids`` here: they depend on where every kept visual
        token came from, which only the assembled batch knows.
        """
        return {}

    # --- vision -------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer layers (for hooks: FoPru scores, PVC temporal blocks)."""
        tower = self.vision_tower  # CLIPVisionModel / SiglipVisionModel keep the encoder in .vision_model
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def feature_layer(self) -> int:
        return self.config.vision_feature_layer

    @property
    def image_size(self) -> tuple[int, int]:
        return _as_pair(self.config.vision_config.image_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return _as_pair(self.config.vision_config.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the visual-token grid of one tile, as the language model sees it uncompressed."""
        (H, W), (ph, pw) = self.image_size, self.patch_size
        return H // ph, W // pw

    @property
    def tokens_per_tile(self) -> int:
        h, w = self.grid
        return h * w

    def check_pixel_values(self, pixel_values: Any) -> None:
        """Raise ValueError unless ``pixel_values`` is a float tensor [N, C, H, W] of the tower's size."""
        self._check_pixel_shape(pixel_values, ("num_images",))

    def _check_pixel_shape(self, pixel_values: Any, leading: tuple[str, ...]) -> None:
        """TypeError unless a tensor; ValueError unless its shape is [*leading, C, H, W] of the tower."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        C = self.config.vision_config.num_channels
        H, W = self.image_size
        n = len(leading)
        if pixel_values.dim() != n + 3 or tuple(pixel_values.shape[n:]) != (C, H, W):
            raise ValueError(
                f"pixel_values must be [{', '.join(leading)}, {C}, {H}, {W}] for this {self.model_type} model, "
                f"got shape {tuple(pixel_values.shape)}"
            )

    def tiles_per_image(self, input_ids: torch.Tensor | None, num_tiles: int) -> list[int]:
        """How many rows of ``pixel_values`` make up each image (one each unless a family tiles)."""
        return [1] * num_tiles

    def image_features(self, pixel_values: torch.Tensor, **image_kwargs) -> list[torch.Tensor]:
        """Per-tile projected features through the model's own tower and projector: list of [N, D]."""
        out = self.model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            **image_kwargs,
        )
        return list(out.pooler_output)

    def encode_images(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None, **image_kwargs
    ) -> list[VisualTokens]:
        """One uncompressed ``VisualTokens`` per image (tiles of one image are concatenated, ``frame`` = tile)."""
        self.check_pixel_values(pixel_values)
        feats = self.image_features(pixel_values, **image_kwargs)
        tiles = self.tiles_per_image(input_ids, len(feats))
        if sum(tiles) != len(feats):
            raise ValueError(
                f"pixel_values holds {len(feats)} image tile(s) but the image placeholder runs in input_ids "
                f"need {sum(tiles)} (tiles per image: {tiles})"
            )
        out, start = [], 0
        for n in tiles:
            embeds = torch.cat(feats[start : start + n], dim=0)
            out.append(VisualTokens.full(embeds, self.grid, frames=n))
            start += n
        return out
