"""Answer parsers of the evaluation tasks: model text (and, for mask heads, masks) -> :class:`Parsed` answer.

A task YAML names its parser in ``parser:`` (a name, or ``{name: ..., **kwargs}``); :data:`PARSERS` maps
those names to the classes here, and ``tasks.TaskConfig.build_parser`` / ``tasks._validate`` look them up.
A parser gets the (``until``-truncated) text and a :class:`SampleContext` (doc, image, image size, the
model's text-mask head or token-mask head masks) and returns a :class:`Parsed`: a JSON-able ``value``
stored in the per-sample file and optional ``data`` (e.g. a mask) for the scorers of ``scorers``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

__all__ = [
    "SampleContext", "Parsed", "StripParser", "RawParser", "YesNoParser", "BoxParser", "Text4SegParser",
    "Text4SegSemanticParser", "MaskHeadParser", "PARSERS",
]


@dataclasses.dataclass
class SampleContext:
    """What a parser may look at besides the text: the doc, its image (PIL), the image size (H, W)
    and the model's text-mask head (``mask_output == "text"``, e.g. Text4Seg), if the wrapped model has one."""

    doc: dict[str, Any]
    image: Any = None
    image_size: tuple[int, int] | None = None
    head: Any = None
    masks: Any = None  # bool [n, H, W]: a token-mask head's masks for this answer (READ: one per [SEG])


@dataclasses.dataclass
class Parsed:
    """A parsed answer: ``value`` is JSON-able and goes to the per-sample file; ``data`` (e.g. a mask
    [H, W]) is for the scorers only and is not stored."""

    value: Any
    data: Any = None


class StripParser:
    """The answer with surrounding whitespace removed (metric variants do their own normalisation)."""

    def __call__(self, text: str, ctx: SampleContext) -> Parsed:
        return Parsed(text.strip())


class RawParser:
    """The answer exactly as generated (after ``until`` truncation)."""

    def __call__(self, text: str, ctx: SampleContext) -> Parsed:
        return Parsed(text)


class YesNoParser:
    """POPE answer label by ``metrics.parse_yes_no(text, parser)`` ("llava" | "exact" | "vlmevalkit")."""

    def __init__(self, parser: str = "llava") -> None:
        from .metrics import POPE_PARSERS

        if parser not in POPE_PARSERS:
            raise ValueError(f"yes_no parser must be one of {list(POPE_PARSERS)}, got {parser!r}")
        self.parser = parser

    def __call__(self, text: str, ctx: SampleContext) -> Parsed:
        from .metrics import parse_yes_no

        return Parsed(parse_yes_no(text, self.parser))


_NUM = r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*"
_BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_ANY_NUM = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class BoxParser:
    """REC box ``[x1, y1, x2, y2]`` from the first bracketed list of 4 numbers (lmms-eval); with
    ``fallback_numbers`` the first 4 numbers anywhere (VLMEvalKit). None when there is none (a miss)."""

    def __init__(self, fallback_numbers: bool = False) -> None:
        if not isinstance(fallback_numbers, bool):
            raise ValueError(f"fallback_numbers must be a bool, got {fallback_numbers!r}")
        self.fallback_numbers = fallback_numbers

    def __call__(self, text: str, ctx: SampleContext) -> Parsed:
        m = _BOX_RE.search(text)
        if m:
            return Parsed([float(v) for v in m.groups()])
        if self.fallback_numbers:
            nums = _ANY_NUM.findall(text)
            if len(nums) >= 4:
                return Parsed([float(v) for v in nums[:4]])
        return Parsed(None)


class Text4SegParser:
    """Text4Seg answer → binary mask at the image's original size (``vlmkit.seg.text4seg``).

    ``grid``/``format``/``decode`` configure ``decode_answer``; when the model carries a Text4Seg head
    its ``masks_from_text`` is used instead (its own grid, and SAM refinement if configured).
    Stored value: whether ``<seg>`` was found, the foreground labels and the decoder's repairs.
    """

    def __init__(self, grid: int = 16, format: str = "rrle", decode: str = "lenient") -> None:
        from vlmkit.seg.text4seg import Text4SegConfig

        Text4SegConfig(grid=grid, format=format, decode=decode)  # validates the values
        self.grid, self.format, self.decode = grid, format, decode

    def __call__(self, text: str, ctx: SampleContext) -> Parsed:
        from vlmkit.seg.rrle import decode_answer, grid_to_mask

        if ctx.image_size is None:
            raise ValueError("the text4seg parser needs the image size")
        if ctx.head is not None:
            refine = getattr(ctx.head.config, "refine", "none") == "sam"
            result = ctx.head.masks_from_text([text], [ctx.image_size], images=[ctx.image] if refine else None)[0]
            decoded, mask = result.decoded, result.mask
        else:
            decoded = decode_answer(text, self.grid, self.grid, format=self.format, mode=self.decode)
            mask = grid_to_mask(decoded, ctx.image_size)
        value = {"labels": decoded.labels, "repairs": decoded.repair_kinds(), "fg_cells": int(decoded.mask.sum())}
        return Parsed(value, mask)


class Text4SegSemanticParser:
    """Text4Seg semantic answer (one class name per cell) → label map [H, W] (int64).

    A cell's label is looked up in ``class_names`` (case-insensitive, stripped) and becomes that
    index; ``others`` and unknown labels become ``unknown`` (255: "no class", counted in the ground
    truth's union as mmsegmentation does for out-of-range predictions).
    """

    def __init__(self, class_names: Sequence[str] | str = "ade20k", grid: int = 32, format: str = "rrle",
                 decode: str = "lenient", unknown: int = 255) -> None:
        from vlmkit.seg.text4seg import Text4SegConfig

        Text4SegConfig(grid=grid, format=format, decode=decode)
        if class_names == "ade20k":
            from .readers import ADE20K_CLASSES

            class_names = ADE20K_CLASSES
        if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
            raise ValueError("class_names must be a list of str or 'ade20k'")
        self.class_names = [c.strip() for c in class_names]
        self.index = {c.strip().lower(): i for i, c in enumerate(class_names)}
        self.grid, self.format, self.decode, self.unknown = grid, format, decode, int(unknown)

    def __call__(self, text: str, ctx: SampleContext) -> Parsed:
        from vlmkit.seg.rrle import decode_answer, upsample_nearest

        if ctx.image_size is None:
            raise ValueError("the text4seg_semantic parser needs the image size")
        decoded = decode_answer(text, self.grid, self.grid, format=self.format, mode=self.decode)
        # one class per id present in the grid (never a pass per name: reference mode keeps every name seen in
        # the text), mapped on the grid, then upsampled once as grid_to_mask does
        present = np.unique(decoded.ids)
        table = np.full(int(present[-1]) + 1, self.unknown, dtype=np.int64)
        unknown_labels = []
        for cid in present.tolist():
            name = decoded.names[cid]
            cls = self.index.get(name.strip().lower())
            if cls is None:
                if cid > 0:
                    unknown_labels.append(name)
                continue
            table[cid] = cls
        out = upsample_nearest(table[decoded.ids], ctx.image_size)
        value = {"labels": decoded.labels, "unknown_labels": unknown_labels, "repairs": decoded.repair_kinds()}
        return Parsed(value, out)


class MaskHeadParser:
    """Masks of a token-mask head (``vlmkit.Predictor.segment``, e.g. READ / LISA: one mask per ``[SEG]``
    in the answer) → one binary mask at the image's original size.

    ``combine``: ``"first"`` takes the first ``[SEG]``'s mask (READ's ``evaluate``: ``pred_mask[0]``),
    ``"union"`` the union of all of them. An answer without ``[SEG]`` gives an empty mask ("no object").
    The runner predicts with ``segment_batch`` instead of ``generate_batch`` for tasks with this parser
    (``needs_masks``). Stored value: the number of masks and the foreground pixels of the result.
    """

    needs_masks = True
    COMBINE = ("first", "union")

    def __init__(self, combine: str = "first") -> None:
        if combine not in self.COMBINE:
            raise ValueError(f"mask_head combine must be one of {list(self.COMBINE)}, got {combine!r}")
        self.combine = combine

    def __call__(self, text: str, ctx: SampleContext) -> Parsed:
        if ctx.image_size is None:
            raise ValueError("the mask_head parser needs the image size")
        if ctx.masks is None:
            raise ValueError("the mask_head parser needs masks from a mask-producing head: evaluate a model wrapped "
                             "with one (e.g. vlmkit.READConfig), whose masks the runner then asks for")
        masks = np.asarray(ctx.masks.cpu() if hasattr(ctx.masks, "cpu") else ctx.masks, dtype=bool)
        size = tuple(ctx.image_size)
        if masks.ndim != 3 or masks.shape[1:] != size:
            raise ValueError(f"mask_head: expected masks [n, {size[0]}, {size[1]}], got shape {masks.shape}")
        if masks.shape[0] == 0:
            mask = np.zeros(size, dtype=bool)
        else:
            mask = masks[0] if self.combine == "first" else masks.any(axis=0)
        return Parsed({"num_masks": int(masks.shape[0]), "fg_pixels": int(mask.sum())}, mask)


#: parser name → class; a task's ``parser`` is a name or ``{name: ..., **kwargs}``.
PARSERS: dict[str, type] = {
    "strip": StripParser,
    "raw": RawParser,
    "yes_no": YesNoParser,
    "box": BoxParser,
    "text4seg": Text4SegParser,
    "text4seg_semantic": Text4SegSemanticParser,
    "mask_head": MaskHeadParser,
}
