"""Dense open-vocabulary segmenters (``vlmkit.FrozenSeg``) on the harness's semantic-segmentation tasks.

The VLM runner generates text and parses it; a dense segmenter predicts a class per pixel directly, so it
gets this small loop over the *same* task YAML (e.g. ``eval/ade20k.yaml``): the task's reader and data, the
class list of its parser (``class_names``, in label order) and its ``mean_iou`` scorer with the task's
settings (mmseg semantics, ``reduce_zero_label``), so the numbers are comparable with the text route.

Choices: each image is resized (bilinear) so its short side is ``size`` and both sides are multiples of 32
(FrozenSeg's CLIP stride); the per-class scores are resized back to the original size before the argmax
(Mask2Former's semantic inference). One image at a time.
"""

from __future__ import annotations

import os
import types
from typing import Any, Sequence

import numpy as np


def _resize_shape(h: int, w: int, size: int) -> tuple[int, int]:
    scale = size / min(h, w)
    return max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32)


def evaluate_semantic(model, task: Any = "ade20k", data_root: str | os.PathLike = "data", limit: int | None = None,
                      size: int = 512, include_path: Sequence[str] = (), quiet: bool = True) -> dict[str, float]:
    """Score ``model`` (a ``FrozenSeg``) on a semantic-segmentation ``task``: ``{"mIoU", "mAcc", "aAcc"}``.

    ``task``: a registered name, a YAML path or a ``TaskConfig`` with a ``mean_iou`` metric and a parser
    naming ``class_names``; ``limit``: the first N docs.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .readers import load_image
    from .data import _effective_limit, load_docs
    from .tasks import MeanIoUScorer, TaskConfig, get_task

    cfg = task if isinstance(task, TaskConfig) else get_task(task, include_path)
    scorers = [s for s in cfg.build_scorers() if isinstance(s, MeanIoUScorer)]
    names = getattr(cfg.build_parser(), "class_names", None)
    if not scorers or names is None:
        raise ValueError(f"task {cfg.task!r} is not a semantic-segmentation task (needs a mean_iou metric and a "
                         "parser with class_names, e.g. eval/ade20k.yaml)")
    scorer = scorers[0]
    docs = load_docs(cfg, data_root, quiet)
    docs = docs[: _effective_limit(len(docs), limit)]
    model.eval()
    records = []
    for doc in tqdm(docs, disable=quiet, desc=f"{cfg.task} (dense)"):
        image = np.asarray(load_image(doc), dtype=np.float32)  # [H, W, 3], 0-255
        H, W = image.shape[:2]
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=_resize_shape(H, W, size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            scores = model.semantic_segmentation(model(x, classes=list(names)), size=(H, W))  # [1, K, H, W]
        pred = scores[0].argmax(dim=0).cpu().numpy()
        records.append({"scores": scorer.score(types.SimpleNamespace(data=pred), doc)})
    return scorer.aggregate(records)
