"""PMP: prompt-guided mask proposals, a *reimplementation from the abstract* (arXiv 2412.10292).

Li et al., "Prompt-Guided Mask Proposal for Two-Stage Open-Vocabulary Segmentation", have published no
code. The abstract fixes only this: a query-based (Mask2Former-style)
mask generator whose queries cross-attend to the text-prompt tokens, so that proposals are
prompt-guided "after each decoding" (each decoder layer). Everything else here is our design (not fixed
by the paper; chosen here); every choice is listed below.

This module is the PMP method file; it holds:

- :class:`PMPDecoder`: the Mask2Former-style query decoder with an optional text cross-attention
  sub-layer, usable standalone, as the vlmkit head below, and as FrozenSeg's transformer decoder
  (``vlmkit.seg.frozenseg``, text cross-attention off unless FrozenSeg's ``pmp`` switch is on).
  ``PMPDecoder(in_dim, text_dim)(pixel_feats [B, C, h, w], text_tokens [B, T, Ct], text_mask [B, T])``
  returns ``pred_masks`` [B, Q, h, w] (logits), ``pred_scores`` [B, Q] (proposal logits),
  ``pred_embeds`` [B, Q, D] (query embeddings) and ``aux_outputs`` (one dict per earlier prediction).
- :class:`PMPConfig` / :class:`PMPHead`: the decoder as a vlmkit output head (role ``"head"``) on a
  wrapped VLM: pixel features are the language model's last hidden states at the visual positions,
  scattered back to the visual-token grid; prompt tokens are the hidden states of the text positions.

The loss (:func:`set_criterion`, :func:`hungarian_match`) lives in :mod:`vlmkit.seg.criterion`, shared
with FrozenSeg, and is re-exported here. The decoder stays here: decoder and head are one method
(choices 1-7 and 8-11 below); FrozenSeg imports the decoder from this module.

Design choices (not fixed by the paper's abstract):

1. Host decoder = Mask2Former's (as in FC-CLIP / FrozenSeg): learned query features and query position
   embeddings; per layer masked cross-attention (queries → pixel memory, the attention mask being the
   previous prediction's ``sigmoid < 0.5`` resized to the memory, rows that would block everything
   unblocked) → self-attention → FFN, all post-norm (residual, then LayerNorm), as Mask2Former's default.
   Memories cycle over the given feature levels (``level = layer % num_levels``), each with a sine
   position encoding (DETR/Mask2Former ``PositionEmbeddingSine``, normalised) and a learned level embedding.
2. PMP text cross-attention sub-layer, in every layer **after the FFN and before the prediction heads**,
   so every mask (including the auxiliary-loss ones and the ones that give the next layer its attention
   mask) is prompt-conditioned: ``q = LN(queries + query_pos)``, ``k = v = Proj(text_tokens)``
   (``Proj`` = Linear(text_dim → D) + LayerNorm, applied once per forward), multi-head attention with
   the decoder's head count, residual add, LayerNorm.
3. One extra text cross-attention before the first prediction head (the one made from the learned queries
   alone), so the first attention mask is prompt-guided too: ``num_layers + 1`` text sub-layers in all.
4. Text tokens are token-level (one key per prompt token; padded tokens excluded through
   ``key_padding_mask``, so padding never changes a sample's result). A sample with no valid text
   token gets no text update (the sub-layer is the identity for it, instead of a NaN softmax).
5. ``text_xattn=False`` builds no text sub-layers and ignores ``text_tokens``: a plain Mask2Former decoder
   for ablations.
6. Prediction heads: ``decoder_norm`` (LayerNorm) → ``mask_embed`` MLP (3 layers) · mask features =
   mask logits; ``score_embed`` Linear(D → 1) = proposal score logit (objectness / prompt relevance; the
   abstract names no score, a head needs one to rank proposals); with ``class_dim`` an FC-CLIP class
   head: ``class_embed`` MLP over ``mask_pool_proj(mask-pooled mask features) + decoder output``,
   cosine logits against a text classifier with a learnable ``logit_scale`` (init log(1/0.07), exp
   clamped at 100) and a max over each class's synonyms.
7. Pluggable hooks (for FrozenSeg's SAM injection): ``feature_injector(level, memory, pos, size,
   min_size) -> (memory, pos)`` runs before each layer's masked cross-attention; ``query_injector(level,
   pred_masks) -> pooled [B, Q, mask_dim] | None`` runs after each layer's prediction heads and its
   result, through the shared ``mask_pool_proj``, is added to the queries.

Head on a wrapped VLM (:class:`PMPHead`):

8. Pixel features: hidden states of ``hidden_layer`` (default the last) at the visual positions, written to
   cell ``visual_index % (h*w)`` of the image's grid; cells whose token was pruned by a compressor stay
   zero (they still take part in attention with their position encoding). Multi-tile images
   (InternVL) use the tile ``tile`` (default -1, the last one: InternVL's global thumbnail). One image
   per sample at most (ValueError otherwise); a sample without an image gets an all-zero grid; every
   image in a batch must share one grid size.
9. Prompt tokens: hidden states of the text positions (``attention_mask == 1`` and not visual), in
   sequence order; ``text_positions="prompt"`` keeps only unsupervised positions (``labels == -100``)
   when labels are given, so the answer is not visible to the head during teacher forcing.
10. The head runs in float32 on the embedding's device (hidden states are cast), is built at ``wrap()``
    time (the language model width is read from the input embeddings), and lets gradients flow into the
    language model (LISA-style: LoRA on the language model learns from the mask loss too).
11. Targets: ``forward(..., masks=...)`` with a bool/float tensor [B, H, W] (one object per sample),
    [B, N, H, W], or a list of [H, W] / [N_i, H, W] tensors. All-zero target masks mean "no object"
    and are dropped. The loss is computed at the target resolution (mask logits bilinearly upsampled),
    matched per sample with the Mask2Former costs; proposal scores get a BCE with weight
    ``no_object_weight`` on unmatched proposals. ``outputs.loss`` becomes
    ``lm_loss + loss_weight * mask_loss`` (just the head loss without labels).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import StageConfig, register_stage
from vlmkit.seg.criterion import hungarian_match, set_criterion  # noqa: F401  (re-exported: part of PMP's API)
from vlmkit.stage import HeadStage

__all__ = [
    "PMPConfig", "PMPHead", "PMPDecoder", "TextCrossAttention", "MLP", "sine_position_embedding",
    "mask_pool", "classification_logits", "hungarian_match", "set_criterion", "TEXT_POSITIONS",
]

TEXT_POSITIONS = ("all", "prompt")


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


def sine_position_embedding(h: int, w: int, dim: int, device=None, dtype=torch.float32,
                            temperature: float = 10000.0) -> torch.Tensor:
    """Mask2Former's normalised ``PositionEmbeddingSine`` for an unpadded h×w grid: [h*w, dim] (y half, x half)."""
    if dim % 2:
        raise ValueError(f"sine position embedding needs an even width, got {dim}")
    npf = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32)[None, :].expand(h, w)
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = torch.arange(npf, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=-1).flatten(-2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((py, px), dim=-1).reshape(h * w, dim).to(dtype)


def mask_pool(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Average of features x [B, C, H, W] inside each mask (logits > 0) of masks [B, Q, h, w]: [B, Q, C].

    Masks are resized to x bilinearly and binarised without gradient (FC-CLIP ``MaskPooling``).
    """
    if masks.shape[-2:] != x.shape[-2:]:
        masks = F.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)
    with torch.no_grad():
        m = (masks.detach() > 0).to(x.dtype)
        m = m / (m.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bqhw->bqc", x, m)


def classification_logits(x: torch.Tensor, classifier: torch.Tensor, logit_scale: torch.Tensor,
                          num_synonyms: Sequence[int] | None = None) -> torch.Tensor:
    """Cosine logits of x [B, Q, E] against ``classifier`` [S + 1, E] (unit rows, last = void): [B, Q, K + 1].

    ``num_synonyms`` [K] (sum S) groups classifier rows per class; a class's logit is the max over its
    synonyms (OpenSeg/ODISE max-ensemble, as FC-CLIP's ``get_classification_logits``). None: one row per class.
    """
    x = F.normalize(x, dim=-1)
    logits = torch.clamp(logit_scale.exp(), max=100) * x @ classifier.T
    if num_synonyms is None:
        return logits
    if sum(num_synonyms) != classifier.shape[0] - 1:
        raise ValueError(f"num_synonyms sums to {sum(num_synonyms)} but the classifier has "
                         f"{classifier.shape[0] - 1} rows before the void row")
    if all(n == 1 for n in num_synonyms):
        return logits
    out, start = [], 0
    for n in num_synonyms:
        out.append(logits[..., start:start + n].max(-1).values)
        start += n
    out.append(logits[..., -1])
    return torch.stack(out, dim=-1)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's MLP)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _add(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class _CrossAttention(nn.Module):
    """Post-norm cross-attention: ``LN(tgt + MHA(tgt + query_pos, memory + pos, memory))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, memory, attn_mask=None, pos=None, query_pos=None):
        out = self.attn(_add(tgt, query_pos), _add(memory, pos), memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + out)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, query_pos=None):
        q = _add(tgt, query_pos)
        return self.norm(tgt + self.attn(q, q, tgt, need_weights=False)[0])


class _FFN(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt):
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class TextCrossAttention(nn.Module):
    """PMP's text sub-layer: ``LN(queries + MHA(LN(queries + query_pos), text, text))``.

    ``text`` [B, T, D] (already projected), ``text_mask`` [B, T] bool (True = real token). Padded tokens
    get no attention weight; a sample with no real token is left unchanged.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries, text, text_mask, query_pos=None):
        empty = ~text_mask.any(dim=1)  # [B]
        ignore = ~text_mask
        if bool(empty.any()):
            ignore = ignore & ~empty[:, None]  # attend to the (zero-weighted below) padding instead of NaN
        out = self.attn(self.norm_q(_add(queries, query_pos)), text, text, key_padding_mask=ignore,
                        need_weights=False)[0]
        return torch.where(empty[:, None, None], queries, self.norm(queries + out))


# ------------------------------------------------------------------------------------------------
# Decoder
# ------------------------------------------------------------------------------------------------


class PMPDecoder(nn.Module):
    """Mask2Former-style query decoder with PMP's text cross-attention (see the module docstring).

    Args:
      in_dim: channels of ``pixel_feats`` (and of each ``memories`` level).
      text_dim: width of the text tokens (default ``hidden_dim``); unused with ``text_xattn=False``.
      hidden_dim, num_queries, num_layers, num_heads, ffn_dim: decoder sizes (D, Q, L, heads, FFN width).
      text_xattn: build the PMP text cross-attention (False = plain Mask2Former decoder).
      mask_dim: width of the mask features (default ``hidden_dim``).
      num_levels: number of memory levels ``forward`` gets (1 = ``pixel_feats`` itself is the memory).
      project_mask_features: 1×1 conv ``in_dim → mask_dim`` over ``pixel_feats`` for the mask features
        (False: ``pixel_feats`` already are mask features, ``in_dim == mask_dim``).
      class_dim: width of the class embedding for open-vocabulary classification (None = no class head).
      score_head: predict a proposal score logit per query.
      mask_pool_proj: build ``mask_pool_proj`` (LayerNorm + Linear, mask_dim → D); default: with a class head.
    """

    def __init__(
        self,
        in_dim: int,
        text_dim: int | None = None,
        *,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_layers: int = 9,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        text_xattn: bool = True,
        mask_dim: int | None = None,
        num_levels: int = 1,
        project_mask_features: bool = True,
        class_dim: int | None = None,
        score_head: bool = True,
        mask_pool_proj: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("num_queries", num_queries),
                            ("num_heads", num_heads), ("ffn_dim", ffn_dim), ("num_levels", num_levels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PMPDecoder {name} must be a positive integer, got {value!r}")
        if num_layers < 0:
            raise ValueError(f"PMPDecoder num_layers must be >= 0, got {num_layers}")
        if hidden_dim % num_heads or hidden_dim % 2:
            raise ValueError(f"hidden_dim {hidden_dim} must be even and divisible by num_heads {num_heads}")
        mask_dim = hidden_dim if mask_dim is None else mask_dim
        if not project_mask_features and in_dim != mask_dim:
            raise ValueError(f"project_mask_features=False needs in_dim == mask_dim, got {in_dim} and {mask_dim}")
        self.hidden_dim, self.num_queries, self.num_layers = hidden_dim, num_queries, num_layers
        self.num_heads, self.num_levels, self.mask_dim = num_heads, num_levels, mask_dim
        self.text_xattn = bool(text_xattn)

        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_dim, hidden_dim, 1) if in_dim != hidden_dim else nn.Identity() for _ in range(num_levels)
        )
        self.mask_proj = nn.Conv2d(in_dim, mask_dim, 1) if project_mask_features else nn.Identity()
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.cross_layers = nn.ModuleList(_CrossAttention(hidden_dim, num_heads) for _ in range(num_layers))
        self.self_layers = nn.ModuleList(_SelfAttention(hidden_dim, num_heads) for _ in range(num_layers))
        self.ffn_layers = nn.ModuleList(_FFN(hidden_dim, ffn_dim) for _ in range(num_layers))
        if self.text_xattn:
            text_dim = hidden_dim if text_dim is None else text_dim
            self.text_proj = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.LayerNorm(hidden_dim))
            self.text_layers = nn.ModuleList(TextCrossAttention(hidden_dim, num_heads) for _ in range(num_layers + 1))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.score_embed = nn.Linear(hidden_dim, 1) if score_head else None
        self.class_dim = class_dim
        if mask_pool_proj is None:
            mask_pool_proj = class_dim is not None
        self.mask_pool_proj = (
            nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, hidden_dim)) if mask_pool_proj else None
        )
        if class_dim is not None:
            if self.mask_pool_proj is None:
                raise ValueError("a class head (class_dim) needs mask_pool_proj")
            self.class_embed = MLP(hidden_dim, hidden_dim, class_dim, 3)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Xavier-uniform for the attention / FFN matrices (Mask2Former's ``_reset_parameters``)."""
        layers = [*self.cross_layers, *self.self_layers, *self.ffn_layers, *getattr(self, "text_layers", [])]
        for layer in layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    # --------------------------------------------------------------------------------------------
    def _predict(self, output, mask_features, attn_size, classifier, num_synonyms) -> dict[str, torch.Tensor]:
        dec = self.decoder_norm(output)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(dec), mask_features)
        pred: dict[str, Any] = {"pred_masks": masks, "pred_embeds": dec}
        if self.score_embed is not None:
            pred["pred_scores"] = self.score_embed(dec).squeeze(-1)
        if self.class_dim is not None:
            pooled = self.mask_pool_proj(mask_pool(mask_features, masks))
            cls = self.class_embed(pooled + dec)
            pred["pred_class_embeds"] = cls
            if classifier is not None:
                pred["pred_logits"] = classification_logits(cls, classifier, self.logit_scale, num_synonyms)
        with torch.no_grad():
            m = F.interpolate(masks.detach(), size=attn_size, mode="bilinear", align_corners=False)
            block = m.sigmoid().flatten(2) < 0.5  # [B, Q, N]; True = may not attend
            block[block.all(dim=-1)] = False
            B, Q, N = block.shape
            pred["_attn_mask"] = block[:, None].expand(B, self.num_heads, Q, N).reshape(B * self.num_heads, Q, N)
        return pred

    def forward(
        self,
        pixel_feats: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        *,
        memories: Sequence[torch.Tensor] | None = None,
        classifier: torch.Tensor | None = None,
        num_synonyms: Sequence[int] | None = None,
        feature_injector: Callable | None = None,
        query_injector: Callable | None = None,
    ) -> dict[str, Any]:
        """Decode mask proposals.

        pixel_feats [B, C, h, w]: mask-feature source, and the memory when ``memories`` is None.
        text_tokens [B, T, text_dim], text_mask [B, T] bool (default all True): the prompt (needed when
        ``text_xattn``; ignored otherwise). memories: ``num_levels`` maps [B, C, h_l, w_l] cycled over the
        layers. classifier [S + 1, class_dim] (unit rows, void last) and num_synonyms: class logits.

        Returns ``pred_masks`` [B, Q, h, w] (logits at the mask-feature size), ``pred_embeds`` [B, Q, D],
        ``pred_scores`` [B, Q] (with ``score_head``), ``pred_class_embeds`` [B, Q, E] and
        ``pred_logits`` [B, Q, K + 1] (class head / classifier), ``aux_outputs``: the ``num_layers``
        earlier predictions (same keys), first to last.
        """
        if pixel_feats.dim() != 4:
            raise ValueError(f"pixel_feats must be [B, C, h, w], got shape {tuple(pixel_feats.shape)}")
        B = pixel_feats.shape[0]
        levels = [pixel_feats] if memories is None else list(memories)
        if len(levels) != self.num_levels:
            raise ValueError(f"the decoder was built for {self.num_levels} memory level(s), got {len(levels)}")
        mask_features = self.mask_proj(pixel_feats)
        src, pos, sizes = [], [], []
        for lvl, m in enumerate(levels):
            if m.dim() != 4 or m.shape[0] != B:
                raise ValueError(f"memory level {lvl} must be [B={B}, C, h, w], got shape {tuple(m.shape)}")
            h, w = m.shape[-2:]
            sizes.append((int(h), int(w)))
            src.append(self.input_proj[lvl](m).flatten(2).transpose(1, 2) + self.level_embed.weight[lvl])
            pos.append(sine_position_embedding(h, w, self.hidden_dim, m.device, src[-1].dtype)[None].expand(B, -1, -1))

        text = None
        if self.text_xattn:
            if text_tokens is None:
                raise ValueError("this PMPDecoder has text cross-attention (text_xattn=True): pass text_tokens [B, T, C]")
            if text_tokens.dim() != 3 or text_tokens.shape[0] != B:
                raise ValueError(f"text_tokens must be [B={B}, T, C], got shape {tuple(text_tokens.shape)}")
            if text_mask is None:
                text_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
            if text_mask.shape != text_tokens.shape[:2]:
                raise ValueError(f"text_mask must be [B, T] = {tuple(text_tokens.shape[:2])}, got {tuple(text_mask.shape)}")
            text = self.text_proj(text_tokens.to(src[0].dtype))
            text_mask = text_mask.bool()

        query_pos = self.query_embed.weight[None].expand(B, -1, -1)
        output = self.query_feat.weight[None].expand(B, -1, -1)
        if text is not None:
            output = self.text_layers[0](output, text, text_mask, query_pos)
        preds = [self._predict(output, mask_features, sizes[0], classifier, num_synonyms)]
        for i in range(self.num_layers):
            level = i % self.num_levels
            memory, mpos = src[level], pos[level]
            if feature_injector is not None:
                memory, mpos = feature_injector(level, memory, mpos, sizes[level], sizes[0])
            output = self.cross_layers[i](output, memory, preds[-1]["_attn_mask"], mpos, query_pos)
            output = self.self_layers[i](output, query_pos)
            output = self.ffn_layers[i](output)
            if text is not None:
                output = self.text_layers[i + 1](output, text, text_mask, query_pos)
            pred = self._predict(output, mask_features, sizes[(i + 1) % self.num_levels], classifier, num_synonyms)
            if query_injector is not None:
                pooled = query_injector(level, pred["pred_masks"])
                if pooled is not None:
                    if self.mask_pool_proj is None:
                        raise ValueError("a query_injector needs the decoder's mask_pool_proj (mask_pool_proj=True)")
                    output = output + self.mask_pool_proj(pooled)
            preds.append(pred)
        for p in preds:
            p.pop("_attn_mask")
        out = dict(preds[-1])
        out["aux_outputs"] = preds[:-1]
        return out


# ------------------------------------------------------------------------------------------------
# vlmkit head
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PMPConfig(StageConfig):
    """PMP prompt-guided mask-proposal head on a wrapped VLM (reimplementation from the abstract).

    ``num_queries`` proposals per sample from a ``num_layers``-layer decoder of width ``hidden_dim``;
    ``text_xattn=False`` = plain Mask2Former decoder (ablation). ``hidden_layer``: which
    ``hidden_states`` entry feeds the head; ``text_positions``: ``"all"`` text positions or only the
    ``"prompt"`` (unsupervised) ones; ``tile``: tile of a multi-tile image whose grid is used. Loss
    weights as Mask2Former (score 2, BCE 5, dice 5, no-object 0.1); ``loss_weight`` scales the head
    loss added to the language-model loss.
    """

    type = "pmp"
    requires = ("fixed_grid",)
    images_per_sample = 1
    display_name = "PMP"

    num_queries: int = 16
    hidden_dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 1024
    text_xattn: bool = True
    hidden_layer: int = -1
    text_positions: str = "all"
    tile: int = -1
    score_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    deep_supervision: bool = True
    loss_weight: float = 1.0

    @classmethod
    def example(cls) -> "PMPConfig":
        return cls(num_queries=6, hidden_dim=32, num_layers=3, num_heads=4, ffn_dim=64)

    def validate(self) -> None:
        for name in ("num_queries", "hidden_dim", "num_heads", "ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PMPConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"PMPConfig.num_layers must be an integer >= 0, got {self.num_layers!r}")
        if self.hidden_dim % self.num_heads or self.hidden_dim % 2:
            raise ValueError(f"PMPConfig.hidden_dim {self.hidden_dim} must be even and divisible by num_heads {self.num_heads}")
        if self.text_positions not in TEXT_POSITIONS:
            raise ValueError(f"PMPConfig.text_positions must be one of {list(TEXT_POSITIONS)}, got {self.text_positions!r}")
        if not isinstance(self.text_xattn, bool) or not isinstance(self.deep_supervision, bool):
            raise ValueError(f"PMPConfig.text_xattn / deep_supervision must be true or false, got "
                             f"{self.text_xattn!r} / {self.deep_supervision!r}")
        for name in ("hidden_layer", "tile"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"PMPConfig.{name} must be an integer index, got {getattr(self, name)!r}")
        for name in ("score_weight", "mask_weight", "dice_weight", "loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"PMPConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.no_object_weight <= 1:
            raise ValueError(f"PMPConfig.no_object_weight must be in (0, 1], got {self.no_object_weight}")


def _as_targets(masks: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Head input ``masks`` → one ``{"masks": [N, H, W]}`` per sample (all-zero masks dropped)."""
    if isinstance(masks, torch.Tensor):
        if masks.dim() == 3:
            per = [m[None] for m in masks]
        elif masks.dim() == 4:
            per = list(masks)
        else:
            raise ValueError(f"masks must be [B, H, W] or [B, N, H, W], got shape {tuple(masks.shape)}")
    elif isinstance(masks, (list, tuple)):
        per = []
        for i, m in enumerate(masks):
            m = torch.as_tensor(m)
            if m.dim() not in (2, 3):
                raise ValueError(f"masks[{i}] must be [H, W] or [N, H, W], got shape {tuple(m.shape)}")
            per.append(m[None] if m.dim() == 2 else m)
    else:
        raise TypeError(f"masks must be a tensor or a list of tensors, got {type(masks).__name__}")
    if len(per) != batch_size:
        raise ValueError(f"masks hold {len(per)} sample(s) for a batch of {batch_size}")
    out = []
    for m in per:
        m = m.float()
        keep = m.flatten(1).sum(-1) > 0 if m.shape[0] else torch.zeros(0, dtype=torch.bool)
        out.append({"masks": m[keep]})
    return out


@register_stage(PMPConfig)
class PMPHead(HeadStage):
    """PMP as a vlmkit head: mask proposals from the language model's hidden states (see module docstring).

    ``wrapper(**inputs)`` sets ``outputs["mask_proposals"]`` [B, Q, h, w] (logits on the visual-token
    grid), ``outputs["proposal_scores"]`` [B, Q] (logits) and ``outputs["proposal_embeds"]`` [B, Q, D];
    with ``masks=`` targets also ``outputs["mask_loss"]`` and the combined ``outputs.loss``.
    """

    head_input_names = ("masks",)
    needs_hidden_states = True

    def __init__(self, config: PMPConfig) -> None:
        super().__init__(config)
        self.decoder: PMPDecoder | None = None

    def attach(self, family) -> None:
        emb = family.model.get_input_embeddings()
        width = int(emb.weight.shape[1])
        c = self.config
        self.decoder = PMPDecoder(
            width, width, hidden_dim=c.hidden_dim, num_queries=c.num_queries, num_layers=c.num_layers,
            num_heads=c.num_heads, ffn_dim=c.ffn_dim, text_xattn=c.text_xattn,
        ).to(emb.weight.device)

    # --- inputs from the assembled batch ---------------------------------------------------------
    def pixel_features(self, batch, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, D] → grid features [B, D, h, w]: visual positions scattered to their cells, rest zero."""
        B, L, D = hidden.shape
        grids = {tuple(t.grid) for t in batch.tokens}
        if len(grids) > 1:
            raise ValueError(f"PMP needs one visual-token grid size per batch, got {sorted(grids)}")
        if not grids:
            raise ValueError("PMP needs images: the batch has no visual tokens (pass pixel_values)")
        h, w = grids.pop()
        cells = h * w
        b_idx, l_idx = batch.visual_mask.nonzero(as_tuple=True)
        img = batch.image_id[b_idx, l_idx]
        vidx = batch.visual_index[b_idx, l_idx]
        for b in range(B):
            ids = torch.unique(img[b_idx == b])
            if ids.numel() > 1:
                raise ValueError(f"PMP takes one image per sample; sample {b} holds {ids.numel()} images")
        frames = torch.tensor([t.num_uncompressed // cells for t in batch.tokens], device=vidx.device)
        nf, t = frames[img], self.config.tile
        if bool((nf <= t).any()) if t >= 0 else bool((nf < -t).any()):
            raise ValueError(f"PMPConfig.tile {t} is out of range for images of {sorted(set(frames.tolist()))} tile(s)")
        tile = torch.remainder(torch.full_like(img, t), nf)
        sel = (vidx // cells) == tile
        grid = hidden.new_zeros(B, cells, D)
        grid = grid.index_put((b_idx[sel], (vidx % cells)[sel]), hidden[b_idx[sel], l_idx[sel]])
        return grid.transpose(1, 2).reshape(B, D, h, w)

    def text_tokens(self, batch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, L, D] → (tokens [B, T, D], mask [B, T]): the text positions of each sample, in order."""
        B, L, D = hidden.shape
        sel = (batch.attention_mask != 0) & ~batch.visual_mask
        if self.config.text_positions == "prompt" and batch.labels is not None:
            sel = sel & (batch.labels == -100)
        counts = sel.sum(dim=1)
        T = max(int(counts.max()) if B else 0, 1)
        rank = torch.cumsum(sel.long(), dim=1) - 1
        b_idx, l_idx = sel.nonzero(as_tuple=True)
        tokens = hidden.new_zeros(B, T, D).index_put((b_idx, rank[b_idx, l_idx]), hidden[b_idx, l_idx])
        mask = torch.arange(T, device=hidden.device)[None, :] < counts[:, None]
        return tokens, mask

    def propose(self, batch, hidden_states: Sequence[torch.Tensor]) -> dict[str, Any]:
        """Run the decoder on an assembled batch and the language model's ``hidden_states``."""
        if self.decoder is None:
            raise ValueError("PMPHead is not attached: build it through vlmkit.wrap(model, PMPConfig(...))")
        hidden = hidden_states[self.config.hidden_layer]
        dtype = next(self.decoder.parameters()).dtype
        hidden = hidden.to(dtype)
        pix = self.pixel_features(batch, hidden)
        text, text_mask = self.text_tokens(batch, hidden)
        return self.decoder(pix, text, text_mask)

    def head_forward(self, batch, outputs, masks=None, **_):
        out = self.propose(batch, outputs.hidden_states)
        outputs["mask_proposals"] = out["pred_masks"]
        outputs["proposal_scores"] = out["pred_scores"]
        outputs["proposal_embeds"] = out["pred_embeds"]
        if masks is not None:
            c = self.config
            targets = _as_targets(masks, out["pred_masks"].shape[0])
            loss, parts = set_criterion(
                out, targets, class_weight=c.score_weight, mask_weight=c.mask_weight, dice_weight=c.dice_weight,
                no_object_weight=c.no_object_weight, deep_supervision=c.deep_supervision, resolution="target",
            )
            outputs["mask_loss"] = loss
            lm_loss = outputs.get("loss") if hasattr(outputs, "get") else getattr(outputs, "loss", None)
            outputs["loss"] = c.loss_weight * loss if lm_loss is None else lm_loss + c.loss_weight * loss
        return outputs
