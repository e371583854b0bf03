"""FrozenSeg: open-vocabulary segmentation on a frozen open_clip backbone and a frozen SAM image encoder.

Chen et al., "Harmonizing Frozen Foundation Models for Open-Vocabulary Segmentation" (arXiv 2409.03525),
reference ``chenxi52/FrozenSeg`` @ 647cf68 (``frozenseg/frozenseg.py``, ``frozenseg/modeling/``), itself built
on FC-CLIP:

- a frozen open_clip ConvNeXt gives multi-scale features (res2–res5) for a trainable pixel decoder and a
  dense map (``clip_vis_dense``) for out-of-vocabulary classification;
- a frozen SAM image encoder's neck output (256 ch at 1/16 for the released SAMs) goes through a SAM branch
  of the pixel decoder (Conv3×3 stride 2 + GroupNorm + ReLU, then a transformer encoder) → ``sam_fpn``;
- a Mask2Former transformer decoder (:class:`vlmkit.seg.pmp.PMPDecoder`, 250 queries, 9 layers, cycling
  the 3 pixel-decoder scales) with two SAM hooks: the **feature injector** (layers with ``level ==
  sam_feature_fuse_level``, default 0) lets the CLIP memory tokens of that level cross-attend to the
  ``sam_fpn`` tokens (both at the coarsest CLIP grid; residual + LayerNorm) and uses the result as that
  layer's memory **without position encoding**; the **query injector** (``level == sam_query_fuse_level``,
  default 2) mask-pools the SAM neck with the current masks and adds it, through the decoder's shared
  ``mask_pool_proj``, to the queries;
- open-vocabulary classification: an FC-CLIP class head (in-vocabulary logits against CLIP text embeddings
  of the class names, VILD templates averaged, max over synonyms, a learnable void embedding) and, at
  inference, mask-pooled frozen-CLIP logits (out-of-vocabulary), combined by the geometric ensemble
  ``in^(1-α)·out^α`` for classes seen in training (α = 0.4) and ``in^(1-β)·out^β`` otherwise (β = 0.8),
  with the void probability re-attached.

Only the pixel decoder, the transformer decoder (with its injectors) and the void embedding train.

Documented choices where vlmkit departs from the reference (mostly to avoid detectron2 and the compiled
MSDeformAttn op):

1. Pixel decoder: the reference's 6-layer multi-scale *deformable* attention encoder over res3–res5 is
   replaced by ``pixel_decoder_layers`` dense transformer-encoder layers (post-norm, sine position
   encoding, FFN ``pixel_decoder_ffn``) over res5 only, followed by an FPN top-down path (lateral 1×1 conv
   + GN, bilinear upsampling, 3×3 conv + GN + ReLU) to res4, res3 and res2 (MaskFormer's
   ``TransformerEncoderPixelDecoder``). Decoder memories: [res5, res4, res3] (strides 32, 16, 8); mask
   features: 1×1 conv of the res2 output (stride 4). The SAM branch uses the same dense encoder layers.
   ``hidden_dim`` is the conv width, the mask width and the decoder width (all 256 in the reference).
2. The SAM neck width may differ from ``hidden_dim`` (tiny test SAMs): the SAM branch conv maps it, and the
   query injector has a Linear(neck → hidden_dim) before the shared ``mask_pool_proj`` (Identity when equal).
3. ``sam_fpn`` is resized (bilinear) to the coarsest CLIP level before the feature injector in training
   and inference alike (the reference does it at inference only; in training its 1024² crops make the
   sizes equal). The SAM tokens get the decoder's level-0 embedding and their own sine encoding, as the
   reference.
4. SAM input: the image normalised with SAM's mean/std, then bilinearly resized to SAM's square input
   size (the reference's test path; aspect ratio ignored). CLIP input: normalised with FC-CLIP's pixel
   mean/std (0–255 scale); H and W must be multiples of 32 (no implicit padding).
5. Only the SAM image encoder is kept (prompt encoder and mask decoder are dropped).
6. The ensemble is computed in log space, ``(1-α)·log_softmax(in) + α·log_softmax(out)`` selected per
   class with ``torch.where``, the same value as the reference's ``(in^(1-α)·out^α).log() * seen`` without
   its ``0 · -inf = NaN`` hazard.
7. Loss: Mask2Former's (Hungarian matching, class CE with no-object weight 0.1 and weights class 2 /
   mask BCE 5 / dice 5, deep supervision) from :func:`vlmkit.seg.criterion.set_criterion`, computed on the full
   stride-4 mask logits (targets resized with antialiasing) instead of 12,544 importance-sampled points.
8. ``pmp=True`` turns on the PMP text cross-attention in the decoder; the text tokens are the class
   text embeddings of the current vocabulary (one token per synonym, the void row excluded), so with PMP
   the masks depend on the class list; without it they do not.
9. Backbones: ConvNeXt (timm) open_clip towers only (``convnext_large_d_320`` and smaller); the
   reference's RN50x64 path (attention-pool mask pooling) is not implemented.
10. Seen classes (``seen_match``). The reference (FC-CLIP's ``category_overlapping_mask``) splits every class
    name into synonyms with ``name.replace(", ", ",").split(",")`` (no stripping) and calls a test class seen
    when one of its synonyms is *exactly* one of the training synonyms. ``seen_match="exact"`` (default) does
    the same; ``"normalized"`` (vlmkit before, kept as an option) strips and lower-cases both sides first, so
    ``"Person"`` or ``"cat ,dog"`` also match ``"person"`` / ``"cat"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.seg.pmp import PMPDecoder, classification_logits, mask_pool, sine_position_embedding
from vlmkit.seg.criterion import set_criterion

__all__ = [
    "FrozenSegConfig", "FrozenSeg", "build_frozenseg", "CLIPBackbone", "PixelDecoder", "SamFeatureInjector",
    "VILD_TEMPLATES", "TEMPLATES", "SEEN_MATCHES", "CLIP_PIXEL_MEAN", "CLIP_PIXEL_STD",
]

#: FC-CLIP's pixel mean / std for the CLIP branch (0–255 RGB).
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)

#: The reference's ``VILD_PROMPT`` templates (FrozenSeg / FC-CLIP), averaged per class name.
VILD_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)
TEMPLATES = {"vild": VILD_TEMPLATES, "plain": ("{}",)}
#: How test class names are matched with the training vocabulary (module docstring, point 10).
SEEN_MATCHES = ("exact", "normalized")
CONFIG_NAME = "frozenseg.json"
WEIGHTS_NAME = "frozenseg.safetensors"
_FROZEN_PREFIXES = ("clip.", "sam_encoder.")


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FrozenSegConfig:
    """FrozenSeg sizes and switches; defaults are the reference's ConvNeXt-L / SAM ViT-B setting.

    ``clip``: open_clip model name; ``clip_pretrained``: local path of its weights (file for
    ``open_clip.create_model(name, pretrained=path)``), used when no model object is given. ``sam``:
    SAM type (``vit_b`` / ``vit_l`` / ``vit_h`` / ``tiny``), ``sam_checkpoint``: local state dict.
    ``queries`` / ``layers``: decoder queries and layers (250 / 9). ``alpha`` / ``beta``: geometric
    ensemble weights of seen / unseen classes (0.4 / 0.8); ``train_classes``: the training vocabulary
    that decides which classes count as seen, matched synonym by synonym ``seen_match="exact"`` as the
    reference, or ``"normalized"`` (stripped, lower-cased). ``pmp``: PMP text cross-attention in the decoder.
    """

    clip: str = "convnext_large_d_320"
    clip_pretrained: str | None = None
    sam: str = "vit_b"
    sam_checkpoint: str | None = None
    queries: int = 250
    layers: int = 9
    hidden_dim: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    pixel_decoder_layers: int = 6
    pixel_decoder_ffn: int = 1024
    sam_feature_fuse_level: int = 0
    sam_query_fuse_level: int = 2
    alpha: float = 0.4
    beta: float = 0.8
    ensemble_on_valid_mask: bool = False
    templates: str = "vild"
    train_classes: list[str] = dataclasses.field(default_factory=list)
    seen_match: str = "exact"
    pmp: bool = False
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    deep_supervision: bool = True

    def __post_init__(self) -> None:
        self.train_classes = list(self.train_classes)
        self.validate()

    def validate(self) -> None:
        from vlmkit.seg.sam import SAM_BUILDERS

        for name in ("queries", "hidden_dim", "num_heads", "ffn_dim", "pixel_decoder_ffn"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FrozenSegConfig.{name} must be a positive integer, got {v!r}")
        for name in ("layers", "pixel_decoder_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"FrozenSegConfig.{name} must be an integer >= 0, got {v!r}")
        if self.hidden_dim % self.num_heads or self.hidden_dim % 2:
            raise ValueError(f"FrozenSegConfig.hidden_dim {self.hidden_dim} must be even and divisible by "
                             f"num_heads {self.num_heads}")
        for name in ("sam_feature_fuse_level", "sam_query_fuse_level"):
            v = getattr(self, name)
            if v not in (0, 1, 2):
                raise ValueError(f"FrozenSegConfig.{name} must be a decoder level in [0, 2], got {v!r}")
        for name in ("alpha", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FrozenSegConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.templates not in TEMPLATES:
            raise ValueError(f"FrozenSegConfig.templates must be one of {sorted(TEMPLATES)}, got {self.templates!r}")
        if self.sam not in SAM_BUILDERS:
            raise ValueError(f"FrozenSegConfig.sam must be one of {sorted(SAM_BUILDERS)}, got {self.sam!r}")
        if not isinstance(self.clip, str) or not self.clip:
            raise ValueError(f"FrozenSegConfig.clip must be an open_clip model name, got {self.clip!r}")
        if not all(isinstance(c, str) and c.strip() for c in self.train_classes):
            raise ValueError(f"FrozenSegConfig.train_classes must be non-empty strings, got {self.train_classes!r}")
        if self.seen_match not in SEEN_MATCHES:
            raise ValueError(f"FrozenSegConfig.seen_match must be one of {list(SEEN_MATCHES)}, got {self.seen_match!r}")
        for name in ("class_weight", "mask_weight", "dice_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"FrozenSegConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.no_object_weight <= 1:
            raise ValueError(f"FrozenSegConfig.no_object_weight must be in (0, 1], got {self.no_object_weight}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "frozenseg", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FrozenSegConfig":
        """Inverse of ``to_dict``; unknown fields raise ValueError naming the accepted ones."""
        if not isinstance(data, dict):
            raise ValueError(f"FrozenSegConfig.from_dict takes a dict, got {type(data).__name__}")
        fields = dict(data)
        kind = fields.pop("type", "frozenseg")
        if kind != "frozenseg":
            raise ValueError(f"not a FrozenSeg config: type {kind!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown FrozenSegConfig field(s) {unknown}; accepted: {sorted(known)}")
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "FrozenSegConfig":
        return cls.from_dict(json.loads(text))


# ------------------------------------------------------------------------------------------------
# Frozen CLIP backbone
# ------------------------------------------------------------------------------------------------


def _group_norm(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, dim), dim)


class CLIPBackbone(nn.Module):
    """A frozen open_clip model with a timm ConvNeXt image tower (FC-CLIP's ``CLIP`` backbone).

    ``features(x)`` → ``res2``…``res5`` (strides 4–32) and ``clip_vis_dense`` (the trunk's ``norm_pre``
    output); ``visual_prediction(pooled [B, Q, C])`` → CLIP image embeddings [B, Q, E] (trunk head + tower
    head on 1×1 maps); ``encode_text(texts)`` → unnormalised text embeddings [N, E].
    """

    def __init__(self, clip_model: nn.Module, tokenizer) -> None:
        super().__init__()
        visual = getattr(clip_model, "visual", None)
        trunk = getattr(visual, "trunk", None)
        if trunk is None or not all(hasattr(trunk, a) for a in ("stem", "stages", "head")):
            raise ValueError(
                f"FrozenSeg needs an open_clip model with a timm ConvNeXt image tower (e.g. convnext_large_d_320); "
                f"got {type(visual).__name__} with trunk {type(trunk).__name__}"
            )
        self.clip_model = clip_model
        self.tokenizer = tokenizer
        info = trunk.feature_info
        self.channels = [int(i["num_chs"]) for i in info]
        self.strides = [int(i["reduction"]) for i in info]
        if self.strides != [4, 8, 16, 32]:
            raise ValueError(f"expected a 4-stage ConvNeXt with strides [4, 8, 16, 32], got {self.strides}")
        self.embed_dim = int(clip_model.text_projection.shape[-1]) if getattr(clip_model, "text_projection", None) is not None \
            else int(clip_model.encode_text(tokenizer(["a"])).shape[-1])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip_model.logit_scale

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        trunk = self.clip_model.visual.trunk
        out = {}
        x = trunk.stem(x)
        for i, stage in enumerate(trunk.stages):
            x = stage(x)
            out[f"res{i + 2}"] = x
        out["clip_vis_dense"] = trunk.norm_pre(x)
        return out

    def visual_prediction(self, pooled: torch.Tensor) -> torch.Tensor:
        B, Q, C = pooled.shape
        x = self.clip_model.visual.trunk.head(pooled.reshape(B * Q, C, 1, 1))
        x = self.clip_model.visual.head(x)
        return x.reshape(B, Q, -1)

    def encode_text(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        device = self.clip_model.logit_scale.device
        out = [self.clip_model.encode_text(self.tokenizer(texts[i:i + batch_size]).to(device))
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# Pixel decoder and SAM injectors
# ------------------------------------------------------------------------------------------------


class _EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with position encodings added to queries and keys."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        x = self.norm1(x + self.attn(q, q, x, need_weights=False)[0])
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


def _encode(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Run encoder ``layers`` over a map x [B, C, h, w] (sine position encoding); same shape out."""
    if not len(layers):
        return x
    B, C, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    pos = sine_position_embedding(h, w, C, x.device, x.dtype)[None]
    for layer in layers:
        tokens = layer(tokens, pos)
    return tokens.transpose(1, 2).reshape(B, C, h, w)


class PixelDecoder(nn.Module):
    """Dense-encoder + FPN pixel decoder with FrozenSeg's SAM branch (module docstring, choice 1).

    ``forward(features, sam_neck)`` → (mask features [B, D, H/4, W/4], memories [res5, res4, res3 maps of
    D channels], ``sam_fpn`` [B, D, hs/2, ws/2]).
    """

    def __init__(self, in_channels: Sequence[int], sam_channels: int, dim: int, num_layers: int,
                 heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.input_proj = nn.Sequential(nn.Conv2d(in_channels[3], dim, 1), _group_norm(dim))
        self.encoder = nn.ModuleList(_EncoderLayer(dim, heads, ffn_dim) for _ in range(num_layers))
        # top-down order: res4, res3, res2
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), _group_norm(dim)) for c in in_channels[2::-1]
        )
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), _group_norm(dim), nn.ReLU())
            for _ in in_channels[2::-1]
        )
        self.mask_features = nn.Conv2d(dim, dim, 1)
        self.sam_down = nn.Sequential(nn.Conv2d(sam_channels, dim, 3, stride=2, padding=1), _group_norm(dim), nn.ReLU())
        self.sam_encoder = nn.ModuleList(_EncoderLayer(dim, heads, ffn_dim) for _ in range(num_layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)  # detectron2 c2_xavier_fill
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: dict[str, torch.Tensor], sam_neck: torch.Tensor):
        y = _encode(self.encoder, self.input_proj(features["res5"]))
        memories = [y]
        for name, lateral, output in zip(("res4", "res3", "res2"), self.lateral, self.output):
            x = lateral(features[name])
            y = output(x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))
            memories.append(y)
        sam_fpn = _encode(self.sam_encoder, self.sam_down(sam_neck))
        return self.mask_features(memories[-1]), memories[:3], sam_fpn


def _resize_tokens(x: torch.Tensor, size: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Tokens [B, h*w, C] of an h×w map → tokens of the bilinearly resized map [B, h'*w', C]."""
    if tuple(size) == tuple(new):
        return x
    B, _, C = x.shape
    m = x.transpose(1, 2).reshape(B, C, *size)
    m = F.interpolate(m, size=new, mode="bilinear", align_corners=False)
    return m.flatten(2).transpose(1, 2)


class SamFeatureInjector(nn.Module):
    """FrozenSeg's feature injector (``CrossAttentionLayer_MINI``): CLIP memory ← SAM tokens.

    At ``level``: memory and its position encoding are resized to the coarsest CLIP grid, cross-attend
    to the SAM tokens (q = memory + pos, k = sam + sam_pos, v = sam), residual + LayerNorm, resized back;
    the returned position encoding is None (the reference's ``cross_pos=None``). Other levels pass through.
    """

    def __init__(self, dim: int, heads: int, level: int) -> None:
        super().__init__()
        self.level = level
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        for p in self.attn.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, level, memory, pos, size, min_size, *, sam_tokens, sam_pos):
        if level != self.level:
            return memory, pos
        q = _resize_tokens(memory, size, min_size)
        qp = _resize_tokens(pos, size, min_size)
        q = self.norm(q + self.attn(q + qp, sam_tokens + sam_pos, sam_tokens, need_weights=False)[0])
        return _resize_tokens(q, min_size, size), None


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def _split_labels(name: str) -> list[str]:
    """The reference's ``split_labels`` exactly: ``"person, people"`` → ``["person", "people"]``, ``"a ,b"`` →
    ``["a ", "b"]`` (nothing stripped)."""
    return name.replace(", ", ",").split(",")


def _seen_keys(name: str, match: str) -> set[str]:
    """The synonyms of ``name`` compared with the training vocabulary under ``match`` (:data:`SEEN_MATCHES`)."""
    if match == "exact":
        return set(_split_labels(name))
    return {s.lower() for s in _synonyms(name)}


def _synonyms(name: str) -> list[str]:
    """``"person, people"`` → ``["person", "people"]`` (the reference's ``split_labels``, stripped; empty
    synonyms dropped): the names the text classifier embeds."""
    syns = [s.strip() for s in name.replace(", ", ",").split(",") if s.strip()]
    if not syns:
        raise ValueError(f"class name {name!r} holds no name")
    return syns


class FrozenSeg(nn.Module):
    """FrozenSeg model (see the module docstring). Build it with :func:`build_frozenseg`.

    ``forward(images [B, 3, H, W] RGB 0–255, targets=None, classes=None)`` returns a dict:
    ``pred_masks`` [B, Q, H/4, W/4] mask logits, ``pred_logits`` [B, Q, K + 1] in-vocabulary class logits
    (last = void), ``aux_outputs``; with ``targets`` also ``loss`` and ``losses``; in eval mode also
    ``out_vocab_logits`` [B, Q, K + 1] and ``class_scores`` [B, Q, K + 1], the ensemble class
    probabilities (last = void). ``classes`` (list of names, synonyms comma-separated) overrides the
    vocabulary set with :meth:`set_classes` for this call.
    """

    def __init__(self, config: FrozenSegConfig, clip_model: nn.Module, sam, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.clip = CLIPBackbone(clip_model, tokenizer)
        encoder = getattr(sam, "image_encoder", sam)
        self.sam_encoder = encoder
        sam_mean = getattr(sam, "pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1))
        sam_std = getattr(sam, "pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1))
        self.register_buffer("sam_pixel_mean", sam_mean.detach().clone().float().view(3, 1, 1), persistent=False)
        self.register_buffer("sam_pixel_std", sam_std.detach().clone().float().view(3, 1, 1), persistent=False)
        self.register_buffer("clip_pixel_mean", torch.tensor(CLIP_PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("clip_pixel_std", torch.tensor(CLIP_PIXEL_STD).view(3, 1, 1), persistent=False)
        self.sam_size = int(encoder.img_size)
        sam_channels = self._sam_channels(encoder)
        for p in [*self.clip.parameters(), *self.sam_encoder.parameters()]:
            p.requires_grad_(False)

        c, E, D = config, self.clip.embed_dim, config.hidden_dim
        self.pixel_decoder = PixelDecoder(self.clip.channels, sam_channels, D, c.pixel_decoder_layers,
                                          c.num_heads, c.pixel_decoder_ffn)
        self.decoder = PMPDecoder(
            D, E, hidden_dim=D, num_queries=c.queries, num_layers=c.layers, num_heads=c.num_heads,
            ffn_dim=c.ffn_dim, text_xattn=c.pmp, mask_dim=D, num_levels=3, project_mask_features=False,
            class_dim=E, score_head=False, mask_pool_proj=True,
        )
        self.feature_injector = SamFeatureInjector(D, c.num_heads, c.sam_feature_fuse_level)
        self.sam_query_proj = nn.Linear(sam_channels, D) if sam_channels != D else nn.Identity()
        self.void_embedding = nn.Embedding(1, E)
        self.classes: list[str] = []
        self.register_buffer("_text_classifier", torch.zeros(0, E), persistent=False)
        self._num_synonyms: list[int] = []
        self._train_synonyms = {s for n in c.train_classes for s in _seen_keys(n, c.seen_match)}
        self.train()

    @staticmethod
    def _sam_channels(encoder) -> int:
        neck = getattr(encoder, "neck", None)
        convs = [m for m in neck.modules() if isinstance(m, nn.Conv2d)] if neck is not None else []
        if not convs:
            raise ValueError(f"expected a segment_anything ImageEncoderViT (with a conv neck), got {type(encoder).__name__}")
        return int(convs[-1].out_channels)

    def train(self, mode: bool = True) -> "FrozenSeg":
        """Train the heads; the frozen backbones always stay in eval mode (no drop-path, fixed norms)."""
        super().train(mode)
        self.clip.eval()
        self.sam_encoder.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without the frozen backbones (what training changes)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_FROZEN_PREFIXES)}

    # --- vocabulary ------------------------------------------------------------------------------
    @torch.no_grad()
    def text_classifier(self, classes: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """CLIP text classifier of ``classes``: unit rows [S, E] (one per synonym, templates averaged), synonyms per class."""
        if isinstance(classes, str) or not classes:
            raise ValueError(f"classes must be a non-empty list of class names, got {classes!r}")
        templates = TEMPLATES[self.config.templates]
        syns = [_synonyms(str(n)) for n in classes]
        flat = [s for group in syns for s in group]
        prompts = [t.format(s) for s in flat for t in templates]
        emb = F.normalize(self.clip.encode_text(prompts).float(), dim=-1)
        emb = F.normalize(emb.reshape(len(flat), len(templates), -1).mean(1), dim=-1)
        return emb, [len(g) for g in syns]

    def set_classes(self, classes: Sequence[str]) -> None:
        """Set the open vocabulary (class names; ``"a, b"`` = synonyms) used when ``forward`` gets no ``classes``."""
        emb, nsyn = self.text_classifier(classes)
        self._text_classifier = emb.to(self.void_embedding.weight.device)
        self._num_synonyms = nsyn
        self.classes = [str(c) for c in classes]

    def seen_mask(self, classes: Sequence[str]) -> torch.Tensor:
        """bool [K]: classes sharing a synonym with ``config.train_classes`` (they get α, the others β), compared
        as ``config.seen_match`` says (``exact``: the reference's strings, unstripped, case-sensitive)."""
        match = self.config.seen_match
        return torch.tensor([bool(_seen_keys(str(n), match) & self._train_synonyms) for n in classes],
                            dtype=torch.bool)

    def _vocabulary(self, classes):
        if classes is None:
            if not self.classes:
                raise ValueError("no classes: call set_classes(names) or pass classes=[...]")
            return self.classes, self._text_classifier, self._num_synonyms
        emb, nsyn = self.text_classifier(classes)
        return list(classes), emb.to(self.void_embedding.weight.device), nsyn

    # --- forward ---------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor [B, 3, H, W] (RGB, 0-255), got {shape}")
        H, W = images.shape[-2:]
        if H % 32 or W % 32:
            raise ValueError(f"image height and width must be multiples of 32 (the CLIP stride), got {H}x{W}")

    def forward(self, images: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]] | None = None,
                classes: Sequence[str] | None = None) -> dict[str, Any]:
        self._check_images(images)
        names, classifier, nsyn = self._vocabulary(classes)
        images = images.float()
        clip_in = (images - self.clip_pixel_mean) / self.clip_pixel_std
        sam_in = (images - self.sam_pixel_mean) / self.sam_pixel_std
        if tuple(sam_in.shape[-2:]) != (self.sam_size, self.sam_size):
            sam_in = F.interpolate(sam_in, size=(self.sam_size, self.sam_size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            feats = self.clip.features(clip_in)
            sam_neck = self.sam_encoder(sam_in)
            if isinstance(sam_neck, (tuple, list)):  # the reference's patched encoder returns (neck, interm)
                sam_neck = sam_neck[0]
        mask_features, memories, sam_fpn = self.pixel_decoder(feats, sam_neck)

        B = images.shape[0]
        hs, ws = memories[0].shape[-2:]
        sam_fpn = F.interpolate(sam_fpn, size=(hs, ws), mode="bilinear", align_corners=False) \
            if sam_fpn.shape[-2:] != (hs, ws) else sam_fpn
        sam_tokens = sam_fpn.flatten(2).transpose(1, 2) + self.decoder.level_embed.weight[0]
        sam_pos = sine_position_embedding(hs, ws, sam_tokens.shape[-1], images.device, sam_tokens.dtype)[None]
        fuse_level = self.config.sam_query_fuse_level

        def query_injector(level, pred_masks):
            if level != fuse_level:
                return None
            return self.sam_query_proj(mask_pool(sam_neck, pred_masks))

        full = torch.cat([classifier, F.normalize(self.void_embedding.weight, dim=-1)], dim=0)
        text = classifier[None].expand(B, -1, -1) if self.config.pmp else None
        out = self.decoder(
            mask_features, text, None, memories=memories, classifier=full, num_synonyms=nsyn,
            feature_injector=partial(self.feature_injector, sam_tokens=sam_tokens, sam_pos=sam_pos),
            query_injector=query_injector,
        )
        out["classes"] = names
        if targets is not None:
            c = self.config
            out["loss"], out["losses"] = set_criterion(
                out, targets, class_weight=c.class_weight, mask_weight=c.mask_weight, dice_weight=c.dice_weight,
                no_object_weight=c.no_object_weight, deep_supervision=c.deep_supervision, resolution="prediction",
            )
        if not self.training:
            out.update(self._ensemble(out, feats["clip_vis_dense"], full, nsyn, names))
        return out

    @torch.no_grad()
    def _ensemble(self, out, dense, classifier, nsyn, names) -> dict[str, torch.Tensor]:
        """Out-of-vocabulary CLIP logits of each mask and the in/out geometric ensemble (module docstring, 6)."""
        masks = F.interpolate(out["pred_masks"], size=dense.shape[-2:], mode="bilinear", align_corners=False)
        pooled = self.clip.visual_prediction(mask_pool(dense, masks))
        out_logits = classification_logits(pooled.float(), classifier, self.clip.logit_scale, nsyn)
        in_logits = out["pred_logits"]
        in_lp = in_logits[..., :-1].log_softmax(-1)
        out_lp = out_logits[..., :-1].log_softmax(-1)
        alpha = torch.full_like(in_lp[..., :1], self.config.alpha)
        beta = torch.full_like(in_lp[..., :1], self.config.beta)
        if self.config.ensemble_on_valid_mask:
            valid = ((masks > 0).flatten(2).sum(-1) > 0).to(in_lp.dtype)[..., None]
            alpha, beta = alpha * valid, beta * valid
        seen = self.seen_mask(names).to(in_lp.device)
        seen_lp = (1 - alpha) * in_lp + alpha * out_lp
        unseen_lp = (1 - beta) * in_lp + beta * out_lp
        cls = torch.where(seen, seen_lp, unseen_lp)
        void = in_logits.softmax(-1)[..., -1:]
        scores = torch.cat([cls.softmax(-1) * (1 - void), void], dim=-1)
        return {"out_vocab_logits": out_logits, "class_scores": scores}

    @staticmethod
    def semantic_segmentation(out: dict[str, Any], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-class scores [B, K, H, W] = Σ_q class_scores[q, k] · sigmoid(mask_q) (Mask2Former semantic inference)."""
        if "class_scores" not in out:
            raise ValueError("semantic_segmentation needs eval-mode outputs (class_scores); call model.eval() first")
        masks = out["pred_masks"]
        if size is not None:
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        return torch.einsum("bqk,bqhw->bkhw", out["class_scores"][..., :-1], masks.sigmoid())

    # --- save / load -----------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``frozenseg.json`` (config) and the trained weights (safetensors; backbones excluded)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            f.write(self.config.to_json())
        save_file({k: v.detach().contiguous() for k, v in self.trainable_state_dict().items()},
                  os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, clip_model=None, sam=None, tokenizer=None) -> "FrozenSeg":
        """Rebuild from :meth:`save_pretrained` output; backbones from the objects given or the config's paths."""
        from safetensors.torch import load_file

        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(path)!r}: not a FrozenSeg save directory")
        with open(file) as f:
            config = FrozenSegConfig.from_json(f.read())
        model = build_frozenseg(config, clip_model=clip_model, sam=sam, tokenizer=tokenizer)
        state = load_file(os.path.join(path, WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(_FROZEN_PREFIXES)]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the model: missing {missing}, unexpected {unexpected}")
        return model


def build_frozenseg(config: FrozenSegConfig | None = None, clip_model: nn.Module | None = None, sam=None,
                    tokenizer=None) -> FrozenSeg:
    """Build :class:`FrozenSeg` from loaded backbones, or from the local paths in ``config``.

    ``clip_model``: an open_clip model (else ``open_clip.create_model(config.clip,
    pretrained=config.clip_pretrained)``, a local file); ``sam``: a segment_anything ``Sam`` or its image
    encoder (else ``vlmkit.seg.sam.load_sam(config.sam_checkpoint, config.sam)``); ``tokenizer``: the
    CLIP tokenizer (else ``open_clip.get_tokenizer(config.clip)``). Nothing is downloaded.
    """
    config = config or FrozenSegConfig()
    if clip_model is None:
        import open_clip

        path = config.clip_pretrained
        if not path or not os.path.isfile(path):
            raise ValueError(f"FrozenSegConfig.clip_pretrained must be a local weights file when no clip_model is "
                             f"given, got {path!r}")
        clip_model = open_clip.create_model(config.clip, pretrained=path)
    if sam is None:
        from vlmkit.seg.sam import load_sam

        if not config.sam_checkpoint:
            raise ValueError("FrozenSegConfig.sam_checkpoint must be a local SAM state dict when no sam is given, got None")
        sam = load_sam(config.sam_checkpoint, config.sam)
    if tokenizer is None:
        import open_clip

        tokenizer = open_clip.get_tokenizer(config.clip)
    clip_model = clip_model.eval()
    return FrozenSeg(config, clip_model, sam, tokenizer)
