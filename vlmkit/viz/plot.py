"""Small line plots drawn with PIL (no plotting library needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

#: matplotlib's tab10: ten distinguishable series colours
SERIES_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34)]


def line_plot(x: list[float], series: dict[str, list[float | None]], title: str = "", xlabel: str = "",
              ylabel: str = "", size: tuple[int, int] = (780, 420), y_range: tuple[float, float] = (0.0, 1.0),
              colors: dict[str, str] | None = None) -> "Image.Image":
    """One line per series over ``x`` (missing values skipped), with axes, ticks and a legend."""
    for name, ys in series.items():
        if len(ys) != len(x):
            raise ValueError(f"series {name!r} has {len(ys)} values for {len(x)} x positions")
    points = {name: [(xv, yv) for xv, yv in zip(x, ys) if yv is not None] for name, ys in series.items()}
    return scatter_lines(points, title, xlabel, ylabel, size, y_range, x_ticks=list(x), colors=colors)


def scatter_lines(series: dict[str, list[tuple[float, float]]], title: str = "", xlabel: str = "", ylabel: str = "",
                  size: tuple[int, int] = (780, 420), y_range: tuple[float, float] = (0.0, 1.0),
                  x_ticks: list[float] | None = None, colors: dict[str, str] | None = None) -> "Image.Image":
    """One line per series through its own (x, y) points (sorted by x), with axes, ticks and a legend (right).

    A series of one point is a single measurement, not a curve: it is drawn as a large outlined diamond (in the
    legend too). ``colors`` {series: other series} draws a series in another's colour (e.g. an adapted point
    in its method's colour); the rest take ``SERIES_COLORS`` in order.
    Text uses a readable scalable font (``vlmkit.viz.annotate.font``); the image widens to fit legend and title.
    ``info["Title"]`` / ``info["Legend"]`` hold the title and the series names (``annotate.save_png`` writes them).
    """
    from PIL import Image, ImageDraw

    from .annotate import font

    small, large = font(13), font(16)
    xs = [p[0] for pts in series.values() for p in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    x_ticks = x_ticks if x_ticks is not None else [x0 + i * (x1 - x0) / 5 for i in range(6)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = max([probe.textlength(name, font=small) for name in series] or [0.0])
    W, H = size[0] + max(0, int(legend_w) - 100), size[1]
    W = max(W, int(probe.textlength(title, font=large)) + 16)
    left, right, top, bottom = 60, int(legend_w) + 50, 44, 54  # the legend sits in the right margin
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    y0, y1 = y_range

    def px(xv: float, yv: float) -> tuple[float, float]:
        fx = (xv - x0) / ((x1 - x0) or 1)
        fy = (yv - y0) / ((y1 - y0) or 1)
        return left + fx * (W - left - right), H - bottom - fy * (H - top - bottom)

    def centred(x: float, y: float, text: str, fnt) -> None:
        """``text`` centred on ``x``, moved inwards where it would leave the picture (8 px margins)."""
        w = probe.textlength(text, font=fnt)
        draw.text((min(max(8, x - w / 2), W - 8 - w), y), text, fill="black", font=fnt)

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(6):
        yv = y0 + i * (y1 - y0) / 5
        _, yp = px(x0, yv)
        draw.line([left - 4, yp, left, yp], fill="black")
        draw.text((left - 8 - probe.textlength(f"{yv:.1f}", font=small), yp - 8), f"{yv:.1f}", fill="black", font=small)
    for xv in x_ticks:
        xp, _ = px(xv, y0)
        draw.line([xp, H - bottom, xp, H - bottom + 4], fill="black")
        centred(xp, H - bottom + 8, f"{xv:.3g}", small)
    centred((left + W - right) / 2, H - 24, xlabel, small)
    draw.text((8, 26), ylabel, fill="black", font=small)  # under the title, above the axes
    centred((left + W - right) / 2, 6, title, large)
    own = [name for name in series if name not in (colors or {})]
    palette = {name: SERIES_COLORS[k % len(SERIES_COLORS)] for k, name in enumerate(own)}
    for name, other in (colors or {}).items():
        if other not in palette:
            raise ValueError(f"colors[{name!r}] = {other!r}: not a series with its own colour ({own})")
        palette[name] = palette[other]

    def diamond(x: float, y: float, color) -> None:
        draw.polygon([(x, y - 7), (x + 7, y), (x, y + 7), (x - 7, y)], fill=color, outline="black")

    for k, (name, pts) in enumerate(series.items()):
        color = palette[name]
        points = [px(xv, yv) for xv, yv in sorted(pts)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for p in points:
            if len(points) == 1:
                diamond(*p, color)
            else:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        ly = top + 8 + 20 * k
        if len(points) == 1:
            diamond(W - right + 20, ly + 8, color)
        else:
            draw.line([W - right + 10, ly + 8, W - right + 30, ly + 8], fill=color, width=3)
        draw.text((W - right + 36, ly), name, fill=color, font=small)
    img.info["Title"] = title
    img.info["Legend"] = "; ".join(series)
    img.info["Axes"] = f"x: {xlabel}; y: {ylabel}"
    return img
