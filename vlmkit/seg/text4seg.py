"""Text4Seg output head: generated answers (``"{sentence}\\n<seg>{R-RLE}</seg>"``) → masks at the
original image size, optionally refined with segment-anything (``vlmkit.seg.sam``).

The text codec (R-RLE / I-RLE / uncompressed descriptors, lenient decoding with repair reports,
answer wrapping, mask ↔ grid conversion) lives in :mod:`vlmkit.seg.rrle`, which loads no torch; this
module keeps only the stage: ``Text4SegConfig``, ``Text4SegResult`` and ``Text4Seg``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from vlmkit.config import StageConfig, register_stage
from vlmkit.seg.rrle import (
    DECODE_MODES, FORMATS, GRID_RANGE, DecodedGrid, Repair, _check_size, decode_answer, grid_to_mask,
)
from vlmkit.stage import TextMaskHead

__all__ = ["Text4SegConfig", "Text4Seg", "Text4SegResult"]


# ---------------------------------------------------------------------------------------------
# Output head
# ---------------------------------------------------------------------------------------------

SAM_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")
REFINE_MODES = ("none", "sam")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    bad = isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi)
    if bad:
        accepted = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int in {accepted}, got {value!r}")


@dataclasses.dataclass
class Text4SegConfig(StageConfig):
    """Text4Seg output head: parse generated answers into masks at the original image size.

    ``grid``: side of the square descriptor grid (reference: 16; 24 for p24 checkpoints, 32 for
    semantic data). ``refine``: ``"none"`` (coarse mask) or ``"sam"`` (segment-anything refinement).
    ``sam_checkpoint``/``sam_type``: a local SAM state dict and its builder (default ``vit_b``, the
    smallest; the reference uses ``vit_h`` with ``sam_vit_h_4b8939.pth``; ``tiny`` is
    ``vlmkit.seg.sam.tiny_sam`` for tests). ``points``: k positive and k negative prompt points
    (ms-swift 10; the LLaVA branch uses 20). ``iterations``: SAM calls, each after the first fed the
    previous low-res logits (reference 3). ``seed``: point sampling seed (the reference seeds the
    global RNG once with 42; here each mask draws from its own generator seeded with ``seed``, so a
    mask's points do not depend on its position in a run). ``decode``: ``"lenient"`` or ``"reference"``; ``format``: ``"rrle"``
    (``"irle"``/``"full"`` for ablations). ``align_prior``: place the coarse-mask prior in SAM's
    padded frame (a fix; the reference stretches it over the whole 256² frame, misaligned for
    non-square images).
    """

    type = "text4seg"
    display_name = "Text4Seg"

    grid: int = 16
    refine: str = "none"
    sam_checkpoint: str | None = None
    sam_type: str = "vit_b"
    points: int = 10
    iterations: int = 3
    seed: int = 0
    decode: str = "lenient"
    format: str = "rrle"
    align_prior: bool = False

    @classmethod
    def example(cls) -> "Text4SegConfig":
        return cls(grid=4)

    def validate(self) -> None:
        _check_int("grid", self.grid, *GRID_RANGE)
        if self.refine not in REFINE_MODES:
            raise ValueError(f"refine must be one of {list(REFINE_MODES)}, got {self.refine!r}")
        if self.sam_type not in SAM_TYPES:
            raise ValueError(f"sam_type must be one of {list(SAM_TYPES)}, got {self.sam_type!r}")
        if self.sam_checkpoint is not None and not isinstance(self.sam_checkpoint, str):
            raise ValueError(f"sam_checkpoint must be a path string or None, got {self.sam_checkpoint!r}")
        _check_int("points", self.points, 1, 1024)
        _check_int("iterations", self.iterations, 1, 16)
        _check_int("seed", self.seed, 0)
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {list(DECODE_MODES)}, got {self.decode!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")
        if not isinstance(self.align_prior, bool):
            raise ValueError(f"align_prior must be a bool, got {self.align_prior!r}")


@dataclasses.dataclass(eq=False)
class Text4SegResult:
    """One parsed answer. ``mask`` bool [H, W]: the final mask (SAM-refined when ``refined``);
    ``coarse_mask`` bool [H, W]: the grid upsampled (the reference's "mllm_mask");
    ``decoded``: the :class:`DecodedGrid` (grid, ids, names, repairs); ``score``: SAM's IoU estimate
    of the last call; ``point_coords`` [N, 2] (x, y) and ``point_labels`` [N] of the SAM prompt."""

    mask: np.ndarray
    coarse_mask: np.ndarray
    decoded: DecodedGrid
    refined: bool = False
    score: float | None = None
    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None

    @property
    def repairs(self) -> tuple[Repair, ...]:
        return self.decoded.repairs


@register_stage(Text4SegConfig)
class Text4Seg(TextMaskHead):
    """Text4Seg head. ``masks_from_text`` turns generated answers into masks.

    SAM (``refine="sam"``) comes from ``sam=`` (an ``nn.Module`` from ``segment_anything``) or is
    loaded from ``config.sam_checkpoint`` on first use. It is kept outside the module tree on
    purpose: its weights are foreign and frozen, so ``save_pretrained`` must not copy them.
    """

    def __init__(self, config: Text4SegConfig, sam: Any = None) -> None:
        super().__init__(config)
        self.__dict__["_sam"] = sam  # not a submodule (see class docstring)

    def attach(self, family) -> None:
        if self.config.refine == "sam" and self.__dict__["_sam"] is None:
            path = self.config.sam_checkpoint
            if path is None:
                raise ValueError(
                    "Text4SegConfig(refine='sam') needs sam_checkpoint=<path to a SAM state dict> "
                    "(or a SAM model passed as Text4Seg(config, sam=...))"
                )
            import os

            if not os.path.isfile(path):
                raise ValueError(f"sam_checkpoint {path!r} is not a file")

    @property
    def sam(self):
        """The SAM model used for refinement (loaded from ``sam_checkpoint`` on first access)."""
        if self.__dict__["_sam"] is None:
            if self.config.sam_checkpoint is None:
                raise ValueError("no SAM: set Text4SegConfig.sam_checkpoint or pass Text4Seg(config, sam=...)")
            from vlmkit.seg.sam import load_sam

            self.__dict__["_sam"] = load_sam(self.config.sam_checkpoint, self.config.sam_type)
        return self.__dict__["_sam"]

    def decode(self, text: str) -> DecodedGrid:
        """One generated answer → :class:`DecodedGrid` [grid, grid] with this head's format and mode."""
        g = self.config.grid
        return decode_answer(text, g, g, format=self.config.format, mode=self.config.decode)

    def masks_from_text(
        self,
        texts: Sequence[str],
        image_sizes: Sequence[tuple[int, int]] | None = None,
        images: Sequence[Any] | None = None,
    ) -> list[Text4SegResult]:
        """Generated answers → one :class:`Text4SegResult` each, masks bool [H, W].

        ``image_sizes``: (H, W) per answer — height first, unlike PIL's ``image.size``; taken from
        ``images`` when omitted. ``images`` (PIL or uint8 [H, W, 3]) are needed for ``refine="sam"``.
        An all-background prediction skips SAM and gives an empty mask.
        """
        texts = list(texts)
        from vlmkit.seg.sam import rgb_array

        arrays = [rgb_array(im) for im in images] if images is not None else None
        if arrays is not None and len(arrays) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(arrays)} images")
        if image_sizes is None:
            if arrays is None:
                raise ValueError("masks_from_text needs image_sizes (H, W) or images")
            sizes = [a.shape[:2] for a in arrays]
        else:
            sizes = [_check_size(s) for s in image_sizes]
            if len(sizes) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(sizes)} image sizes")
            if arrays is not None:
                for i, (s, a) in enumerate(zip(sizes, arrays)):
                    if tuple(s) != a.shape[:2]:
                        raise ValueError(f"image_sizes[{i}] = {tuple(s)} (H, W) but image {i} is {a.shape[:2]}")
        if self.config.refine == "sam" and arrays is None:
            raise ValueError("Text4SegConfig(refine='sam') needs the images: masks_from_text(..., images=[...])")

        results = []
        predictor, current = None, None
        for i, (text, size) in enumerate(zip(texts, sizes)):
            decoded = self.decode(text)
            coarse = grid_to_mask(decoded, size)
            if self.config.refine != "sam" or not decoded.mask.any():  # all background: no SAM call
                results.append(Text4SegResult(mask=coarse, coarse_mask=coarse.copy(), decoded=decoded))
                continue
            from vlmkit.seg.sam import make_predictor, refine_with_sam

            if predictor is None:
                predictor = make_predictor(self.sam)
            if current is None or arrays[i] is not arrays[current]:
                predictor.set_image(arrays[i])
                current = i
            ref = refine_with_sam(
                predictor, decoded.mask, points=self.config.points, iterations=self.config.iterations,
                seed=self.config.seed, align_prior=self.config.align_prior,
            )
            results.append(Text4SegResult(
                mask=ref.mask, coarse_mask=coarse, decoded=decoded, refined=True, score=ref.score,
                point_coords=ref.point_coords, point_labels=ref.point_labels,
            ))
        return results
