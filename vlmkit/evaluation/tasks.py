"""Benchmark tasks: YAML files in ``eval/`` (lmms-eval style), their answer parsers and scorers.

A task names its data format (a reader of ``readers.READERS``) and default data paths relative to
``--data-root``, a prompt template, generation settings, an answer parser and its metrics::

    task: vqav2_val
    dataset: {format: vqav2, questions: vqav2/v2_OpenEnded_mscoco_val2014_questions.json, ...}
    doc_to_text: "{question}\\nAnswer the question using a single word or phrase."
    generation_kwargs: {max_new_tokens: 16}
    parser: strip
    metric_list: [{metric: vqa_accuracy, variant: official}]

``eval/README.md`` documents every key. ``load_task`` validates a file (an unknown key is an error
naming the file and the key); ``list_tasks`` / ``get_task`` form the registry over ``eval/*.yaml``.

Scorers compute each sample's values from the parsed answer and the doc, and aggregate a whole task
from the per-sample values alone. That is what makes ``--resume`` and multi-process runs exact: the
results are recomputed from the per-sample JSONL, in doc order. The exact metric definitions are the
functions of ``vlmkit.evaluation.metrics``; the area-based segmentation aggregations here reproduce
``refer_seg_scores`` / ``mean_iou`` operation for operation (tests check equality).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import string
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "TASK_KEYS", "GENERATION_KEYS", "TaskConfig", "Parsed", "SampleContext", "PARSERS", "METRICS", "Scorer",
    "load_task", "list_tasks", "get_task", "tasks_dir", "resolve_dataset", "render_prompt",
    "aggregate_mean_iou",
]

#: Top-level keys a task YAML may hold (``include`` is resolved while loading).
TASK_KEYS = (
    "task", "task_alias", "tag", "description", "include", "dataset", "synthesize", "doc_to_text",
    "generation_kwargs", "parser", "metric_list", "breakdown", "metadata",
)
#: ``generation_kwargs`` keys; ``until`` (stop strings) is applied to the decoded text, the rest go to
#: ``generate`` (``temperature: 0`` means greedy, as in lmms-eval).
GENERATION_KEYS = (
    "max_new_tokens", "min_new_tokens", "until", "do_sample", "temperature", "top_p", "top_k", "num_beams",
    "repetition_penalty",
)
_SYNTH_KEYS = ("generator", "out", "n", "seed", "size", "split", "max_shapes", "background")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")


# ---------------------------------------------------------------------------------------------
# Parsers: model text -> parsed answer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SampleContext:
    """What a parser may look at besides the text: the doc, its image (PIL), the image size (H, W)
    and the model's Text4Seg head, if the wrapped model has one."""

    doc: dict[str, Any]
    image: Any = None
    image_size: tuple[int, int] | None = None
    head: Any = None
    masks: Any = None  # bool [n, H, W]: a mask-producing head's masks for this answer (READ: one per [SEG])


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
        from vlmkit.seg.text4seg import decode_answer, grid_to_mask

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
        from vlmkit.seg.text4seg import decode_answer, grid_to_mask

        if ctx.image_size is None:
            raise ValueError("the text4seg_semantic parser needs the image size")
        decoded = decode_answer(text, self.grid, self.grid, format=self.format, mode=self.decode)
        out = np.full(tuple(ctx.image_size), self.unknown, dtype=np.int64)
        unknown_labels = []
        for cid, name in enumerate(decoded.names):
            cells = decoded.ids == cid
            if not cells.any():
                continue
            cls = self.index.get(name.strip().lower())
            if cls is None:
                if cid > 0:
                    unknown_labels.append(name)
                continue
            out[grid_to_mask(cells, ctx.image_size)] = cls
        value = {"labels": decoded.labels, "unknown_labels": unknown_labels, "repairs": decoded.repair_kinds()}
        return Parsed(value, out)


class MaskHeadParser:
    """Masks of a mask-producing head (``VLMWrapper.segment``, e.g. READ / LISA: one mask per ``[SEG]``
    in the answer) → one binary mask at the image's original size.

    ``combine``: ``"first"`` takes the first ``[SEG]``'s mask (READ's ``evaluate``: ``pred_mask[0]``),
    ``"union"`` the union of all of them. An answer without ``[SEG]`` gives an empty mask ("no object").
    The runner predicts with ``segment`` instead of ``generate`` for tasks with this parser
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
                             "with one (e.g. vlmkit.READConfig), whose segment() the runner then calls")
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


# ---------------------------------------------------------------------------------------------
# Scorers: per-sample values + aggregation from those values
# ---------------------------------------------------------------------------------------------


def _mean_and_stderr(values: list[float]) -> tuple[float, float | str]:
    """Mean and lmms-eval's ``mean_stderr`` (sample std / sqrt(n)); "N/A" for n < 2."""
    n = len(values)
    if n == 0:
        return float("nan"), "N/A"
    mean = math.fsum(values) / n
    if n < 2:
        return mean, "N/A"
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


class Scorer:
    """Base of a metric: ``score`` one sample → JSON-able dict; ``aggregate`` records → {key: value}.

    ``keys`` are the aggregated names (``results[task]["<key>,none"]``); ``mean_keys`` those that are a
    plain mean of a per-sample value of the same name (they also get ``<key>_stderr``).
    """

    keys: tuple[str, ...] = ()
    mean_keys: tuple[str, ...] = ()
    higher_is_better = True

    def target(self, doc: dict[str, Any]) -> Any:
        return None

    def score(self, parsed: Parsed, doc: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.mean_keys:
            mean, stderr = _mean_and_stderr([float(r["scores"][key]) for r in records])
            out[key] = mean
            out[f"{key}_stderr"] = stderr
        return out


def _as_str(parsed: Parsed) -> str:
    return "" if parsed.value is None else str(parsed.value)


class VQAAccuracy(Scorer):
    """VQA soft accuracy (``metrics.vqa_accuracy``) against the doc's ``answers``; ``variant`` picks the
    reference (official | lmms_eval | m4c | vlmevalkit)."""

    keys = mean_keys = ("vqa_accuracy",)

    def __init__(self, variant: str = "official") -> None:
        from .metrics import VQA_VARIANTS

        if variant not in VQA_VARIANTS:
            raise ValueError(f"vqa_accuracy variant must be one of {list(VQA_VARIANTS)}, got {variant!r}")
        self.variant = variant

    def target(self, doc):
        return doc.get("answers")

    def score(self, parsed, doc):
        from .metrics import vqa_accuracy

        if not doc.get("answers"):
            raise ValueError(f"doc {doc.get('id')!r} has no answers to score against")
        return {"vqa_accuracy": vqa_accuracy(_as_str(parsed), doc["answers"], self.variant)}


class GQAAccuracy(Scorer):
    """GQA exact match (``metrics.gqa_accuracy``) against the doc's ``answer``."""

    keys = mean_keys = ("gqa_accuracy",)

    def __init__(self, variant: str = "llava") -> None:
        from .metrics import GQA_VARIANTS

        if variant not in GQA_VARIANTS:
            raise ValueError(f"gqa_accuracy variant must be one of {list(GQA_VARIANTS)}, got {variant!r}")
        self.variant = variant

    def target(self, doc):
        return doc.get("answer")

    def score(self, parsed, doc):
        from .metrics import gqa_accuracy

        return {"gqa_accuracy": gqa_accuracy(_as_str(parsed), doc["answer"], self.variant)}


class PopeScorer(Scorer):
    """POPE accuracy / precision / recall / F1 / yes-ratio over the task (``metrics.pope_metrics``).

    The scorer applies its ``parser`` to the parsed answer (idempotent on the ``yes_no`` parser's
    output, so either parser may precede it). Keys follow lmms-eval (``pope_f1_score`` …).
    """

    keys = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")
    _FROM = {"accuracy": "pope_accuracy", "precision": "pope_precision", "recall": "pope_recall",
             "f1": "pope_f1_score", "yes_ratio": "pope_yes_ratio"}

    def __init__(self, parser: str = "llava") -> None:
        from .metrics import POPE_PARSERS

        if parser not in POPE_PARSERS:
            raise ValueError(f"pope parser must be one of {list(POPE_PARSERS)}, got {parser!r}")
        self.parser = parser

    def target(self, doc):
        return doc.get("label")

    def score(self, parsed, doc):
        from .metrics import parse_yes_no

        label = doc["label"]
        return {"pope_correct": float(parse_yes_no(_as_str(parsed), self.parser) == label), "pope_label": label}

    def aggregate(self, records):
        from .metrics import pope_metrics

        preds = [_as_str(Parsed(r["parsed"])) for r in records]
        m = pope_metrics(preds, [r["scores"]["pope_label"] for r in records], self.parser)
        return {self._FROM[k]: v for k, v in m.items()}


class BoxAccuracy(Scorer):
    """RefCOCO REC Acc@``thr`` (``metrics.refcoco_box_accuracy``) of the parsed box against the doc's
    COCO ``bbox``; ``coord`` says how to read predictions ("norm1" = lmms-eval's 0–1 prompt)."""

    mean_keys = ()

    def __init__(self, thr: float = 0.5, coord: str = "norm1", inclusive: bool = False) -> None:
        from .metrics import BOX_COORDS

        if coord not in BOX_COORDS:
            raise ValueError(f"refcoco_box_accuracy coord must be one of {list(BOX_COORDS)}, got {coord!r}")
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1:
            raise ValueError(f"thr must be a number in [0, 1], got {thr!r}")
        self.thr, self.coord, self.inclusive = float(thr), coord, bool(inclusive)
        self.key = f"refcoco_acc@{self.thr:g}"
        self.keys = self.mean_keys = (self.key,)

    def target(self, doc):
        return doc.get("bbox")

    def score(self, parsed, doc):
        from .metrics import refcoco_box_accuracy

        box = parsed.value if parsed.value is not None else [float("nan")] * 4
        w, h = doc.get("width") or 0, doc.get("height") or 0
        sizes = [[w, h]] if w and h else None
        hit = refcoco_box_accuracy([box], [doc["bbox"]], thr=self.thr, coord=self.coord, image_sizes=sizes,
                                   gt_format="xywh", inclusive=self.inclusive)
        return {self.key: hit}


class ReferSegScorer(Scorer):
    """Referring / reasoning segmentation cIoU and gIoU (LISA; ``metrics.refer_seg_scores``).

    Per sample: foreground intersection and union (``metrics.intersection_and_union`` with K=2 and
    ignore 255, exactly LISA's ``intersectionAndUnionGPU``) and the per-sample IoU.
    """

    keys = ("cIoU", "gIoU")

    def __init__(self, epsilon: bool = True, ignore_index: int = 255) -> None:
        if not isinstance(epsilon, bool):
            raise ValueError(f"epsilon must be a bool, got {epsilon!r}")
        self.epsilon, self.ignore_index = epsilon, int(ignore_index)

    def target(self, doc):
        src = doc.get("mask") or {}
        return {k: v for k, v in src.items() if k != "segmentation"}

    def score(self, parsed, doc):
        from .metrics import intersection_and_union, lisa_iou
        from .readers import load_mask

        target = load_mask(doc["mask"])
        pred = np.asarray(parsed.data)
        if pred.shape != target.shape:
            raise ValueError(f"doc {doc.get('id')!r}: predicted mask {pred.shape} != ground truth {target.shape}")
        inter, union, _ = intersection_and_union(pred.astype(np.int64), target, 2, self.ignore_index)
        i, u = int(inter[1]), int(union[1])
        iou = float(lisa_iou(i, u)) if self.epsilon else (1.0 if u == 0 else i / u)
        return {"iou": iou, "intersection": i, "union": u}

    def aggregate(self, records):
        from .metrics import refer_seg_from_areas

        return refer_seg_from_areas([(r["scores"]["intersection"], r["scores"]["union"]) for r in records], self.epsilon)


def aggregate_mean_iou(
    areas: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], mode: str = "mmseg"
) -> dict[str, Any]:
    """mIoU / mAcc / aAcc from per-image class areas (intersection, prediction, label) [K] each.

    ``"mmseg"``: float32 sums in order, NaN classes dropped (``metrics.mean_iou`` mode mmseg);
    ``"detectron2"``: float64, only classes present in the ground truth count.
    """
    if not areas:
        raise ValueError("no samples to aggregate")
    k = len(areas[0][0])
    if mode == "mmseg":
        tot_i = np.zeros(k, np.float32)
        tot_p = np.zeros(k, np.float32)
        tot_l = np.zeros(k, np.float32)
        for ai, ap, al in areas:
            tot_i = tot_i + np.asarray(ai, dtype=np.float32)
            tot_p = tot_p + np.asarray(ap, dtype=np.float32)
            tot_l = tot_l + np.asarray(al, dtype=np.float32)
        from .metrics import mmseg_scores

        return mmseg_scores(tot_i, tot_p, tot_l)
    if mode != "detectron2":
        raise ValueError(f"mode must be 'mmseg' or 'detectron2', got {mode!r}")
    tp = np.sum([np.asarray(a[0], np.int64) for a in areas], axis=0).astype(np.float64)
    pos_pred = np.sum([np.asarray(a[1], np.int64) for a in areas], axis=0).astype(np.float64)
    pos_gt = np.sum([np.asarray(a[2], np.int64) for a in areas], axis=0).astype(np.float64)
    acc = np.full(k, np.nan)
    iou = np.full(k, np.nan)
    valid = pos_gt > 0
    acc[valid] = tp[valid] / pos_gt[valid]
    union = pos_gt + pos_pred - tp
    iou_valid = valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    miou = float(np.sum(iou[iou_valid]) / np.sum(iou_valid)) if iou_valid.any() else float("nan")
    macc = float(np.sum(acc[valid]) / np.sum(valid)) if valid.any() else float("nan")
    a_acc = float(np.sum(tp) / np.sum(pos_gt)) if np.sum(pos_gt) > 0 else float("nan")
    return {"mIoU": miou, "mAcc": macc, "aAcc": a_acc, "IoU": iou}


class MeanIoUScorer(Scorer):
    """Semantic segmentation mIoU / mAcc / aAcc over the task (``metrics.mean_iou`` semantics).

    Per sample: class areas of the valid pixels (``metrics.intersection_and_union`` after
    ``reduce_zero_label``); aggregated with ``aggregate_mean_iou`` in ``mode`` mmseg | detectron2.
    """

    keys = ("mIoU", "mAcc", "aAcc")

    def __init__(self, num_classes: int = 150, ignore_index: int = 255, reduce_zero_label: bool = False,
                 mode: str = "mmseg") -> None:
        from .metrics import MIOU_MODES

        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if mode not in MIOU_MODES:
            raise ValueError(f"mean_iou mode must be one of {list(MIOU_MODES)}, got {mode!r}")
        self.num_classes, self.ignore_index = num_classes, int(ignore_index)
        self.reduce_zero_label, self.mode = bool(reduce_zero_label), mode

    def target(self, doc):
        return doc.get("mask", {}).get("path")

    def score(self, parsed, doc):
        from .metrics import intersection_and_union
        from .readers import load_mask

        target = load_mask(doc["mask"]).astype(np.int64)
        if self.reduce_zero_label:  # as mmseg / metrics.mean_iou: 0 -> 255, others -1
            target[target == 0] = 255
            target = target - 1
            target[target == 254] = 255
        pred = np.asarray(parsed.data, dtype=np.int64)
        if pred.shape != target.shape:
            raise ValueError(f"doc {doc.get('id')!r}: predicted map {pred.shape} != ground truth {target.shape}")
        inter, union, label = intersection_and_union(pred, target, self.num_classes, self.ignore_index)
        area_pred = union - label + inter
        return {"area_intersect": inter.tolist(), "area_pred": area_pred.tolist(), "area_label": label.tolist()}

    def aggregate(self, records):
        s = [r["scores"] for r in records]
        out = aggregate_mean_iou([(x["area_intersect"], x["area_pred"], x["area_label"]) for x in s], self.mode)
        out.pop("IoU")
        return out


#: metric name → scorer class; a ``metric_list`` entry is ``{metric: name, **kwargs}``.
METRICS: dict[str, type[Scorer]] = {
    "vqa_accuracy": VQAAccuracy,
    "gqa_accuracy": GQAAccuracy,
    "pope": PopeScorer,
    "refcoco_box_accuracy": BoxAccuracy,
    "refer_seg": ReferSegScorer,
    "mean_iou": MeanIoUScorer,
}


# ---------------------------------------------------------------------------------------------
# Task config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskConfig:
    """One validated task. ``raw`` is the resolved YAML (``include`` merged) as written to results'
    ``configs``; ``parser`` / ``scorers`` are built from it."""

    task: str
    dataset: dict[str, Any]
    doc_to_text: str
    metric_list: list[dict[str, Any]]
    parser_spec: dict[str, Any]
    generation_kwargs: dict[str, Any]
    source: str
    raw: dict[str, Any]
    task_alias: str | None = None
    breakdown: str | None = None
    synthesize: dict[str, Any] | None = None

    @property
    def format(self) -> str:
        return self.dataset["format"]

    def build_parser(self):
        spec = dict(self.parser_spec)
        return PARSERS[spec.pop("name")](**spec)

    def build_scorers(self) -> list[Scorer]:
        out = []
        for entry in self.metric_list:
            kwargs = {k: v for k, v in entry.items() if k not in ("metric", "higher_is_better")}
            out.append(METRICS[entry["metric"]](**kwargs))
        return out

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    def hash(self) -> str:
        """sha256 of everything that changes the outputs or scores (names and descriptions excluded)."""
        keep = {k: v for k, v in self.raw.items() if k not in ("task_alias", "description", "tag", "metadata")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``child`` wins; nested dicts merge key by key."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    import yaml

    path = path.resolve()
    if path in chain:
        raise ValueError(f"{path}: 'include' cycle: {' -> '.join(map(str, (*chain, path)))}")
    if not path.is_file():
        where = f" (included from {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"task file not found: {os.fspath(path)!r}{where}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a task file must be a YAML mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} in task YAML; accepted keys: {list(TASK_KEYS)}")
    include = data.pop("include", None)
    if include is not None:
        if not isinstance(include, str):
            raise ValueError(f"{path}: 'include' must be a file name, got {include!r}")
        data = _merge(_read_yaml(path.parent / include, (*chain, path)), data)
    return data


def _check_kwargs(cls: type, kwargs: dict[str, Any], what: str, path: Path) -> None:
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    for key in kwargs:
        if key not in accepted:
            raise ValueError(f"{path}: unknown key {key!r} for {what}; accepted: {accepted}")
    try:
        cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid {what}: {err}") from err


def _template_fields(template: str) -> set[str]:
    fields = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if not name:
                raise ValueError("positional '{}' placeholders are not allowed; name a doc field")
            fields.add(re.split(r"[.\[]", name, maxsplit=1)[0])
    return fields


def _validate(data: dict[str, Any], path: Path) -> TaskConfig:
    from .readers import READERS

    def need(key: str, types: type | tuple[type, ...]):
        if key not in data:
            raise ValueError(f"{path}: missing required key {key!r}")
        if not isinstance(data[key], types):
            raise ValueError(f"{path}: {key!r} must be {types}, got {type(data[key]).__name__}: {data[key]!r}")
        return data[key]

    name = need("task", str)
    if not _NAME_RE.match(name):
        raise ValueError(f"{path}: task name {name!r} may only hold letters, digits and _ . + -")
    dataset = need("dataset", dict)
    fmt = dataset.get("format")
    if fmt not in READERS:
        raise ValueError(f"{path}: dataset.format must be one of {sorted(READERS)}, got {fmt!r}")
    spec = READERS[fmt]
    for key in dataset:
        if key != "format" and key not in spec.keys:
            raise ValueError(f"{path}: unknown key {key!r} in dataset (format {fmt!r}); accepted: {list(spec.keys)}")
    for key in spec.required:
        if key not in dataset:
            raise ValueError(f"{path}: dataset (format {fmt!r}) needs key {key!r}")
    fields = set(spec.fields) | (set(dataset.get("fields", {})) if fmt == "hf" else set())

    template = need("doc_to_text", str)
    try:
        used = _template_fields(template)
    except ValueError as err:
        raise ValueError(f"{path}: doc_to_text: {err}") from err
    missing = sorted(used - fields)
    if missing:
        raise ValueError(f"{path}: doc_to_text uses {missing}, which format {fmt!r} does not provide; fields: {sorted(fields)}")

    gen = data.get("generation_kwargs", {}) or {}
    if not isinstance(gen, dict):
        raise ValueError(f"{path}: generation_kwargs must be a mapping")
    for key, value in gen.items():
        if key not in GENERATION_KEYS:
            raise ValueError(f"{path}: unknown key {key!r} in generation_kwargs; accepted: {list(GENERATION_KEYS)}")
        if key == "until" and not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))):
            raise ValueError(f"{path}: generation_kwargs.until must be a str or a list of str, got {value!r}")
        if key in ("max_new_tokens", "min_new_tokens", "num_beams", "top_k") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{path}: generation_kwargs.{key} must be a non-negative int, got {value!r}")

    parser = data.get("parser", "strip")
    parser_spec = {"name": parser} if isinstance(parser, str) else dict(parser) if isinstance(parser, dict) else None
    if parser_spec is None or parser_spec.get("name") not in PARSERS:
        raise ValueError(f"{path}: parser must be one of {sorted(PARSERS)} (or a mapping with 'name'), got {parser!r}")
    _check_kwargs(PARSERS[parser_spec["name"]], {k: v for k, v in parser_spec.items() if k != "name"},
                  f"parser {parser_spec['name']!r}", path)

    metrics = need("metric_list", list)
    if not metrics:
        raise ValueError(f"{path}: metric_list is empty")
    for i, entry in enumerate(metrics):
        if not isinstance(entry, dict) or entry.get("metric") not in METRICS:
            raise ValueError(f"{path}: metric_list[{i}] must be a mapping with 'metric' in {sorted(METRICS)}, got {entry!r}")
        kwargs = {k: v for k, v in entry.items() if k not in ("metric", "higher_is_better")}
        _check_kwargs(METRICS[entry["metric"]], kwargs, f"metric {entry['metric']!r}", path)

    breakdown = data.get("breakdown")
    if breakdown is not None and (not isinstance(breakdown, str) or breakdown not in fields):
        raise ValueError(f"{path}: breakdown must name a doc field of format {fmt!r} ({sorted(fields)}), got {breakdown!r}")
    synth = data.get("synthesize")
    if synth is not None:
        if not isinstance(synth, dict):
            raise ValueError(f"{path}: synthesize must be a mapping")
        for key in synth:
            if key not in _SYNTH_KEYS:
                raise ValueError(f"{path}: unknown key {key!r} in synthesize; accepted: {list(_SYNTH_KEYS)}")
        if synth.get("generator") != "shapes" or not isinstance(synth.get("out"), str):
            raise ValueError(f"{path}: synthesize needs generator: shapes and out: <folder under the data root>")
    for key in ("task_alias", "description"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{path}: {key!r} must be a str")
    for key in ("metadata",):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"{path}: {key!r} must be a mapping")

    return TaskConfig(
        task=name, dataset=dict(dataset), doc_to_text=template, metric_list=[dict(m) for m in metrics],
        parser_spec=parser_spec, generation_kwargs=dict(gen), source=os.fspath(path), raw=copy.deepcopy(data),
        task_alias=data.get("task_alias"), breakdown=breakdown, synthesize=synth,
    )


def load_task(path: str | os.PathLike) -> TaskConfig:
    """Read and validate one task YAML (``include`` resolved relative to the file)."""
    p = Path(path)
    return _validate(_read_yaml(p), p.resolve())


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def tasks_dir() -> Path:
    """The ``eval/`` folder: ``$VLMKIT_TASKS_DIR``, else ``eval/`` next to the ``vlmkit`` package
    (a source checkout), else ``./eval``."""
    env = os.environ.get("VLMKIT_TASKS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "eval"
    return here if here.is_dir() else Path.cwd() / "eval"


def list_tasks(include_path: Sequence[str | os.PathLike] = ()) -> dict[str, Path]:
    """Task name → YAML file for every ``*.yaml`` in ``eval/`` and ``include_path`` (files starting
    with ``_`` are templates for ``include``, not tasks). Duplicate names are an error."""
    found: dict[str, Path] = {}
    for folder in (tasks_dir(), *map(Path, include_path)):
        if not folder.is_dir():
            continue
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            if path.name.startswith("_"):
                continue
            data = _read_yaml(path)
            name = data.get("task")
            if not isinstance(name, str):
                raise ValueError(f"{path}: missing required key 'task'")
            if name in found and found[name].resolve() != path.resolve():
                raise ValueError(f"task {name!r} is defined twice: {found[name]} and {path}")
            found[name] = path
    return found


def get_task(name_or_path: str | os.PathLike, include_path: Sequence[str | os.PathLike] = ()) -> TaskConfig:
    """A task by registry name, or from a path to a YAML file."""
    s = os.fspath(name_or_path)
    if s.endswith((".yaml", ".yml")) or os.path.sep in s:
        return load_task(s)
    tasks = list_tasks(include_path)
    if s not in tasks:
        raise ValueError(f"unknown task {s!r}; available: {sorted(tasks)} (or pass a path to a task YAML)")
    return load_task(tasks[s])


# ---------------------------------------------------------------------------------------------
# Data paths and prompts
# ---------------------------------------------------------------------------------------------


def resolve_dataset(task: TaskConfig, data_root: str | os.PathLike) -> dict[str, Any]:
    """The reader's keyword arguments: path keys joined onto ``data_root`` (absolute paths kept)."""
    from .readers import READERS

    spec = READERS[task.format]
    root = Path(data_root)
    out = {}
    for key, value in task.dataset.items():
        if key == "format":
            continue
        if key in spec.paths and value is not None:
            if isinstance(value, dict):
                value = {k: os.fspath(root / v) for k, v in value.items()}
            elif isinstance(value, list):
                value = [os.fspath(root / v) for v in value]
            else:
                value = os.fspath(root / value)
        out[key] = value
    return out


def render_prompt(task: TaskConfig, doc: dict[str, Any]) -> str:
    """``doc_to_text`` formatted with the doc's fields."""
    try:
        return task.doc_to_text.format(**doc)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"task {task.task!r}: doc {doc.get('id')!r}: cannot fill doc_to_text ({err!r})") from err
