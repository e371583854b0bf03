"""Titles, legends and readable text for vlmkit's pictures, and PNGs that carry their text as metadata.

Every picture vlmkit writes says what it shows: :func:`caption` puts a title band (and a legend of coloured
swatches) above an image and records both in ``image.info``; :func:`save_png` writes them as PNG text chunks
(``Title``, ``Legend``), so a test or a file browser can read them back (``Image.open(path).text``). Text is drawn
with Pillow's bundled scalable font (``ImageFont.load_default(size)``, FreeType), not the 11-pixel bitmap font.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from PIL import Image, ImageFont

__all__ = ["font", "caption", "save_png", "LegendItem"]

#: (RGB colour, "fill" | "outline", text): one legend entry
LegendItem = tuple[tuple[int, int, int], str, str]

TEXT_SIZE = 15  # px: readable at 100 % on a 336-px picture
BAND = (250, 250, 250)
INK = (20, 20, 20)


@functools.lru_cache(maxsize=8)
def font(size: int = TEXT_SIZE) -> "ImageFont.ImageFont":
    """Pillow's bundled scalable font at ``size`` pixels (the bitmap default font when FreeType is missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _wrap(draw, text: str, width: int, fnt) -> list[str]:
    """``text`` broken into lines that fit ``width`` pixels (at word boundaries)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=fnt) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def caption(image: "Image.Image", title: str, legend: Sequence[LegendItem] = (), size: int = TEXT_SIZE
            ) -> "Image.Image":
    """A new RGB image: ``image`` below a band holding ``title`` (wrapped to the width) and a row of legend
    entries, each a swatch (a filled square, or an outlined one for ``"outline"``) and its text.
    ``info["Title"]`` / ``info["Legend"]`` hold the texts (``save_png`` writes them into the file)."""
    from PIL import Image, ImageDraw

    fnt = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, line_h = 6, size + 5
    width = max(image.width, 240)
    lines = _wrap(probe, title, width - 2 * pad, fnt)
    # legend entries flow left to right, wrapping to new rows
    rows: list[list[tuple[LegendItem, float]]] = [[]]
    x = pad
    for item in legend:
        w = size + 4 + probe.textlength(item[2], font=fnt) + 14
        if rows[-1] and x + w > width - pad:
            rows.append([])
            x = pad
        rows[-1].append((item, w))
        x += w
    n_rows = len(rows) if legend else 0
    band = pad + line_h * (len(lines) + n_rows) + pad
    out = Image.new("RGB", (width, band + image.height), BAND)
    out.paste(image.convert("RGB"), ((width - image.width) // 2, band))
    draw = ImageDraw.Draw(out)
    y = pad
    for line in lines:
        draw.text((pad, y), line, fill=INK, font=fnt)
        y += line_h
    for row in rows if legend else []:
        x = pad
        for (color, style, text), w in row:
            box = (x, y + 2, x + size - 2, y + size)
            if style == "outline":
                draw.rectangle(box, outline=color, width=3)
            else:
                draw.rectangle(box, fill=color, outline=INK)
            draw.text((x + size + 4, y), text, fill=INK, font=fnt)
            x += w
        y += line_h
    out.info["Title"] = title
    if legend:
        out.info["Legend"] = "; ".join(f"{text} ({style} {'#%02x%02x%02x' % tuple(color)})"
                                       for color, style, text in legend)
    return out


def save_png(image: "Image.Image", path: str | os.PathLike) -> None:
    """Save ``image`` as a PNG with its ``info`` texts (``Title``, ``Legend``, …) as text chunks."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            meta.add_itxt(key, value)
    image.save(path, format="PNG", pnginfo=meta)
