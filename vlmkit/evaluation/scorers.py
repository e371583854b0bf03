"""Scorers of the evaluation tasks: per-sample metric values and their aggregation over a task.

A task YAML lists its metrics in ``metric_list`` (``{metric: name, **kwargs}``); :data:`METRICS` maps
those names to the :class:`Scorer` classes here, and ``tasks.TaskConfig.build_scorers`` /
``tasks._validate`` look them up. A scorer computes each sample's values from the :class:`~.parsers.Parsed`
answer and the doc, and aggregates a whole task from the per-sample values alone. That is what makes
``--resume`` and multi-process runs exact: the results are recomputed from the per-sample JSONL, in doc
order. The exact metric definitions are the functions of ``vlmkit.evaluation.metrics``; the area-based
segmentation aggregations here reproduce ``refer_seg_scores`` / ``mean_iou`` operation for operation
(tests check equality).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .parsers import Parsed

__all__ = [
    "Scorer", "VQAAccuracy", "GQAAccuracy", "PopeScorer", "BoxAccuracy", "ReferSegScorer", "aggregate_mean_iou",
    "MeanIoUScorer", "METRICS",
]


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
