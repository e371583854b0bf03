"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025):
training-free pre-LLM compression into *dominant* tokens (the vision tower's CLS attention) and *contextual*
tokens (the remaining tokens merged into a few targets by key similarity).

Reference: ``dvlab-research/VisionZip@3151f6df4fca36a4cd1c985e5956e725b1f9ad02``, ``visionzip/clip_encoder.py:43-85``
(the selection and merge), ``visionzip/utils.py:10-89,122-124,186-201`` (the patched CLIP attention that stores
the key-mean metric of the flagged layer 22 of 24), ``visionzip/main.py:5-28``, ``README.md:127-128`` (budgets:
64 = 54 dominant + 10 contextual), ``visionzip/llava_arch.py:31-35``.

What the reference does, and what vlmkit does the same way:

- Layer: ``attentions[-2]`` / ``hidden_states[-2]`` of CLIP-L, the layer whose output LLaVA-1.5 uses as features;
  here ``Family.feature_layer_index`` (LLaVA ``vision_feature_layer=-2`` → the same layer; InternVL -1 → the
  last). Its attention is recomputed by a pre-hook with ``Family.vision_qk`` in float32 (the tower keeps SDPA).
- Dominant: CLS→patch attention of that layer, **summed over heads**, top-k; kept tokens are returned in original
  order.
- Contextual, from the remaining tokens in original order: metric = mean over heads of the layer's raw keys (no
  1/√d scaling), L2-normalised; targets = remaining positions ``arange(0, M, step)[:C]`` with
  ``step = max(1, M // C)``; every other remaining token is assigned to the target of highest dot product
  (``argmax``: ties → first target); ``contextual_i = hidden[target_i] + sum(hidden[assigned]) / max(count, 1)``
  (added to the target, not averaged with it).
- Merge space (the brief's option (a), faithful): the reference merges the **pre-projector** hidden states and
  projects the result. vlmkit records the projector's input (``Family.on_projector_input``), merges there, and
  projects each contextual token through the model's own projector (``Family.project_tokens``; capability
  ``token_projector``: the projector acts on each token alone, as LLaVA's MLP and InternVL's ``mlp1`` do).
  Dominant tokens and targets that received no token keep the model's own projected embedding (equal to
  projecting their features), so ``keep_ratio=1`` is the identity. The merge runs in float32 and is cast to
  the projector input's dtype before projecting.

Choices the reference leaves open or that vlmkit's setting forces:

- CLS: the reference keeps the CLS token as one of the D dominant tokens (``dominant_num = D - 1`` patches +
  CLS). In vlmkit the language model sees patch tokens only (the families' ``'default'`` feature strategy drops
  CLS; there is no placeholder slot for it), so all D dominant tokens are patches: the CLS slot goes to the next
  patch by attention. The total D + C per image is unchanged.
- Order: the reference feeds ``[dominant (original order), contextual (target order)]``; vlmkit keeps every token
  at its grid position (a contextual token sits at its target's position), so the run is in original order.
- Budget: ``keep_ratio`` / ``num_keep`` give the total K = D + C per image (``PruneStage`` rule:
  ``max(1, floor(G·keep_ratio))`` grid tokens). ``C = min(floor(K · contextual_ratio + 1e-9), K - 1)``
  (at least one dominant token), ``D = K - C``; ``contextual_ratio`` defaults to 10/64 = 0.15625, the README's
  54 + 10 split of 64 (it gives 20 of 128, 30 of 192, 90 of 576).
- Scope: the reference works per tower tile (its LLaVA-NeXT path prunes each tile, then restores the kept tokens
  on the grid); vlmkit selects per *image* over the grid tokens of all its tiles (InternVL tiles; LLaVA-NeXT base
  tile + cropped AnyRes grid, whose tokens take the attention / key / feature of their tower patch through
  ``VisualTokens.source``); contextual targets are spaced over that image's remaining tokens in run order.
  Image-newline tokens are always kept and not counted.
- InternVL (one token = pixel-shuffled 2×2 patch block): attention of a token = sum over its patches; its key
  metric = its patches' head-mean keys concatenated (the same layout as its pixel-shuffled feature); the merged
  hidden state is the shuffled block feature, the projector's input.
- Towers without CLS (SigLIP, Qwen2.5-VL) are refused (capability ``vision_cls``), as for VisPruner.
- Ties: dominant selection sorts stably (equal attention → lower index).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import register_stage
from ..tokens import VisualTokens
from . import PruneConfig
from .vispruner import ClsAttentionPruner


@dataclasses.dataclass
class VisionZipConfig(PruneConfig):
    """VisionZip: keep ``keep_ratio`` (or ``num_keep``) tokens per image, of which ``contextual_ratio`` (rounded
    down, at least one dominant) are merged contextual tokens and the rest dominant tokens by CLS attention."""

    type = "visionzip"
    display_name = "VisionZip"
    requires = ("patch_grid", "vision_cls", "token_projector")
    contextual_ratio: float = 10 / 64

    def validate(self) -> None:
        super().validate()
        r = self.contextual_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
            raise ValueError(f"contextual_ratio must be a number in [0, 1), got {r!r}")

    def split(self, num_keep: int) -> tuple[int, int]:
        """(dominant, contextual) counts of a total of ``num_keep`` tokens."""
        contextual = min(math.floor(num_keep * float(self.contextual_ratio) + 1e-9), num_keep - 1)
        return num_keep - contextual, contextual


def visionzip_select(cls_attn: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int):
    """VisionZip's selection: cls_attn [G] (head-summed CLS attention), metric [G, c] (head-mean keys) ->
    ``(dominant_idx [D], targets [C], assign [G - D - C], others [G - D - C])``: increasing dominant indices,
    the contextual targets (increasing), and for every other remaining token (``others``, increasing) the
    position in ``targets`` it merges into. All indices are into the G tokens."""
    G = int(cls_attn.numel())
    if metric.shape[0] != G or cls_attn.dim() != 1:
        raise ValueError(f"cls_attn must be [G] and metric [G, c], got {tuple(cls_attn.shape)} and {tuple(metric.shape)}")
    if dominant < 1 or contextual < 0 or dominant + contextual > G:
        raise ValueError(f"need dominant >= 1, contextual >= 0 and dominant + contextual <= {G}, "
                         f"got {dominant} + {contextual}")
    order = torch.sort(cls_attn.detach().float(), descending=True, stable=True).indices
    dom = order[:dominant].sort().values
    is_dom = torch.zeros(G, dtype=torch.bool, device=cls_attn.device)
    is_dom[dom] = True
    remaining = torch.nonzero(~is_dom).flatten()
    empty = remaining[:0]
    if contextual == 0:
        return dom, empty, empty, empty
    M = int(remaining.numel())
    step = max(1, M // contextual)
    local = torch.arange(0, M, step, device=remaining.device)[:contextual]
    is_target = torch.zeros(M, dtype=torch.bool, device=remaining.device)
    is_target[local] = True
    targets, others = remaining[is_target], remaining[~is_target]
    x = torch.nn.functional.normalize(metric.detach().float(), dim=-1)
    assign = torch.argmax(x[others] @ x[targets].T, dim=1) if others.numel() else empty
    return dom, targets, assign, others


def visionzip_merge(hidden: torch.Tensor, targets: torch.Tensor, assign: torch.Tensor, others: torch.Tensor):
    """``(merged [C, c'], counts [C])``: ``hidden[target] + mean(hidden of the tokens assigned to it)`` in float32
    (the mean is 0 for a target nobody joined)."""
    h = hidden.float()
    C = int(targets.numel())
    sums = torch.zeros(C, h.shape[1], dtype=h.dtype, device=h.device).index_add(0, assign, h[others])
    counts = torch.bincount(assign, minlength=C)
    return h[targets] + sums / counts.clamp(min=1).unsqueeze(1).to(h.dtype), counts


@register_stage(VisionZipConfig)
class VisionZip(ClsAttentionPruner):
    """Pre-LLM dominant + contextual tokens, merged before the projector (training-free)."""

    record_keys = True

    def compress(self, tokens: list[VisualTokens]) -> list[VisualTokens]:
        family = self._context[1] if self._context is not None else None
        images = list(self.gather(tokens))  # everything recorded is read before projecting below
        out = []
        for t, grid, v in images:
            attn = v["attn"].sum(dim=-1)  # sum over heads
            D, C = self.config.split(self.config.num_to_keep(int(grid.numel())))
            dom, targets, assign, others = visionzip_select(attn, v["keys"], D, C)
            t = self.with_scores(t, grid, attn)
            if others.numel():
                merged, counts = visionzip_merge(v["feats"], targets, assign, others)
                joined = counts > 0
                projected = family.project_tokens(merged[joined].to(v["feats"].dtype)).to(t.embeds.dtype)
                t = dataclasses.replace(t, embeds=t.embeds.index_put((grid[targets[joined]],), projected))
            out.append(t.keep_with_newlines(grid[torch.cat([dom, targets])]))
        return out
