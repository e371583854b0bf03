"""Mask overlays: binary masks alpha-blended over an image, one colour per mask, optional labels; and
``mask_comparison``: a predicted mask against the ground truth, outlined in two colours under a title."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["PALETTE", "PREDICTED", "TRUTH", "mask_overlay", "mask_comparison", "outline"]

#: Distinct RGB colours, used in order (cycled past the end).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (245, 130, 48),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0),
)


#: colours of ``mask_comparison``: the predicted mask (filled and outlined) and the ground truth (outlined)
PREDICTED: tuple[int, int, int] = (255, 0, 200)
TRUTH: tuple[int, int, int] = (0, 230, 255)


def _as_masks(masks: Any, size: tuple[int, int]) -> list[np.ndarray]:
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
    elif hasattr(masks, "detach"):  # torch tensor [N, H, W] or [H, W]
        arr = masks.detach().cpu().numpy()
        masks = [arr] if arr.ndim == 2 else list(arr)
    out = []
    for i, m in enumerate(masks):
        m = np.asarray(m)
        if m.shape != size:
            raise ValueError(f"mask {i} has shape {m.shape}, the image is {size} (H, W)")
        out.append(m.astype(bool) if m.dtype != bool else m)
    return out


def mask_overlay(
    image: Any,
    masks: Any,
    labels: Sequence[str] | None = None,
    *,
    alpha: float = 0.5,
    colors: Sequence[tuple[int, int, int]] | None = None,
) -> "Image.Image":  # noqa: F821
    """RGB PIL image: ``masks`` (bool [H, W], a list of them, or [N, H, W]) blended over ``image``.

    ``image``: PIL image or uint8 array [H, W, 3]. Mask i gets ``colors[i]`` (default :data:`PALETTE`)
    at opacity ``alpha``, later masks on top; ``labels[i]``, when given, is written at the top-left
    corner of mask i's bounding box on a dark box. Empty masks are skipped (their label too).
    """
    from PIL import Image, ImageDraw, ImageFont

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    base = image.convert("RGB") if hasattr(image, "convert") else Image.fromarray(np.asarray(image, np.uint8))
    canvas = np.asarray(base.convert("RGB"), dtype=np.float32).copy()
    ms = _as_masks(masks, canvas.shape[:2])
    if labels is not None and len(labels) != len(ms):
        raise ValueError(f"got {len(ms)} masks but {len(labels)} labels")
    palette = list(colors) if colors is not None else list(PALETTE)
    if not palette:
        raise ValueError("colors must not be empty")
    for i, m in enumerate(ms):
        color = np.asarray(palette[i % len(palette)], dtype=np.float32)
        canvas[m] = (1 - alpha) * canvas[m] + alpha * color
    out = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    if labels:
        draw = ImageDraw.Draw(out)
        font = ImageFont.load_default()
        for i, (m, text) in enumerate(zip(ms, labels)):
            if not text or not m.any():
                continue
            ys, xs = np.nonzero(m)
            x, y = int(xs.min()), int(ys.min())
            left, top, right, bottom = draw.textbbox((x, y), text, font=font)
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
            draw.text((x, y), text, fill=tuple(int(c) for c in palette[i % len(palette)]), font=font)
    return out


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """bool [H, W]: the pixels of ``mask`` within ``width`` pixels of its edge (4-neighbourhood; the image
    border counts as outside)."""
    m = np.asarray(mask, dtype=bool)
    inner = m.copy()
    for _ in range(max(1, int(width))):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def mask_comparison(
    image: Any, predicted: Any, truth: Any | None, title: str, *, alpha: float = 0.35, width: int | None = None,
) -> "Image.Image":  # noqa: F821
    """RGB PIL image: ``predicted`` (bool [H, W] at the image's size) filled at opacity ``alpha`` and outlined in
    :data:`PREDICTED`, ``truth`` (same size, or None) outlined in :data:`TRUTH` on top, under a title band
    with ``title`` (e.g. the referring expression) and a legend; the title gets the IoU when ``truth`` is given.
    ``info["Title"]`` / ``info["Legend"]`` hold the texts (``vlmkit.viz.annotate.save_png`` writes them)."""
    from .annotate import caption

    base = image.convert("RGB") if hasattr(image, "convert") else None
    size = (base.height, base.width) if base is not None else np.asarray(image).shape[:2]
    pred = _as_masks([np.asarray(predicted)], size)[0]
    width = width if width is not None else max(1, min(size) // 100)
    pic = mask_overlay(image, [pred], alpha=alpha, colors=[PREDICTED])
    canvas = np.asarray(pic).copy()
    canvas[outline(pred, width)] = PREDICTED
    legend = [(PREDICTED, "fill", "predicted mask")]
    if truth is not None:
        gt = _as_masks([np.asarray(truth)], size)[0]
        canvas[outline(gt, width)] = TRUTH
        union = int((pred | gt).sum())
        iou = int((pred & gt).sum()) / union if union else 1.0
        title = f"{title} (IoU {iou:.2f})"
        legend.append((TRUTH, "outline", "ground truth"))
    from PIL import Image

    return caption(Image.fromarray(canvas), title, legend)
