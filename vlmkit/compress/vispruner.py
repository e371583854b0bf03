"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", ICCV 2025): training-free pre-LLM pruning that keeps *important* tokens (the vision tower's CLS attention)
and *diverse* tokens (iterative duplicate removal among the rest); kept tokens keep their original order.

Reference: ``Theia-4869/VisPruner@aefa01adc7c7ce6334e880c88225e90cede760d1``, ``llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``, lines 141-186, and the boolean ``index_mask`` selection, 202-212) and
``llava/model/multimodal_encoder/clip_encoder.py:36-74`` (CLS→patch attention of the select layer).

What the reference does, and what vlmkit does the same way:

- Important tokens: ``attn = attentions[select_layer][:, :, 0, 1:]`` (the CLS query's row, CLS key dropped, no
  renormalisation), **mean over heads**; the first ``T_imp = int(T · r)`` of a descending sort are kept
  (T = tokens kept per image, r = ``important_ratio``, default 0.5; ``int`` truncates exactly as the reference:
  no epsilon).
- Diverse tokens (``T_div = T - T_imp``) from the residual list, which starts in *descending-attention order*:
  features L2-normalised; while ``R - T_div > 0``: ``a, b`` = the residual list's even / odd positions, score of
  ``a_i`` = ``max_j cos(a_i, b_j)``, drop the ``min(8, R - T_div)`` a-tokens with the highest score, the new
  residual list is ``[a kept (in descending-score order, as the reference's argsort leaves them), b]``.
  Result: exactly T tokens (CLS never among them), returned in original order (the reference's boolean mask).
- Features for the cosine: the **pre-projector** features (``image_features`` before ``mm_projector``, i.e. the
  select layer's hidden states without CLS). vlmkit records them as the input of the family's projector
  (``Family.on_projector_input``): for LLaVA(-NeXT) the select layer's patch features, for InternVL the
  pixel-shuffled 2×2 patch blocks ([4C], what ``mlp1`` receives). The selection is applied to the projected
  tokens (``VisualTokens``), as the reference applies its mask after the projector.
- Attention layer: the layer whose *output* the model uses as features (``Family.feature_layer_index``; LLaVA's
  ``vision_feature_layer=-2`` → ``attentions[-2]``, the reference's select layer), recomputed by a pre-hook on
  its attention module with ``Family.vision_qk`` in float32 (the tower keeps its own SDPA attention), as FoPru.

Choices the reference leaves open or that vlmkit's setting forces:

- Ties (the reference's ``argsort`` is not stable): every sort here is stable, so equal attention goes to the
  lower token index and equal duplicate scores keep the a-token earlier in the residual list.
- Odd residual length R: the reference only ever runs with R even (its ``expand(-1, R // 2 - r)`` fails
  otherwise); here ``a`` = even positions (⌈R/2⌉ tokens), ``b`` = odd positions, and the number dropped per
  round is ``min(8, R - T_div, ⌈R/2⌉)`` (the last cap never binds where the reference runs). ``T_div = 0``
  drops the whole residual list.
- Budget: ``keep_ratio`` / ``num_keep`` as every ``PruneStage`` (``max(1, floor(G·r))`` grid tokens per image).
  The reference prunes each tower tile to T; vlmkit prunes per *image*, over the grid tokens of all its tiles
  together (InternVL tiles; LLaVA-NeXT base tile + cropped AnyRes grid, whose tokens get the attention / feature
  of their tower patch through ``VisualTokens.source``; image-newline tokens are always kept, never counted).
- InternVL (one token = a pixel-shuffled 2×2 patch block): a token's attention is the **sum** of its patches'
  CLS attention (as FoPru); its feature is the shuffled block, the projector's input.
- Towers without a CLS token (SigLIP: SmolVLM / Idefics3 / LLaVA-OneVision; Qwen2.5-VL) are **refused**: the
  stage requires the family capability ``vision_cls``. The CLS query is the method's "visual cue"; substituting
  another score (e.g. FoPru's mean attention received) would be a different method, so none is guessed.
- ``requires`` also ``token_projector`` (the projector's input is one feature row per visual token), for the
  features above.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from . import PruneConfig, PruneStage, same_size_groups
from ..config import register_stage
from ..tokens import VisualTokens

#: at most this many duplicates are dropped per matching round (the reference's constant)
DEDUP_STEP = 8


@dataclasses.dataclass
class VisPrunerConfig(PruneConfig):
    """VisPruner: keep ``keep_ratio`` (or ``num_keep``) tokens per image, ``int(T·important_ratio)`` of them by the
    vision tower's CLS attention and the rest by iterative duplicate removal."""

    type = "vispruner"
    display_name = "VisPruner"
    requires = ("patch_grid", "vision_cls", "token_projector")
    important_ratio: float = 0.5

    def validate(self) -> None:
        super().validate()
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"important_ratio must be a number in [0, 1], got {r!r}")


def vispruner_select(cls_attn: torch.Tensor, features: torch.Tensor, num_keep: int,
                     important_ratio: float = 0.5) -> torch.Tensor:
    """VisPruner's selection: cls_attn [G] (CLS attention of each token), features [G, D] (pre-projector) ->
    LongTensor [num_keep] of increasing indices (see the module docstring for the rule and its tie-breaking); or
    cls_attn [B, G], features [B, G, D] (B images of G tokens) -> [B, num_keep], each row what its image alone
    gives (normalisation and cosine products per image, so the values are the same; one round loop for all B)."""
    batched = cls_attn.dim() == 2
    if cls_attn.dim() not in (1, 2) or features.dim() != cls_attn.dim() + 1 \
            or features.shape[:-1] != cls_attn.shape:
        raise ValueError(f"cls_attn must be [G] and features [G, D] (or [B, G] and [B, G, D]), got shapes "
                         f"{tuple(cls_attn.shape)} and {tuple(features.shape)}")
    attn, feats = (cls_attn, features) if batched else (cls_attn[None], features[None])
    B, G = attn.shape
    if not 1 <= num_keep <= G:
        raise ValueError(f"num_keep must be in 1..{G}, got {num_keep}")
    if not 0.0 <= float(important_ratio) <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio!r}")
    n_imp = int(num_keep * important_ratio)
    n_div = num_keep - n_imp
    order = torch.sort(attn.detach().float(), dim=-1, descending=True, stable=True).indices  # [B, G]
    important, residual = order[:, :n_imp], order[:, n_imp:]
    if n_div == 0:
        residual = residual[:, :0]
    # per image, as alone: a batched norm or product may round differently (cuBLAS blocks a batch differently)
    x = torch.stack([torch.nn.functional.normalize(f.detach().float(), dim=-1) for f in feats])  # [B, G, D]
    rows = lambda idx: x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))  # x[b, idx[b]]
    while residual.shape[1] - n_div > 0:
        R = residual.shape[1]
        a, b = residual[:, 0::2], residual[:, 1::2]  # b is not empty: R >= n_div + 1 >= 2
        drop = min(DEDUP_STEP, R - n_div, a.shape[1])
        xa, xb = rows(a), rows(b)
        dup = torch.stack([xa[i] @ xb[i].T for i in range(B)]).amax(dim=-1)  # highest cosine of each a to any b
        distinct = torch.sort(dup, dim=-1, descending=True, stable=True).indices[:, drop:]
        residual = torch.cat([a.gather(1, distinct), b], dim=1)
    kept = torch.cat([important, residual], dim=1).sort(dim=-1).values
    return kept if batched else kept[0]


# --- recording the tower's CLS attention and the projector's input (shared with VisionZip) ------------------
@torch.no_grad()
def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """CLS query's attention over the patches: q, k [B, H, S, d] (CLS first) -> [B, H, S-1] float32 (CLS key
    dropped after the softmax, no renormalisation)."""
    q0 = q[:, :, :1].float()
    probs = torch.softmax(q0 @ k.float().transpose(-1, -2) * scale, dim=-1)  # [B, H, 1, S]
    return probs[:, :, 0, 1:]


def patches_to_tokens(x: torch.Tensor, patch_grid: tuple[int, int], factor: int) -> torch.Tensor:
    """Patch values [B, P, c] (P = ph·pw, row-major) -> token values [B, (ph/f)·(pw/f), f·f·c]: the f×f block of
    patches of each token, concatenated (rows of the block, then columns)."""
    ph, pw = patch_grid
    B, P, c = x.shape
    if P != ph * pw:
        raise ValueError(f"{P} patch values do not match the {ph}×{pw} patch grid")
    f = factor
    blocks = x.reshape(B, ph // f, f, pw // f, f, c).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(B, (ph // f) * (pw // f), f * f * c)


class ClsAttentionPruner(PruneStage):
    """Base of the pre-LLM pruners that read the CLS attention row of the feature layer and the projector's input
    (VisPruner, VisionZip). Inside ``vision_context`` it records, per tower tile: ``attn`` [tiles, H, n]
    (CLS attention of each visual token per head; a pixel-shuffled token sums its patches), ``keys`` [tiles, n,
    f·f·d] (head-mean keys of that layer, only with ``record_keys``) and ``feats`` [tiles, n, C'] (projector
    input); ``gather`` hands them out per image."""

    record_keys = False

    def __init__(self, config) -> None:
        super().__init__(config)
        self._context: tuple[dict, object] | None = None  # (records, family): lives only inside vision_context

    def attach(self, family) -> None:
        super().attach(family)
        patch_grid, factor = family.patch_pooling(self.config.type)
        layer = family.feature_layer_index
        if layer is None:
            raise ValueError(f"{self.config.type} reads the attention of the layer whose output is the visual "
                             f"features; vision_feature_layer={family.feature_layer!r} is not one layer")
        family.vision_attention(layer)  # fail at wrap() time, not mid-forward
        self._layer, self._patch_grid, self._factor = layer, patch_grid, factor

    @contextlib.contextmanager
    def vision_context(self, family) -> Iterator[None]:
        records: dict[str, list[torch.Tensor]] = {"attn": [], "keys": [], "feats": []}
        P = self._patch_grid[0] * self._patch_grid[1]

        def on_attention(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] != P + 1:
                raise ValueError(f"{self.config.type} needs the tower's CLS token: the scored layer sees "
                                 f"{hidden.shape[1]} tokens for {P} patches")
            with torch.no_grad():
                q, k, scale = family.vision_qk(self._layer, hidden)
                attn = cls_attention(q, k, scale)  # [B, H, P]
                B, nh, _ = attn.shape
                tok = patches_to_tokens(attn.reshape(B * nh, P, 1), self._patch_grid, self._factor)
                records["attn"].append(tok.sum(-1).reshape(B, nh, -1))
                if self.record_keys:
                    keys = k.float().mean(dim=1)[:, 1:]  # [B, P, d]: mean over heads of the raw keys, CLS dropped
                    records["keys"].append(patches_to_tokens(keys, self._patch_grid, self._factor))

        def on_projector(features):
            records["feats"].append(features)

        handles = [family.vision_attention(self._layer).register_forward_pre_hook(on_attention, with_kwargs=True),
                   family.on_projector_input(on_projector)]
        self._context = (records, family)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._context = None

    def gather(self, tokens: list[VisualTokens]) -> Iterator[tuple[VisualTokens, torch.Tensor, dict[str, torch.Tensor]]]:
        """Per image: ``(tokens, grid, values)``: ``grid`` [G] the positions of its grid tokens, ``values`` the
        recorded ``attn`` [G, H], ``feats`` [G, C'] (and ``keys`` [G, c]) of each grid token (through ``source``
        for AnyRes runs)."""
        if self._context is None:
            raise RuntimeError(f"{self.config.type}.compress needs what its vision_context records (use VLMWrapper)")
        records = self._context[0]
        per_tile = self._patch_grid[0] * self._patch_grid[1] // self._factor**2
        names = ("attn", "feats", "keys") if self.record_keys else ("attn", "feats")
        cat = {n: torch.cat(records[n]) if records[n] else torch.empty(0) for n in names}
        cat["attn"] = cat["attn"].transpose(1, 2) if cat["attn"].dim() == 3 else cat["attn"]  # [tiles, n, H]
        sizes = [t.num_uncompressed if t.source is None else int(t.num_sources) for t in tokens]
        for n in names:
            x = cat[n]
            if x.dim() != 3 or x.shape[0] * per_tile != sum(sizes) or x.shape[1] != per_tile:
                raise ValueError(
                    f"{self.config.type} recorded {n} of shape {tuple(x.shape)}, but the images come from "
                    f"{sum(sizes)} tower tokens in tiles of {per_tile}: another stage re-ran the vision tower?")
        start = 0
        for t, size in zip(tokens, sizes):
            if t.num_tokens != t.num_uncompressed:
                raise ValueError(f"{self.config.type} prunes uncompressed images: put it before other compressors")
            tiles = size // per_tile
            grid = t.grid_positions()
            src = grid if t.source is None else t.source[grid]
            values = {}
            for n in names:
                x = cat[n][start:start + tiles].reshape(tiles * per_tile, -1)
                values[n] = x[src.to(x.device)].to(t.embeds.device)
            start += tiles
            yield t, grid, values

    @staticmethod
    def with_scores(t: VisualTokens, grid: torch.Tensor, scores: torch.Tensor) -> VisualTokens:
        """``t`` with ``scores`` [G] of its grid tokens as ``VisualTokens.scores`` (NaN for newlines)."""
        run = torch.full((t.num_tokens,), float("nan"), dtype=torch.float32, device=t.embeds.device)
        run[grid] = scores.float()
        return dataclasses.replace(t, scores=run)


@register_stage(VisPrunerConfig)
class VisPruner(ClsAttentionPruner):
    """Pre-LLM pruning by CLS attention (important) and duplicate removal (diverse); training-free."""

    def compress(self, tokens: list[VisualTokens]) -> list[VisualTokens]:
        images = list(self.gather(tokens))
        out: list[VisualTokens | None] = [None] * len(images)
        for group in same_size_groups([int(grid.numel()) for _, grid, _ in images]):  # one selection loop each
            attn = torch.stack([images[i][2]["attn"].mean(dim=-1) for i in group])  # [n, G]: mean over heads
            feats = torch.stack([images[i][2]["feats"] for i in group])  # [n, G, C']
            k = self.config.num_to_keep(attn.shape[1])
            keep = vispruner_select(attn, feats, k, self.config.important_ratio)
            for i, scores, kept in zip(group, attn, keep):
                t, grid, _ = images[i]
                out[i] = self.with_scores(t, grid, scores).keep_with_newlines(grid[kept])
        return out
