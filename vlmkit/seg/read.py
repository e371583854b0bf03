"""READ / LISA: a ``[SEG]`` token whose hidden state prompts segment-anything.

LISA (Lai et al., arXiv 2308.00692; ``dvlab-research/LISA`` @ 3cb2d43 ``model/LISA.py``): ``[SEG]`` is added
to the vocabulary; the language model's last hidden state (after the final norm, ``hidden_states[-1]``) at the
position *preceding* each ``[SEG]`` goes through ``text_hidden_fcs`` (Linear(d, d) → ReLU → Linear(d, c) →
Dropout(0), c = the prompt dim of the SAM in use, 256 for the released SAMs) and is handed to SAM as an extra
sparse prompt token; SAM's mask decoder turns it into a mask at the original image size. READ (Qian et al.,
arXiv 2412.17741; ``rui-qian/READ`` @ 2549240 ``model/READ.py``) adds Similarity-as-Points: the raw dot
product between the ``[SEG]`` state (before ``text_hidden_fcs``) and the image tokens' states gives a map over
the vision grid whose extreme cells become SAM point prompts. ``READConfig(points=0)`` is plain LISA.

Training (``VLMWrapper.forward(..., sam_images=[...], masks=[...])``): the combined loss is
``ce_weight·CE + bce_weight·BCE + dice_weight·DICE`` (LISA: 1, 2, 0.5), with LISA's per-mask pixel-mean
BCE and its DICE with ``scale=1000``, both averaged over all masks of the batch. SAM's image encoder and
prompt encoder are frozen; the mask decoder and ``text_hidden_fcs`` are this stage's parameters (trained
when a recipe lists ``read``; the only weights ``save_pretrained`` writes). Inference:
``vlmkit.Predictor(wrapped, processor).segment(images, prompts)`` generates, then gives one mask per
``[SEG]`` in the generated text (none when there is no ``[SEG]``), at the original image size: READ is a
``TokenMaskHead`` (``mask_token_id``, ``masks_from_states``) and the Predictor drives it.

Conventions and choices (those the reference does not fix are marked [choice]):

- Shift: as LISA's ``seg_token_mask = input_ids[:, 1:] == seg_id``, the state used for a ``[SEG]`` at
  position q is the one at q - 1, i.e. the state that *predicts* ``[SEG]`` (:func:`seg_token_mask`). In
  training every ``[SEG]`` of the sequence counts (as LISA); in ``Predictor.segment`` only generated ones do.
- Image tokens are located through the ``AssembledBatch`` bookkeeping (``visual_mask`` / ``image_id`` /
  ``visual_index``), not ``<im_start> + 1``, so the map is right after any compressor: a kept token goes
  to its own grid cell. [choice] The image used for a ``[SEG]`` is the last image before it in its
  sample; for an image of several tiles, its last tile (InternVL's global thumbnail).
- [choice] Pruned cells have no similarity. Before downsampling they are filled with the smallest
  similarity of the kept cells (so they can only pull a cell's value down, never make it positive);
  downsampled cells with no kept source cell at all are set to -1 after normalisation, READ's value for
  padding, so they are never chosen as points (neither positive nor negative). Min-max normalisation uses
  the cells with kept tokens only.
- [choice] Flat map: when the downsampled map is constant (max - min <= 1e-6·max(1, |max|, |min|); the
  reference divides by zero and its point conversion then fails), no points are selected and SAM gets the
  LISA prompt (the ``[SEG]`` embedding alone).
- Point selection follows READ's ``similarity_map_to_points`` (``model/READ.py``): bilinear downsampling by
  ``down_sample``, min-max, padding the map with -1 to the image's aspect ratio (``grid_view=
  "center_crop"``: the grid covers the centred crop the CLIP processor feeds the tower; ``"full"``: the
  grid covers the whole, squashed image, e.g. InternVL's resize), positives (>= ``pos_thresh``, by value
  descending), negatives (in [0, ``neg_thresh``], ascending), then neutral cells (label -1, index order),
  the first ``points`` of that list. Cell (r, c) → pixel (int(min((c+.5)·W/w', W-1)), int(min((r+.5)·H/h',
  H-1))). [choice] Ties keep index order (stable sort); the map is generalised to non-square grids.
- Padding rounding (``pad_rule``). READ pads each side by ``(int(S · t / m) - t) // 2`` cells (t the grid
  side, m = min(H, W), S the side's length), in floating point: for 84 of the sides m in 1..2048 (47, 94,
  147, 188, ...) ``int(m · (t / m))`` is t - 1, the padding is -1, and ``F.pad`` *crops* one cell from each
  end of the short side: a 94×141 image gives READ a 10×18 map (the 12×12 grid minus its first and last
  rows, padded to 18 columns) where the map should be 12×18. [choice] The default ``"clamp"`` pads by
  ``max(0, ...)`` (12×18: no similarity cell lost); ``"reference"`` reproduces READ's crop.
- ``continuous_points`` (default on, as READ): each point moves to the mean of the pixel grid weighted by
  ``exp(-distance²)·softmax(full-resolution map)``, which makes the coordinates differentiable with
  respect to the hidden states. [choice] The full-resolution map is the min-max normalised grid resized
  bilinearly straight onto the covered image region and zero-padded outside it (READ goes through a
  336² intermediate).
- SAM prompt: points (+ the padding point SAM's prompt encoder appends without a box) then the projected
  ``[SEG]`` embedding: ``[p_1..p_P, pad, seg]`` for READ, ``[seg]`` for LISA; dense = ``no_mask_embed``;
  ``multimask_output=False``; predicted mask = logits > 0.
- [choice] ``Predictor.segment`` runs ``generate`` and then one teacher-forced pass over prompt + generated
  tokens (up to the first end-of-sequence, re-assembled right-padded) to get the hidden states (the training
  computation), rather than collecting them step by step from ``generate``; the masks therefore equal what
  ``forward`` produces on the same text.
- [choice] SAM stays outside the module tree except for its mask decoder (registered here as
  ``mask_decoder``): the frozen encoders are foreign weights that ``save_pretrained`` must not copy and a
  recipe must not unfreeze. They are kept in float32 on the mask decoder's device. ``sam="tiny"`` without
  a checkpoint builds ``vlmkit.seg.sam.tiny_sam(seed=0)`` (tests, demos); any other SAM needs
  ``sam_checkpoint`` (a local state dict, ``load_sam``).
- [choice] ``mask_bce_loss`` / ``mask_dice_loss`` in the outputs are unweighted; ``loss`` is the weighted sum.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import StageConfig, register_stage
from vlmkit.stage import AddsTokens, TokenMaskHead

__all__ = [
    "SEG_TOKEN", "SAM_TYPES", "GRID_VIEWS", "PAD_RULES", "SHORT_QUESTION_LIST", "LONG_QUESTION_LIST", "ANSWER_LIST",
    "EVAL_QUESTION", "READConfig", "READ", "PointPrompt", "seg_token_mask", "similarity_grid", "select_points",
    "continuous_coords", "sigmoid_ce_loss", "dice_loss", "mask_losses",
]

SEG_TOKEN = "[SEG]"
SAM_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")
GRID_VIEWS = ("center_crop", "full")
#: Padding rules of the similarity map (see the module docstring): ``clamp`` (never crop) or READ's ``reference``.
PAD_RULES = ("clamp", "reference")

#: LISA's training questions (``utils/utils.py``) without the image marker; ``{class_name}`` / ``{sent}``.
SHORT_QUESTION_LIST = [
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
]
LONG_QUESTION_LIST = [
    "{sent} Please respond with segmentation mask.",
    "{sent} Please output segmentation mask.",
]
#: LISA's answers; each holds one ``[SEG]``.
ANSWER_LIST = [
    "It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG].",
]
#: LISA's referring-segmentation validation prompt (``ValDataset``).
EVAL_QUESTION = "What is {sent} in this image? Please output segmentation mask."


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _number(name: str, value: Any, lo: float, hi: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value > hi):
        accepted = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be a number in {accepted}, got {value!r}")


def _integer(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        accepted = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int in {accepted}, got {value!r}")


@dataclasses.dataclass
class READConfig(StageConfig):
    """``[SEG]``-token segmentation head (LISA), with READ's Similarity-as-Points when ``points > 0``.

    ``sam``: SAM architecture (``vit_h`` as LISA/READ, ``vit_l``, ``vit_b``, ``tiny`` for tests);
    ``sam_checkpoint``: local SAM state dict (required except for ``tiny``). ``points``: at most this many
    point prompts from the similarity map (READ-7B 30; 0 = LISA, no points). ``pos_thresh`` /
    ``neg_thresh``: normalised-similarity thresholds of positive / negative points (0.8 / 0.2).
    ``down_sample``: factor the similarity grid is bilinearly downsampled by before selection (READ-7B 2,
    13B 1). ``continuous_points``: READ's differentiable sub-pixel refinement of the points.
    ``grid_view``: what part of the image the vision grid covers (``center_crop`` as CLIP-336 in READ;
    ``full`` for towers that squash the image). ``pad_rule``: ``"clamp"`` (default) or ``"reference"`` (READ's
    float rounding, which crops a cell from each end of the short side for some image sizes; see the module
    docstring). ``token``: the added token. ``ce_weight`` /
    ``bce_weight`` / ``dice_weight``: loss weights (LISA 1 / 2 / 0.5; READ-7B's README recipe uses dice 4);
    ``dice_scale``: LISA's DICE scale (1000).
    """

    type = "read"
    display_name = "READ"

    sam: str = "vit_h"
    sam_checkpoint: str | None = None
    points: int = 30
    pos_thresh: float = 0.8
    neg_thresh: float = 0.2
    down_sample: int = 2
    continuous_points: bool = True
    grid_view: str = "center_crop"
    pad_rule: str = "clamp"
    token: str = SEG_TOKEN
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    dice_scale: float = 1000.0

    @classmethod
    def example(cls) -> "READConfig":
        """READ on the tiny random SAM (``sam="tiny"``: no checkpoint to load)."""
        return cls(sam="tiny", down_sample=1)

    def validate(self) -> None:
        if self.sam not in SAM_TYPES:
            raise ValueError(f"sam must be one of {list(SAM_TYPES)}, got {self.sam!r}")
        if self.sam_checkpoint is not None and not isinstance(self.sam_checkpoint, str):
            raise ValueError(f"sam_checkpoint must be a path string or None, got {self.sam_checkpoint!r}")
        _integer("points", self.points, 0, 1024)
        _number("pos_thresh", self.pos_thresh, 0.0, 1.0)
        _number("neg_thresh", self.neg_thresh, 0.0, 1.0)
        if not self.neg_thresh < self.pos_thresh:
            raise ValueError(f"neg_thresh must be below pos_thresh, got neg_thresh={self.neg_thresh!r}, "
                             f"pos_thresh={self.pos_thresh!r}")
        _integer("down_sample", self.down_sample, 1, 64)
        if not isinstance(self.continuous_points, bool):
            raise ValueError(f"continuous_points must be a bool, got {self.continuous_points!r}")
        if self.grid_view not in GRID_VIEWS:
            raise ValueError(f"grid_view must be one of {list(GRID_VIEWS)}, got {self.grid_view!r}")
        if self.pad_rule not in PAD_RULES:
            raise ValueError(f"pad_rule must be one of {list(PAD_RULES)}, got {self.pad_rule!r}")
        if not isinstance(self.token, str) or not self.token or self.token != self.token.strip() or " " in self.token:
            raise ValueError(f"token must be a non-empty string without spaces, got {self.token!r}")
        for name in ("ce_weight", "bce_weight", "dice_weight"):
            _number(name, getattr(self, name), 0.0)
        _number("dice_scale", self.dice_scale, 1e-12)


# ---------------------------------------------------------------------------------------------
# [SEG] positions and the similarity map
# ---------------------------------------------------------------------------------------------


def seg_token_mask(input_ids: torch.Tensor, seg_id: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, L]: True at position p when ``input_ids[b, p + 1]`` is ``[SEG]`` (LISA's
    ``input_ids[:, 1:] == seg_id`` shift: the state used is the one that predicts ``[SEG]``).

    A ``[SEG]`` under ``attention_mask == 0`` does not count.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    out = torch.zeros_like(input_ids, dtype=torch.bool)
    nxt = input_ids[:, 1:] == seg_id
    if attention_mask is not None:
        nxt = nxt & (attention_mask[:, 1:] != 0)
    out[:, :-1] = nxt
    return out


def similarity_grid(
    seg_hidden: torch.Tensor, image_hidden: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """READ's similarity map: raw dot products ``<h_img_k, h_seg>`` (no normalisation, not cosine)
    scattered onto the image grid.

    ``seg_hidden`` [D]; ``image_hidden`` [K, D] states of the image's kept tokens; ``cells`` [K] their
    row-major cells in the uncompressed ``grid`` (h, w). Returns float32 [h, w] with NaN at cells that
    have no token (pruned); differentiable with respect to both states.
    """
    h, w = grid
    if image_hidden.dim() != 2 or cells.shape != (image_hidden.shape[0],):
        raise ValueError(f"image_hidden must be [K, D] and cells [K], got {tuple(image_hidden.shape)} and "
                         f"{tuple(cells.shape)}")
    cells = cells.to(device=image_hidden.device, dtype=torch.long)
    if cells.numel() and (int(cells.min()) < 0 or int(cells.max()) >= h * w):
        raise ValueError(f"cells must lie in [0, {h * w}) for grid {grid}, got range "
                         f"[{int(cells.min())}, {int(cells.max())}]")
    sims = image_hidden.float() @ seg_hidden.float()
    out = torch.full((h * w,), float("nan"), dtype=torch.float32, device=image_hidden.device)
    return out.index_put((cells,), sims).reshape(h, w)


@dataclasses.dataclass(eq=False)
class PointPrompt:
    """READ's point prompt for one ``[SEG]``: ``coords`` float32 [P, 2] (x, y) pixels of the original image,
    ``labels`` int64 [P] (1 positive, 0 negative, -1 neutral), ``score_map`` [h', w']: the downsampled,
    normalised map padded to the image's aspect ratio (-1 = never a point), or None for a flat map."""

    coords: torch.Tensor
    labels: torch.Tensor
    score_map: torch.Tensor | None = None

    @property
    def num_points(self) -> int:
        return int(self.labels.numel())


def _view_region(height: int, width: int, grid: tuple[int, int], view: str) -> tuple[float, float, float, float]:
    """(top, left, rh, rw): the image region (pixels) the grid covers."""
    if view == "full":
        return 0.0, 0.0, float(height), float(width)
    gh, gw = grid
    if height * gw <= width * gh:  # the crop spans the full height (for a square grid: side min(H, W), exactly)
        rh, rw = float(height), gw * height / gh
    else:
        rh, rw = gh * width / gw, float(width)
    return (height - rh) / 2, (width - rw) / 2, rh, rw


def _flat(lo: torch.Tensor, hi: torch.Tensor) -> bool:
    lo_f, hi_f = float(lo.detach()), float(hi.detach())
    return hi_f - lo_f <= 1e-6 * max(1.0, abs(lo_f), abs(hi_f))


def continuous_coords(
    sim: torch.Tensor, coords: torch.Tensor, image_size: tuple[int, int], grid_view: str = "center_crop"
) -> torch.Tensor:
    """READ's ``Discrete_to_Continuous``: each point → the mean pixel position weighted by
    ``exp(-‖pixel - point‖²) · softmax(full-resolution map)``.

    ``sim`` float [h, w] similarity grid (NaN = no token: filled with the minimum); ``coords`` [P, 2] (x, y)
    pixels. The full-resolution map is the min-max normalised grid resized bilinearly onto the covered
    image region and zero-padded outside. Returns float32 [P, 2], differentiable with respect to ``sim``.
    """
    H, W = int(image_size[0]), int(image_size[1])
    if coords.numel() == 0:
        return coords.to(torch.float32)
    valid = ~torch.isnan(sim)
    if not bool(valid.any()):
        return coords.to(torch.float32)
    lo, hi = sim[valid].min(), sim[valid].max()
    if _flat(lo, hi):
        return coords.to(torch.float32)
    norm = (torch.where(valid, sim, lo) - lo) / (hi - lo)
    top, left, rh, rw = _view_region(H, W, tuple(sim.shape), grid_view)
    t, lft = int(round(top)), int(round(left))
    rh_i, rw_i = max(1, min(H - t, int(round(rh)))), max(1, min(W - lft, int(round(rw))))
    region = F.interpolate(norm[None, None], (rh_i, rw_i), mode="bilinear", align_corners=False)[0, 0]
    full = F.pad(region, (lft, W - lft - rw_i, t, H - t - rh_i), value=0.0)
    prob = torch.softmax(full.reshape(-1), dim=0).reshape(H, W)
    c = coords.to(device=sim.device, dtype=torch.float32)
    gx = torch.arange(W, device=sim.device, dtype=torch.float32)
    gy = torch.arange(H, device=sim.device, dtype=torch.float32)
    wx = torch.exp(-(gx[None, :] - c[:, :1]) ** 2)  # [P, W]; exp(-(dx² + dy²)) factorises
    wy = torch.exp(-(gy[None, :] - c[:, 1:]) ** 2)  # [P, H]
    den = torch.einsum("ph,hw,pw->p", wy, prob, wx)
    x = torch.einsum("ph,hw,pw->p", wy, prob, wx * gx) / den
    y = torch.einsum("ph,hw,pw->p", wy * gy, prob, wx) / den
    return torch.stack([x, y], dim=-1)


def select_points(
    sim: torch.Tensor,
    image_size: tuple[int, int],
    *,
    num_points: int = 30,
    pos_thresh: float = 0.8,
    neg_thresh: float = 0.2,
    down_sample: int = 2,
    grid_view: str = "center_crop",
    continuous: bool = False,
    pad_rule: str = "clamp",
) -> PointPrompt:
    """READ's ``similarity_map_to_points`` on a similarity grid ``sim`` float [h, w] (NaN = pruned cell).

    Returns the first ``num_points`` of [positives by value descending, negatives ascending, neutral
    cells], each mapped to the pixel under its cell centre of the padded map (see the module docstring).
    ``continuous`` applies :func:`continuous_coords`. ``pad_rule``: ``"clamp"`` pads by ``max(0, (new - t) //
    2)``; ``"reference"`` keeps READ's negative padding (a crop) where float rounding gives ``new = t - 1``.
    """
    if pad_rule not in PAD_RULES:
        raise ValueError(f"pad_rule must be one of {list(PAD_RULES)}, got {pad_rule!r}")
    if sim.dim() != 2:
        raise ValueError(f"sim must be a 2-D grid [h, w], got shape {tuple(sim.shape)}")
    H, W = int(image_size[0]), int(image_size[1])
    if H < 1 or W < 1:
        raise ValueError(f"image_size must be positive (H, W), got {image_size!r}")
    empty = PointPrompt(torch.zeros((0, 2), dtype=torch.float32), torch.zeros((0,), dtype=torch.long))
    sim = sim.float()
    valid = ~torch.isnan(sim)
    if num_points == 0 or not bool(valid.any()):
        return empty
    with torch.no_grad():  # selection is discrete; only continuous_coords carries gradients
        lo_all = sim[valid].min()
        filled = torch.where(valid, sim, lo_all)
        h, w = sim.shape
        size = (max(1, h // down_sample), max(1, w // down_sample))
        if size != (h, w):
            small = F.interpolate(filled[None, None], size, mode="bilinear", align_corners=False)[0, 0]
            small_valid = F.interpolate(valid.float()[None, None], size, mode="bilinear", align_corners=False)[0, 0] > 0
        else:
            small, small_valid = filled, valid
        lo, hi = small[small_valid].min(), small[small_valid].max()
        if _flat(lo, hi):
            return empty
        norm = torch.where(small_valid, (small - lo) / (hi - lo), torch.full_like(small, -1.0))
        hd, wd = norm.shape
        _, _, rh, rw = _view_region(H, W, (hd, wd), grid_view)
        new_h, new_w = int(H * (hd / rh)), int(W * (wd / rw))  # READ: int(H · target / min(H, W))
        pad_h, pad_w = (new_h - hd) // 2, (new_w - wd) // 2
        if pad_rule == "clamp":
            pad_h, pad_w = max(0, pad_h), max(0, pad_w)
        padded = F.pad(norm, (pad_w, pad_w, pad_h, pad_h), value=-1.0)
        hp, wp = padded.shape
        flat = padded.reshape(-1)
        pos = torch.nonzero(flat >= pos_thresh).flatten()
        pos = pos[torch.argsort(-flat[pos], stable=True)]
        neg = torch.nonzero((flat >= 0) & (flat <= neg_thresh)).flatten()
        neg = neg[torch.argsort(flat[neg], stable=True)]
        neutral = torch.nonzero((flat > neg_thresh) & (flat < pos_thresh)).flatten()
        chosen = torch.cat([pos, neg, neutral])[:num_points]
        labels = torch.cat([
            torch.ones_like(pos), torch.zeros_like(neg), torch.full_like(neutral, -1)
        ])[:num_points].to(torch.long)
        rows, cols = (chosen // wp).double(), (chosen % wp).double()
        x = torch.clamp((cols + 0.5) * (W / wp), max=W - 1).floor()
        y = torch.clamp((rows + 0.5) * (H / hp), max=H - 1).floor()
        coords = torch.stack([x, y], dim=-1).to(torch.float32)
    if continuous:
        coords = continuous_coords(sim, coords.to(sim.device), (H, W), grid_view)
    return PointPrompt(coords=coords, labels=labels.cpu(), score_map=padded)


# ---------------------------------------------------------------------------------------------
# Losses (LISA ``model/LISA.py``)
# ---------------------------------------------------------------------------------------------


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask pixel-mean binary cross-entropy with logits: [N, H, W] × [N, H, W] → [N]."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return loss.flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """LISA's per-mask DICE loss ``1 - (2·Σ(p/s·t) + eps) / (Σp/s + Σt/s + eps)``, p = sigmoid(logits),
    s = ``scale`` (LISA's 1000): [N, H, W] × [N, H, W] → [N]."""
    p = logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    numerator = 2 * (p / scale * t).sum(-1)
    denominator = (p / scale).sum(-1) + (t / scale).sum(-1)
    return 1 - (numerator + eps) / (denominator + eps)


def mask_losses(
    logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], scale: float = 1000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, DICE) averaged over every mask of the batch, as LISA: ``Σ_masks loss / (n_masks + 1e-8)``.

    ``logits`` / ``targets``: one [n_b, H_b, W_b] tensor per sample (sizes may differ between samples).
    """
    bce, dice, n = [], [], 0
    for lg, tg in zip(logits, targets):
        if lg.shape != tg.shape:
            raise ValueError(f"mask logits {tuple(lg.shape)} and targets {tuple(tg.shape)} differ")
        if lg.shape[0] == 0:
            continue
        bce.append(sigmoid_ce_loss(lg, tg).sum())
        dice.append(dice_loss(lg, tg, scale).sum())
        n += lg.shape[0]
    if not n:
        zero = next((lg.sum() * 0.0 for lg in logits), torch.zeros(()))
        return zero, zero
    return torch.stack(bce).sum() / (n + 1e-8), torch.stack(dice).sum() / (n + 1e-8)


# ---------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------


def _image_size(image: Any) -> tuple[int, int]:
    from vlmkit.seg.sam import rgb_array

    return tuple(rgb_array(image).shape[:2])  # type: ignore[return-value]


@register_stage(READConfig)
class READ(AddsTokens, TokenMaskHead):
    """The ``[SEG]`` head. Parameters: ``text_hidden_fcs`` and SAM's ``mask_decoder`` (built in ``attach``).

    A ``TokenMaskHead``: ``vlmkit.Predictor(wrapped, processor).segment(images, prompts)`` generates and
    turns the state before each generated ``[SEG]`` (``mask_token_id``) into a mask (``masks_from_states``).

    ``forward`` inputs: ``sam_images`` (one PIL / uint8 [H, W, 3] image per sample; None for a sample
    without ``[SEG]``) and, for training, ``masks`` (one [n_b, H, W] tensor per sample, one mask per ``[SEG]``
    in that sample, in order; None for a sample without ``[SEG]``). Outputs
    gain ``mask_logits`` (one float32 [n_b, H, W] per sample) and, with ``masks``, the combined ``loss``
    plus ``ce_loss`` / ``mask_bce_loss`` / ``mask_dice_loss``.
    """

    head_input_names = ("sam_images", "masks")  # needs_hidden_states: set by TokenMaskHead

    def __init__(self, config: READConfig, sam: Any = None) -> None:
        super().__init__(config)
        self.__dict__["_sam"] = sam  # frozen parts live outside the module tree (module docstring)
        self.seg_token_id: int | None = None
        self.text_hidden_fcs: nn.ModuleList | None = None
        self.mask_decoder: nn.Module | None = None

    # --- set-up ---------------------------------------------------------------------------------
    def _load_sam(self):
        from vlmkit.seg.sam import load_sam, tiny_sam

        path = self.config.sam_checkpoint
        if path is None:
            if self.config.sam != "tiny":
                raise ValueError(f"READConfig(sam={self.config.sam!r}) needs sam_checkpoint=<path to a local SAM "
                                 "state dict> (e.g. sam_vit_h_4b8939.pth); only sam='tiny' builds one without a file")
            return tiny_sam(seed=0)
        if not os.path.isfile(path):
            raise ValueError(f"sam_checkpoint {path!r} is not a file")
        return load_sam(path, self.config.sam)

    def attach(self, family) -> None:
        if self.text_hidden_fcs is not None:
            return  # already set up (a stage object is attached once)
        sam = self.__dict__["_sam"]
        if sam is None:
            sam = self._load_sam()
        embeddings = family.model.get_input_embeddings()
        device, dtype = embeddings.weight.device, embeddings.weight.dtype
        sam = sam.to(device=device, dtype=torch.float32).eval()
        for part in (sam.image_encoder, sam.prompt_encoder):
            part.requires_grad_(False)
        self.__dict__["_sam"] = sam
        d, c = int(embeddings.embedding_dim), int(sam.prompt_encoder.embed_dim)
        self.text_hidden_fcs = nn.ModuleList([nn.Sequential(
            nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, c), nn.Dropout(0.0),
        )]).to(device=device, dtype=dtype)
        self.mask_decoder = sam.mask_decoder  # the trained part of SAM (same object as sam.mask_decoder)
        self.mask_decoder.requires_grad_(True)

    def new_tokens(self) -> list[str]:
        return [self.config.token]

    def bind_tokens(self, ids: dict[str, int]) -> None:
        self.seg_token_id = int(ids[self.config.token])

    @property
    def sam(self):
        """The SAM in use; its frozen encoders follow the mask decoder's device (in float32)."""
        sam = self.__dict__["_sam"]
        if sam is None or self.mask_decoder is None:
            raise ValueError("the READ head is not attached to a model yet: build it with vlmkit.wrap(model, "
                             "READConfig(...), tokenizer=tokenizer)")
        device = next(self.mask_decoder.parameters()).device
        if sam.pixel_mean.device != device:
            for part in (sam.image_encoder, sam.prompt_encoder):
                part.to(device)
            sam.pixel_mean = sam.pixel_mean.to(device)
            sam.pixel_std = sam.pixel_std.to(device)
        return sam

    @property
    def mask_token_id(self) -> int:
        """Vocabulary id of ``[SEG]`` (``TokenMaskHead``); ValueError before ``wrap`` added the token."""
        if self.seg_token_id is None:
            raise ValueError(f"the {self.config.token} token has no id: wrap with vlmkit.wrap(model, READConfig(...), "
                             "tokenizer=tokenizer)")
        return self.seg_token_id

    # --- masks ----------------------------------------------------------------------------------
    def _image_tokens(self, batch, b: int, p: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Positions [K] and grid cells [K] of the image tokens the ``[SEG]`` predicted at ``p`` of row
        ``b`` looks at (the last image before it; its last tile), and the grid."""
        L = batch.input_ids.shape[1]
        before = batch.visual_mask[b] & (torch.arange(L, device=batch.visual_mask.device) <= p)
        if not bool(before.any()):
            raise ValueError(f"sample {b}: a [SEG] at position {p + 1} has no image before it; READ's "
                             "similarity map needs the image tokens (or use READConfig(points=0), plain LISA)")
        img = int(batch.image_id[b][before][-1])
        tokens = batch.tokens[img]
        h, w = tokens.grid
        sel = batch.image_id[b] == img
        index = batch.visual_index[b][sel]
        positions = torch.nonzero(sel).flatten()
        last_frame = tokens.num_uncompressed // (h * w) - 1
        keep = index // (h * w) == last_frame
        return positions[keep], index[keep] % (h * w), (h, w)

    def point_prompt(self, batch, hidden: torch.Tensor, b: int, p: int, image_size: tuple[int, int]) -> PointPrompt:
        """READ's point prompt for the ``[SEG]`` predicted at position ``p`` of row ``b`` (``hidden`` [B, L, D])."""
        positions, cells, grid = self._image_tokens(batch, b, p)
        sim = similarity_grid(hidden[b, p], hidden[b, positions], cells, grid)
        c = self.config
        return select_points(sim, image_size, num_points=c.points, pos_thresh=c.pos_thresh, neg_thresh=c.neg_thresh,
                             down_sample=c.down_sample, grid_view=c.grid_view, continuous=c.continuous_points,
                             pad_rule=c.pad_rule)

    def mask_logits(
        self, batch, hidden: torch.Tensor, positions: Sequence[Sequence[int]], sam_images: Sequence[Any],
    ) -> tuple[list[torch.Tensor], list[list[PointPrompt | None]]]:
        """Mask logits for the ``[SEG]`` states at ``positions[b]`` (the predicting positions, see
        :func:`seg_token_mask`) of each row: one float32 [n_b, H_b, W_b] per sample at its image's original
        size, and the point prompts used (None for LISA)."""
        from vlmkit.seg.sam import embed_images, postprocess_masks, preprocess_image, prompt_sam, transform_coords

        if len(sam_images) != hidden.shape[0]:
            raise ValueError(f"sam_images holds {len(sam_images)} image(s) for a batch of {hidden.shape[0]} samples; "
                             "give one image per sample")
        sam = self.sam
        fcs = self.text_hidden_fcs[0]
        out, prompts = [], []
        for b, pos in enumerate(positions):
            pos = [int(p) for p in pos]
            if not pos:
                H, W = (0, 0) if sam_images[b] is None else _image_size(sam_images[b])
                out.append(torch.zeros((0, H, W), dtype=torch.float32, device=hidden.device))
                prompts.append([])
                continue
            if sam_images[b] is None:
                raise ValueError(f"sample {b} has {len(pos)} [SEG] token(s) but no SAM image (sam_images[{b}] is None)")
            inp = preprocess_image(sam, sam_images[b])
            embedding = embed_images(sam, [inp])
            states = hidden[b, pos]  # [n, D]
            seg_embeds = fcs(states.to(fcs[0].weight.dtype)).float()  # [n, c]
            logits, used = [], []
            for k, p in enumerate(pos):
                prompt = self.point_prompt(batch, hidden, b, p, inp.original_size) if self.config.points else None
                coords = labels = None
                if prompt is not None and prompt.num_points:
                    coords = transform_coords(prompt.coords, inp.original_size, sam.image_encoder.img_size)
                    coords = coords.to(embedding.device)[None]
                    labels = prompt.labels.to(embedding.device)[None]
                low, _ = prompt_sam(sam, embedding, point_coords=coords, point_labels=labels,
                                    extra_sparse=seg_embeds[k].view(1, 1, -1).to(embedding.device))
                logits.append(postprocess_masks(sam, low, inp.input_size, inp.original_size)[0, 0])
                used.append(prompt)
            out.append(torch.stack(logits))
            prompts.append(used)
        return out, prompts

    # --- training -------------------------------------------------------------------------------
    def head_forward(self, batch, outputs, sam_images=None, masks=None, **_):
        """Add ``mask_logits`` (and, with ``masks``, the combined loss) to the language model's ``outputs``."""
        if sam_images is None:
            if masks is not None:
                raise ValueError("READ: masks were given without sam_images (one image per sample for SAM)")
            return outputs
        hidden = outputs.hidden_states[-1]
        seg = seg_token_mask(batch.input_ids, self.mask_token_id, batch.attention_mask)
        positions = [torch.nonzero(seg[b]).flatten().tolist() for b in range(seg.shape[0])]
        logits, _ = self.mask_logits(batch, hidden, positions, list(sam_images))
        outputs["mask_logits"] = logits
        if masks is None:
            return outputs
        masks = list(masks)
        if len(masks) != len(logits):
            raise ValueError(f"masks holds {len(masks)} entries for a batch of {len(logits)} samples")
        targets = []
        for b, (m, lg) in enumerate(zip(masks, logits)):
            if m is None and lg.shape[0] == 0:
                targets.append(torch.zeros_like(lg))
                continue
            if m is None:
                raise ValueError(f"sample {b} has {lg.shape[0]} [SEG] token(s) but masks[{b}] is None")
            t = torch.as_tensor(m, device=lg.device)
            if t.dim() == 2:
                t = t[None]
            if t.shape != lg.shape:
                raise ValueError(
                    f"sample {b}: masks must be [n_seg={lg.shape[0]}, H={lg.shape[1]}, W={lg.shape[2]}] (one per "
                    f"[SEG] in the sequence, at the image's size), got {tuple(t.shape)}"
                )
            targets.append(t.float())
        bce, dice = mask_losses(logits, targets, self.config.dice_scale)
        ce = outputs.loss if getattr(outputs, "loss", None) is not None else bce.new_zeros(())
        c = self.config
        outputs["ce_loss"] = ce
        outputs["mask_bce_loss"] = bce
        outputs["mask_dice_loss"] = dice
        outputs["loss"] = c.ce_weight * ce + c.bce_weight * bce + c.dice_weight * dice
        return outputs

    # --- inference (driven by vlmkit.Predictor.segment) ------------------------------------------
    def masks_from_states(self, batch, hidden: torch.Tensor, positions: Sequence[Sequence[int]],
                          images: Sequence[Any]) -> list[torch.Tensor]:
        """``TokenMaskHead``: mask logits, one float32 [n_b, H_b, W_b] per sample at its image's original size,
        from the last hidden states ``hidden`` [B, L, D] at ``positions[b]`` (the states that predict each
        ``[SEG]``) and one image per sample (PIL / uint8 [H, W, 3]; None for a sample without ``[SEG]``)."""
        return self.mask_logits(batch, hidden, positions, list(images))[0]
