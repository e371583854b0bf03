"""Mask overlays: binary masks alpha-blended over an image, one colour per mask, optional labels."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["PALETTE", "mask_overlay"]

#: Distinct RGB colours, used in order (cycled past the end).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (245, 130, 48),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0),
)


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
