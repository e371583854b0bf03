"""V2PE (Ge et al., arXiv 2412.09616): visual tokens advance the position by δ = stride / tokens_per_tile.

Reference: ``get_rope_pos_id`` in ``OpenGVLab/V2PE`` (``internvl/model/internvl_chat/modeling_internvl_chat.py``
for inference, ``internvl/train/internvl_chat_finetune.py`` for training). Example, ``tokens_per_tile=4``,
``stride=2`` (δ = 1/2), InternVL layout ``a <img> v v v v </img> b``::

    slot      a   <img>  v    v    v    v    </img>  b
    position  0   1      1.5  2    2.5  3    4       5

V2PE needs fine-tuning: on a checkpoint never trained with δ < 1 it degrades accuracy. ``stride ==
tokens_per_tile`` (δ = 1) reproduces ordinary integer positions.

M-RoPE decoders (Qwen2.5-VL …; ``v2pe_mrope_offsets``): the 1-D rule ``prev + j·δ`` is applied on every axis with
j = 1 + the token's own (t, row, col) offset, i.e. offsets map to ``δ·(1 + o) − 1`` from the image's first
position L, and the text after the image resumes at ``L + ceil(δ·max(h, w))`` (the scaled extent; δ = 1: the
model's own positions exactly). Positions follow the *cells*, as the model's own M-RoPE does: a pruned image keeps
its kept cells' positions and its extent. δ is ``stride / tokens_per_tile`` as in 1-D; a dynamic-resolution family's
``tokens_per_tile`` is only an upper bound (Qwen2.5-VL: 16 384), so set ``tokens_per_tile`` for the δ you want.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from fractions import Fraction
from typing import TYPE_CHECKING, Sequence

import torch

from ..config import StageConfig, register_stage
from .rotary import RotaryPositionStage, check_masks, visual_runs

if TYPE_CHECKING:
    from ..families.base import Family
    from ..sequence import AssembledBatch

TRAIN_STRIDES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the reference's v2pe_rnd choices


def _check_stride(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclasses.dataclass
class V2PEConfig(StageConfig):
    """V2PE position scheme.

    stride: positions one full tile spans (δ = stride / tokens_per_tile); the reference evaluates with 64.
    tokens_per_tile: visual tokens of one uncompressed tile; None takes the wrapped family's (LLaVA-1.5: 576,
        InternVL: 256; the reference hard-codes 256).
    train_strides: in training mode one stride per image is drawn uniformly from these, as the reference's
        ``v2pe_rnd`` does (``random.choice`` inside the per-image loop). The draw uses torch's global RNG, so
        ``torch.manual_seed`` / the Trainer seed makes it reproducible and the stage keeps no RNG state.
    """

    type = "v2pe"
    display_name = "V2PE"
    requires = ("rope_positions",)
    stride: float = 64
    tokens_per_tile: int | None = None
    train_strides: tuple[float, ...] = TRAIN_STRIDES

    def validate(self) -> None:
        _check_stride(self.stride, "V2PEConfig.stride")
        if self.tokens_per_tile is not None and (
            isinstance(self.tokens_per_tile, bool) or not isinstance(self.tokens_per_tile, int) or self.tokens_per_tile <= 0
        ):
            raise ValueError(f"V2PEConfig.tokens_per_tile must be None or an int > 0, got {self.tokens_per_tile!r}")
        if isinstance(self.train_strides, (str, bytes)) or not isinstance(self.train_strides, Sequence):
            raise ValueError(f"V2PEConfig.train_strides must be a sequence of numbers > 0, got {self.train_strides!r}")
        self.train_strides = tuple(self.train_strides)  # from_dict gives a list
        if not self.train_strides:
            raise ValueError("V2PEConfig.train_strides must not be empty")
        for s in self.train_strides:
            _check_stride(s, "every V2PEConfig.train_strides entry")


def v2pe_position_ids(
    visual_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    stride: float | Sequence[float],
    tokens_per_tile: int,
    *,
    image_id: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """V2PE positions [B, S] (``dtype``) of ``visual_mask`` [B, S] bool under ``attention_mask`` [B, S].

    Per row, as the reference ``get_rope_pos_id`` (inference): a counter starts at -1; every real text token
    (image markers included) takes counter + 1; the j-th token (j = 1…M) of a visual run takes
    ``L + j·stride/tokens_per_tile``, L being the counter before the run (the position of the token before
    it, or -1 for a run at the start of a row, so δ = 1 still gives 0, 1, 2, …); after the run the counter
    becomes ``ceil(L + M·stride/tokens_per_tile)``. Padded slots get 1.

    ``stride`` is one number, or one per image (indexed by ``image_id`` [B, S] when given, else one per
    visual run in reading order, row-major over the batch). ``image_id`` also separates adjacent images
    (otherwise contiguous visual slots form one run, like the tiles of one image). Positions count the
    tokens present: after compression an image of K kept tokens spans K·δ positions.

    Exactness (differs from the reference on purpose): positions are ``L + (j·stride)/tokens_per_tile`` in
    float64, cast to ``dtype`` at the end, and the ceil is taken on the exact rational value.
    The reference builds them with a float32 ``torch.arange(L, L + δ·(M+1), δ)[1:]`` whose end point is
    rounded to float32: for large L and small strides (e.g. L = 70 000, stride 1, one tile) it yields M − 1
    elements and its own shape assertion fails; here a run always gets its M positions. Wherever the
    reference runs, both give the same float32 values (checked for strides 1…256, L up to 5·10^6). The
    reference also ceils a float32 value; that only matters for runs that are not whole tiles (after
    compression), where float32 can round a fraction onto the integer below for L above ~2^16.
    """
    check_masks(visual_mask, attention_mask, image_id)
    if isinstance(tokens_per_tile, bool) or not isinstance(tokens_per_tile, int) or tokens_per_tile <= 0:
        raise ValueError(f"tokens_per_tile must be an int > 0, got {tokens_per_tile!r}")
    per_image = not isinstance(stride, numbers.Real)
    strides = list(stride) if per_image else [stride]
    for s in strides:
        _check_stride(s, "stride")
    B, S = visual_mask.shape
    out = torch.ones((B, S), dtype=torch.float64, device=visual_mask.device)
    run = 0
    for b, cols, segments in visual_runs(visual_mask, attention_mask, image_id):
        pos = torch.empty(cols.numel(), dtype=torch.float64, device=visual_mask.device)
        counter = -1  # always an integer
        for start, end, key in segments:
            n = end - start
            if key < 0:  # text
                pos[start:end] = torch.arange(counter + 1, counter + 1 + n, dtype=torch.float64, device=pos.device)
                counter += n
                continue
            if per_image:
                i = key if image_id is not None else run
                if i >= len(strides):
                    what = f"image {i}" if image_id is not None else f"visual run {i}"
                    raise ValueError(f"{len(strides)} strides given but {what} needs one")
                s = strides[i]
            else:
                s = strides[0]
            run += 1
            j = torch.arange(1, n + 1, dtype=torch.float64, device=pos.device)
            pos[start:end] = counter + (j * float(s)) / tokens_per_tile
            counter = counter + math.ceil(Fraction(s) * n / tokens_per_tile)
        out[b, cols] = pos
    if per_image and image_id is None and run != len(strides):
        raise ValueError(f"{len(strides)} strides given for {run} visual runs")
    return out.to(dtype)


def v2pe_mrope_offsets(offsets: torch.Tensor, stride: float, tokens_per_tile: int) -> torch.Tensor:
    """V2PE under M-RoPE: an image's own offsets [3, N] (t, row, col from its first position L) → float64 [3, N]
    ``(1 + o)·stride / tokens_per_tile − 1`` (exact for δ = 1: o itself). Example, δ = 1/2, a 2×3 image after text
    at position 4 (L = 5; the family resumes the text at ``ceil(max height/width position) + 1``)::

        cell (row, col)   (0,0)          (0,2)          (1,2)          text after
        (t, h, w)         (4.5,4.5,4.5)  (4.5,4.5,5.5)  (4.5,5.0,5.5)  (7, 7, 7)
    """
    _check_stride(stride, "stride")
    o = offsets.to(torch.float64)
    return ((1 + o) * float(stride)) / tokens_per_tile - 1


def draw_train_strides(num_images: int, train_strides: Sequence[float], generator: torch.Generator | None = None) -> list:
    """One stride per image drawn uniformly from ``train_strides`` (torch RNG; ``generator`` or the global one)."""
    picks = torch.randint(len(train_strides), (num_images,), generator=generator)
    return [train_strides[int(i)] for i in picks]


@register_stage(V2PEConfig)
class V2PE(RotaryPositionStage):
    """V2PE position stage: fixed ``stride`` in eval mode, one drawn stride per image in training mode."""

    def __init__(self, config: V2PEConfig) -> None:
        super().__init__(config)
        self.tokens_per_tile: int | None = config.tokens_per_tile

    def attach(self, family: "Family") -> None:
        super().attach(family)
        if self.config.tokens_per_tile is None:
            self.tokens_per_tile = int(family.tokens_per_tile)

    def detach(self, family: "Family") -> None:
        super().detach(family)
        self.tokens_per_tile = self.config.tokens_per_tile

    def strides(self, batch: "AssembledBatch", training: bool | None = None):
        """The stride(s) for ``batch``: the config's in eval mode, one per image drawn in training mode."""
        if self.is_training() if training is None else training:
            return draw_train_strides(len(batch.tokens), self.config.train_strides)
        return self.config.stride

    def mrope_layout(self, batch: "AssembledBatch", training: bool | None = None):
        if self.tokens_per_tile is None:
            raise RuntimeError("V2PE stage used before attach(): wrap the model with vlmkit.wrap")
        strides = self.strides(batch, training)
        per_image = not isinstance(strides, numbers.Real)

        def layout(image: int, offsets: torch.Tensor) -> torch.Tensor:
            return v2pe_mrope_offsets(offsets, strides[image] if per_image else strides, self.tokens_per_tile)

        return layout

    def rope_positions(self, batch: "AssembledBatch", training: bool | None = None) -> torch.Tensor:
        if self.tokens_per_tile is None:
            raise RuntimeError("V2PE stage used before attach(): wrap the model with vlmkit.wrap")
        return v2pe_position_ids(
            batch.visual_mask, batch.attention_mask, self.strides(batch, training), self.tokens_per_tile,
            image_id=batch.image_id, dtype=torch.float64,
        )
