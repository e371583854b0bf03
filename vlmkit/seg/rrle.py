"""Text4Seg codec: segmentation masks as text (semantic descriptors compressed with row-wise RLE).

A mask becomes an ``h × w`` grid with one text label per cell (the referring expression, or the
background label ``others``); the grid is written as R-RLE (Text4Seg, Lan et al., arXiv 2410.09855;
``encode_mask`` of ``mc-lan/Text4Seg`` @ d6540b6, ``playground/data/create_json/utils.py``)::

    others *16\\n others *5| dog *7| others *4\\n ... others *16\\n

and answers wrap it as ``"{sentence}\\n<seg>{SEG}</seg>"``. This module holds the codec (R-RLE, the
image-wise RLE and uncompressed descriptor ablations), lenient decoding with repair reports, answer
wrapping and mask ↔ grid conversion. It is text and numpy only: importing it loads no torch
(:func:`grid_to_mask` imports torch when called). The output head that turns generated answers into
masks at the original image size (``Text4SegConfig`` / ``Text4Seg``, optionally SAM-refined) is the
stage in ``vlmkit.seg.text4seg``.

Model text is data: the decoders never raise on malformed text. They return a :class:`DecodedGrid`
whose ``repairs`` list what was fixed. Two modes:

- ``"reference"``: the reference chain (``decode_mask`` → ``translate_sequence`` → pad/truncate) of
  ``ms-swift/text4seg/infer_refer_seg.py``, for parity: exact separators, and any parse error makes
  the whole grid background.
- ``"lenient"`` (default): tolerant separators (``"\\n"`` with or without the space, ``"|"`` with or
  without it, ``" *"`` with any spacing); an unparseable run is background; each R-RLE row is fitted
  to the grid width (a short row is filled at its first unparseable run with ``others``, else padded
  with its last label; a long row is truncated); missing rows are padded with the last label and
  extra rows dropped (the reference's pad/truncate rule, applied per row instead of to the flat
  sequence, so one miscounted row cannot shift every row after it). Contract: ``decoded.ok`` (no
  repairs) holds exactly when the text, stripped, is the canonical encoding of ``decoded.grid``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from itertools import groupby
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "BACKGROUND", "SEG_START", "SEG_END", "FORMATS", "DECODE_MODES", "REPAIR_KINDS", "GRID_RANGE",
    "Repair", "DecodedGrid", "check_label", "downsample_mask", "mask_to_labels", "encode_rrle",
    "encode_irle", "encode_descriptors", "encode", "decode_rrle", "decode_irle", "decode_descriptors",
    "decode", "decode_answer", "label_ids", "labels_to_mask", "grid_to_mask", "upsample_nearest", "wrap_answer",
    "extract_seg", "GRID_STR_BYTES",
]

#: Background label of every descriptor format.
BACKGROUND = "others"
SEG_START = "<seg>"
SEG_END = "</seg>"
#: Descriptor formats: row-wise RLE (the paper's), image-wise RLE and uncompressed (ablations).
FORMATS = ("rrle", "irle", "full")
DECODE_MODES = ("lenient", "reference")
#: Inclusive range of grid sides ``Text4SegConfig`` accepts (the reference uses 16, 24 and 32).
GRID_RANGE = (4, 64)

#: Every ``Repair.kind`` a decoder can report.
REPAIR_KINDS = {
    "no_seg": "no <seg> in the answer: whole grid background",
    "unclosed_seg": "<seg> without </seg>: decoded the text up to the end",
    "empty": "nothing decodable: whole grid background",
    "unparseable": "reference mode: a run did not parse, whole grid background",
    "noncanonical": "accepted text that is not the canonical spelling (separators, spacing, leading zeros, "
    "empty or split runs, labels the encoder would refuse)",
    "bad_run": "a run without a readable count: its cells are background",
    "empty_label": "a run without a label: its cells are background",
    "empty_cell": "an empty uncompressed cell was dropped",
    "row_short": "a row had fewer cells than the width",
    "row_long": "a row had more cells than the width: truncated",
    "rows_short": "fewer rows than the height: padded with the last label",
    "rows_long": "more rows than the height: extra rows dropped",
    "short": "fewer cells than height × width: padded with the last label",
    "long": "more cells than height × width: truncated",
    "single_line": "one line for a multi-row grid: decoded as image-wise RLE",
}

_FORBIDDEN_IN_LABEL = ("|", "*", "\n", "\r")
_MAX_COUNT_DIGITS = 9  # a longer count is surely wrong; it is capped instead of parsed
# Separators. Each is the plain pattern (rows: [ \t]*\r?\n\s*, runs: [ \t]*\|[ \t]*, cells: \s*[|\n]\s*) with a
# look-behind that starts a match only at the first blank of a run of blanks: the plain pattern retries at every
# blank of a long blank run without a separator (quadratic); a match can never start after a blank that was not
# itself a start, except right after the previous match (the second alternative), so the splits are the same.
_ROW_SPLIT = re.compile(r"(?<![ \t])[ \t]*\r?\n\s*")
_RUN_SPLIT = re.compile(r"(?<![ \t])[ \t]*\|[ \t]*|\|[ \t]*")
_RUN_TAIL = re.compile(r"[ \t]*([0-9]+)([ \t]*)")  # what may follow a run's last "*"
_CELL_SPLIT = re.compile(r"(?<!\s)\s*[|\n]\s*|\|\s*")
#: Labels longer than this are shown shortened in repair details and errors.
_SHOW_CHARS = 200
#: Largest fixed-width str grid (bytes) ``DecodedGrid.grid`` builds; above it the grid is an object array.
GRID_STR_BYTES = 16 * 2**20


def _show(label: Any) -> str:
    """repr of ``label``, shortened beyond :data:`_SHOW_CHARS` characters (model text can be megabytes)."""
    if isinstance(label, str) and len(label) > _SHOW_CHARS:
        return f"{label[:_SHOW_CHARS]!r}... ({len(label)} characters)"
    return repr(label)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Repair:
    """One thing a decoder fixed. ``kind`` is a key of :data:`REPAIR_KINDS`; ``row`` is 0-based or None."""

    kind: str
    detail: str
    row: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class DecodedGrid:
    """What a decoder recovered from model text.

    ``ids`` int64 [h, w]: class id per cell, ``names[i]`` the label of id ``i``; 0 is background.
    ``repairs``: what was fixed (empty for well-formed text). ``grid`` str [h, w]: one label per cell, built
    from ``ids`` and ``names`` on first access (``np.asarray(decoded)`` is ``grid``). The decoders themselves
    never build it: their work and memory are linear in the text and bounded by the grid, however long a
    label is. ``grid`` is a fixed-width str array (``<U{longest label present}``) up to
    :data:`GRID_STR_BYTES` bytes, else (a megabyte-long label) an object array of the same str values.

    Ids: lenient mode reserves 0 for ``others`` and numbers the other labels in first-seen order.
    Reference mode reproduces ``translate_sequence``: first-seen order over the whole (untruncated)
    sequence with ``others`` moved to 0 *when present*; without ``others`` the first label gets 0 and
    counts as background (so a grid with no ``others`` cell has its first label as background there).
    """

    ids: np.ndarray
    names: tuple[str, ...]
    repairs: tuple[Repair, ...] = ()
    mode: str = "lenient"

    @functools.cached_property
    def grid(self) -> np.ndarray:
        """str [h, w]: ``names[ids]`` (see the class docstring for its dtype)."""
        present, inverse = np.unique(self.ids, return_inverse=True)
        labels = [self.names[i] for i in present.tolist()]
        width = max(1, max(len(label) for label in labels))
        if self.ids.size * width * 4 <= GRID_STR_BYTES:
            table = np.asarray(labels, dtype=f"<U{width}")
        else:
            table = np.empty(len(labels), dtype=object)
            table[:] = labels
        return table[inverse.reshape(self.ids.shape)]

    @property
    def ok(self) -> bool:
        """True when the text needed no repair."""
        return not self.repairs

    @property
    def mask(self) -> np.ndarray:
        """bool [h, w]: foreground cells (id > 0, the reference's ``pred > 0``)."""
        return self.ids > 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)  # type: ignore[return-value]

    @property
    def labels(self) -> list[str]:
        """Foreground labels present in the grid, by id."""
        present = set(np.unique(self.ids).tolist())
        return [name for i, name in enumerate(self.names) if i > 0 and i in present]

    def repair_kinds(self) -> list[str]:
        return [r.kind for r in self.repairs]

    def __array__(self, dtype=None, copy=None):
        return self.grid if dtype is None else self.grid.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Mask ↔ grid
# ---------------------------------------------------------------------------------------------


def check_label(label: Any) -> str:
    """Return ``label`` if it is a label R-RLE can carry, else raise ValueError/TypeError naming it.

    A label is a non-empty str without ``|``, ``*`` or line breaks and without surrounding
    whitespace (the reference strips labels when decoding, so such labels would not round-trip).
    """
    if not isinstance(label, str):
        raise TypeError(f"descriptor labels must be str, got {type(label).__name__}: {_show(label)}")
    if not label or label != label.strip() or any(c in label for c in _FORBIDDEN_IN_LABEL):
        raise ValueError(
            f"invalid descriptor label {_show(label)}: need a non-empty string without surrounding whitespace "
            f"and without any of {list(_FORBIDDEN_IN_LABEL)} (use refseg_data.sanitize_label)"
        )
    return label


def _resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if mask.dtype == np.uint8:
        img = Image.fromarray(mask)
    else:
        img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.int32))  # mode "I"
    return np.asarray(img.resize((width, height), Image.NEAREST))


def downsample_mask(mask: np.ndarray, height: int = 16, width: int = 16) -> np.ndarray:
    """Mask [H, W] → [height, width] by PIL nearest-neighbour sampling, as the reference data scripts.

    No majority vote and no aspect-ratio preservation: output cell (i, j) is the input pixel at
    ``(int((i + .5) * H / height), int((j + .5) * W / width))`` (PIL's NEAREST), so a thin object
    can vanish. Bool (or 0/1 float) masks give bool; integer label maps keep their values and dtype.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"mask must be a non-empty 2-D array [H, W], got shape {m.shape}")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if m.dtype == bool:
        return _resize_nearest(m.astype(np.uint8), height, width).astype(bool)
    if np.issubdtype(m.dtype, np.floating):
        if not np.isin(m, (0.0, 1.0)).all():
            raise ValueError(f"a float mask must hold only 0 and 1, got values {np.unique(m)[:6]}")
        return _resize_nearest(m.astype(np.uint8), height, width).astype(bool)
    if np.issubdtype(m.dtype, np.integer):
        lo, hi = int(m.min()), int(m.max())
        if 0 <= lo and hi <= 255:
            return _resize_nearest(m.astype(np.uint8), height, width).astype(m.dtype)
        if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
            return _resize_nearest(m.astype(np.int32), height, width).astype(m.dtype)
        raise ValueError(f"integer mask values must fit int32, got range [{lo}, {hi}]")
    raise TypeError(f"mask must be bool, integer or 0/1 float, got dtype {m.dtype}")


def mask_to_labels(mask: np.ndarray, label: str, height: int = 16, width: int = 16) -> np.ndarray:
    """Binary mask [H, W] → label grid str [height, width]: ``label`` on foreground cells, else ``others``."""
    check_label(label)
    small = downsample_mask(np.asarray(mask) != 0, height, width)
    return np.where(small, label, BACKGROUND)


def labels_to_mask(grid: Any) -> np.ndarray:
    """Label grid [h, w] → bool [h, w]: every label except ``others`` is foreground."""
    if isinstance(grid, DecodedGrid):
        grid = grid.grid
    return np.asarray(grid) != BACKGROUND


def grid_to_mask(grid: Any, size: tuple[int, int]) -> np.ndarray:
    """Grid [h, w] (labels, bool, or a DecodedGrid) → bool mask [H, W] at ``size`` = (H, W).

    Nearest upsampling with ``torch.nn.functional.interpolate(mode="nearest")`` on float64, as the
    reference (output pixel y samples grid row ``floor(y * h / H)``).
    """
    if isinstance(grid, DecodedGrid):
        fg = grid.mask
    else:
        arr = np.asarray(grid)
        fg = arr if arr.dtype == bool else (arr != BACKGROUND if arr.dtype.kind in "UO" else arr != 0)
    if fg.ndim != 2:
        raise ValueError(f"grid must be 2-D [h, w], got shape {fg.shape}")
    return upsample_nearest(fg.astype(np.float64), size) > 0.5


def upsample_nearest(values: Any, size: tuple[int, int]) -> np.ndarray:
    """Numeric grid [h, w] → [H, W] at ``size`` = (H, W), same dtype, by the rule of :func:`grid_to_mask`:
    ``torch.nn.functional.interpolate(mode="nearest")`` on float64 (output pixel y samples grid row
    ``floor(y * h / H)``). Integer values must be exact in float64 (|v| < 2**53)."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"grid must be 2-D [h, w], got shape {arr.shape}")
    height, width = _check_size(size)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))[None, None]
    return F.interpolate(t, size=(height, width), mode="nearest")[0, 0].numpy().astype(arr.dtype)


def _check_size(size: Any) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"size must be (H, W), got {size!r}") from err
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (H, W), got {size!r}")
    return height, width


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


def _as_label_grid(grid: Any) -> np.ndarray:
    arr = np.asarray(grid)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"grid must be a non-empty 2-D array of labels [h, w], got shape {arr.shape}")
    if arr.dtype.kind not in "UO":
        raise TypeError(f"grid must hold str labels, got dtype {arr.dtype} (use mask_to_labels for masks)")
    for label in set(arr.ravel().tolist()):
        check_label(label)
    return arr


def _runs(cells: Iterable[str]) -> list[str]:
    return [f"{label} *{sum(1 for _ in group)}" for label, group in groupby(cells)]


def encode_rrle(grid: Any) -> str:
    """Label grid [h, w] → R-RLE text, byte-identical to the reference ``encode_mask``.

    Each row independently: runs ``"{label} *{count}"`` joined by ``"| "``; rows joined by ``"\\n "``;
    a trailing ``"\\n"``.
    """
    arr = _as_label_grid(grid)
    return "\n ".join("| ".join(_runs(row)) for row in arr.tolist()) + "\n"


def encode_irle(grid: Any) -> str:
    """Label grid [h, w] → image-wise RLE (ablation): runs over the row-major cells on one line.

    The reference ships only the decoder (``decode_mask_s``: strip ``"\\n"``, split on ``"| "``).
    [choice] The encoder mirrors R-RLE's spelling (``"| "`` between runs, a trailing ``"\\n"``).
    """
    arr = _as_label_grid(grid)
    return "| ".join(_runs(arr.ravel().tolist())) + "\n"


def encode_descriptors(grid: Any) -> str:
    """Label grid [h, w] → uncompressed semantic descriptors (ablation): one label per cell.

    The reference ships only the decoder (``decode_mask_l``: strip ``"\\n"``, split on ``"| "``).
    [choice] Cells joined by ``"| "`` on one line, with a trailing ``"\\n"`` as R-RLE.
    """
    arr = _as_label_grid(grid)
    return "| ".join(arr.ravel().tolist()) + "\n"


_ENCODERS = {"rrle": encode_rrle, "irle": encode_irle, "full": encode_descriptors}


def encode(grid: Any, format: str = "rrle") -> str:
    """Encode a label grid in one of :data:`FORMATS`."""
    if format not in _ENCODERS:
        raise ValueError(f"unknown descriptor format {format!r}; accepted: {list(FORMATS)}")
    return _ENCODERS[format](grid)


# ---------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------


def label_ids(cells: Sequence[str]) -> list[int]:
    """The reference ``translate_sequence`` ids of flat cells: first-seen order, ``others`` moved to 0.

    Without ``others`` in ``cells`` the first label gets id 0 (background under ``pred > 0``).
    """
    names = list(dict.fromkeys(cells))
    if BACKGROUND in names:
        names.remove(BACKGROUND)
        names.insert(0, BACKGROUND)
    index = {name: i for i, name in enumerate(names)}
    return [index[c] for c in cells]


def _check_shape(height: Any, width: Any) -> tuple[int, int]:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return int(height), int(width)


def _background(height: int, width: int, repairs: list[Repair], mode: str) -> DecodedGrid:
    return DecodedGrid(ids=np.zeros((height, width), np.int64), names=(BACKGROUND,), repairs=tuple(repairs), mode=mode)


Run = tuple[str, int]  # (label, count)


def _grid_from_runs(
    runs: list[Run], names: list[str], height: int, width: int, repairs: list[Repair], mode: str
) -> DecodedGrid:
    """Expand runs (already exactly height × width cells) into ids with numpy: O(runs) Python work; labels are
    only looked up (hashed once each), never copied into a per-cell array."""
    index = {name: i for i, name in enumerate(names)}
    counts = np.fromiter((c for _, c in runs), np.int64, count=len(runs))
    ids = np.fromiter((index[label] for label, _ in runs), np.int64, count=len(runs))
    return DecodedGrid(ids=np.repeat(ids, counts).reshape(height, width), names=tuple(names),
                       repairs=tuple(repairs), mode=mode)


def _lenient_names(runs: list[Run]) -> list[str]:
    """``others`` is always id 0; the other labels in first-seen order."""
    seen = dict.fromkeys(label for label, count in runs if count > 0)
    return [BACKGROUND, *(name for name in seen if name != BACKGROUND)]


# --- reference mode ------------------------------------------------------------------------------


def _reference_runs(text: str, format: str) -> list[tuple[str, int]] | None:
    """(label, count) runs exactly as the reference decoders split them; None where they raise."""
    s = text.strip("\n")
    if format == "full":  # decode_mask_l never raises
        return [(token, 1) for token in s.split("| ")]
    rows = s.split("\n ") if format == "rrle" else [s]
    runs = []
    for row in rows:
        for token in row.split("| "):
            parts = token.split(" *")
            if len(parts) != 2:
                return None
            try:
                count = int(parts[1])  # same acceptance as the reference's int(count)
            except ValueError:
                return None
            runs.append((parts[0], count))
    return runs


def _decode_reference(text: str, height: int, width: int, format: str) -> DecodedGrid:
    """decode_mask* → "|".join → translate_sequence (split "|", strip) → pad with last / truncate."""
    total = height * width
    raw = _reference_runs(text, format)
    if raw is None:
        return _background(height, width, [Repair("unparseable", REPAIR_KINDS["unparseable"])], "reference")
    seen: dict[str, None] = {}
    runs: list[Run] = []
    n_cells = 0  # length of the whole (uncapped) flat sequence
    for label, count in raw:
        if count <= 0:
            continue
        pieces = [p.strip() for p in label.split("|")]  # "|".join(...).split("|") splits labels too
        seen.update(dict.fromkeys(pieces))
        if n_cells < total:  # expand only what can survive truncation
            if len(pieces) == 1:
                runs.append((pieces[0], count))
            else:
                reps = min(count, -(-(total - n_cells) // len(pieces)))
                runs.extend((p, 1) for _ in range(reps) for p in pieces)
        n_cells += count * len(pieces)
    if n_cells == 0:  # the reference then translates "".split("|") == [""]: one empty label
        seen, runs, n_cells = {"": None}, [("", 1)], 1
    names = list(seen)
    if BACKGROUND in names:
        names.remove(BACKGROUND)
        names.insert(0, BACKGROUND)
    repairs: list[Repair] = []
    if n_cells < total:
        repairs.append(Repair("short", f"{n_cells} cells for {total}: padded with {_show(runs[-1][0])}"))
        runs.append((runs[-1][0], total - n_cells))
    elif n_cells > total:
        repairs.append(Repair("long", f"{n_cells} cells for {total}: truncated"))
        runs = _truncate(runs, total)
    return _grid_from_runs(runs, names, height, width, repairs, "reference")


def _truncate(runs: list[Run], size: int) -> list[Run]:
    out, n = [], 0
    for label, count in runs:
        if n >= size:
            break
        take = min(count, size - n)
        if take > 0:
            out.append((label, take))
            n += take
    return out


# --- lenient mode --------------------------------------------------------------------------------


def _parse_run(part: str) -> tuple[str | None, int, bool]:
    """(label, count, canonical) of one run; label None when no count is readable."""
    label, sep, digits = part.rpartition(" *")  # fast path: the canonical spelling
    if sep and digits.isascii() and digits.isdigit() and len(digits) <= _MAX_COUNT_DIGITS:
        if label and label[0] not in " \t" and label[-1] not in " \t" and "*" not in label and "\r" not in label:
            return label, int(digits), digits[0] != "0" or len(digits) == 1
    # "{label}[ \t]*\*[ \t]*{digits}[ \t]*": only [ \t0-9] may follow the star, so it is the last "*"; the
    # label takes the shortest prefix (blanks before the star belong to the separator). Linear time.
    star = part.rfind("*")
    m = _RUN_TAIL.fullmatch(part, star + 1) if star >= 0 else None
    if m is None:
        return None, 0, True
    raw = part[:star].rstrip(" \t")
    sep, digits = part[len(raw):m.start(1)], m.group(1)
    label = raw.strip()
    count = int(digits) if len(digits) <= _MAX_COUNT_DIGITS else 10**_MAX_COUNT_DIGITS
    canonical = (
        sep == " *" and raw == label and not m.group(2) and (digits[0] != "0" or len(digits) == 1)
        and not any(c in label for c in _FORBIDDEN_IN_LABEL)
    )
    return label, count, canonical


def _fit(
    runs: list[tuple[str | None, int]], size: int, row: int | None, repairs: list[Repair], flags: dict[str, bool]
) -> list[Run]:
    """Fit runs to exactly ``size`` cells: a deficit goes to the first unparseable run (label None)
    as background, else the last label is repeated; an excess is truncated."""
    good: list[Run] = []
    bad_at: int | None = None
    n_bad = 0
    previous = None
    for label, count in runs:
        if label is None:
            n_bad += 1
            previous = None
            if bad_at is None:
                bad_at = len(good)
            continue
        if count == 0 or label == previous:  # "x *0", or "x *2| x *3" (the encoder writes "x *5")
            flags["noncanonical"] = True
        previous = label
        if count > 0:
            good.append((label, count))
    total = sum(c for _, c in good)
    where = f"row {row}" if row is not None else "sequence"
    if n_bad:
        repairs.append(Repair("bad_run", f"{n_bad} unparseable run(s) in {where}: background", row))
    if total < size:
        deficit = size - total
        if bad_at is not None:
            good.insert(bad_at, (BACKGROUND, deficit))
        else:
            fill = good[-1][0] if good else BACKGROUND
            kind = "row_short" if row is not None else "short"
            repairs.append(Repair(kind, f"{total} cells for {size} in {where}: padded with {_show(fill)}", row))
            good.append((fill, deficit))
    elif total > size:
        kind = "row_long" if row is not None else "long"
        repairs.append(Repair(kind, f"{total} cells for {size} in {where}: truncated", row))
        good = _truncate(good, size)
    return good


def _lenient_runs(line: str, repairs: list[Repair], row: int | None, flags: dict[str, bool]):
    runs: list[tuple[str | None, int]] = []
    if line.count("|") == line.count("| ") and "| " not in (line[:2], line[-2:]) and " | " not in line:
        parts = line.split("| ")  # fast path: canonical separators
    else:
        parts = _RUN_SPLIT.split(line)
        flags["noncanonical"] = True
    for part in parts:
        if not part:
            flags["noncanonical"] = True
            continue
        label, count, canonical = _parse_run(part)
        if not canonical:
            flags["noncanonical"] = True
        if label == "":
            repairs.append(Repair("empty_label", f"run {_show(part)} has no label: background", row))
            label = BACKGROUND
        runs.append((label, count))
    return runs


def _canonical_runs(body: str, height: int, width: int) -> list[Run] | None:
    """Runs of canonical R-RLE that fits the grid exactly (the common case, decoded quickly); else None."""
    rows = body.split("\n ")
    if len(rows) != height:
        return None
    runs: list[Run] = []
    for row in rows:
        n, previous = 0, None
        for token in row.split("| "):
            label, sep, digits = token.rpartition(" *")
            if not (sep and digits.isascii() and digits.isdigit() and digits[0] != "0" and label):
                return None
            if label == previous or "*" in label or "|" in label or "\n" in label or "\r" in label:
                return None
            if label[0].isspace() or label[-1].isspace():
                return None
            count = int(digits)
            runs.append((label, count))
            n += count
            previous = label
        if n != width:
            return None
    return runs


def _decode_lenient_rle(text: str, height: int, width: int, format: str) -> DecodedGrid:
    repairs: list[Repair] = []
    body = text.strip()
    if not body:
        return _background(height, width, [Repair("empty", REPAIR_KINDS["empty"])], "lenient")
    if format == "rrle" and len(body) < 64 * height * width:  # (a cheap bound on pathological input)
        runs = _canonical_runs(body, height, width)
        if runs is not None:
            return _grid_from_runs(runs, _lenient_names(runs), height, width, [], "lenient")
    flags = {"noncanonical": False}
    if any(sep != "\n " for sep in _ROW_SPLIT.findall(body)):
        flags["noncanonical"] = True
    lines = _ROW_SPLIT.split(body)
    if format == "irle":
        if len(lines) > 1:
            flags["noncanonical"] = True
        runs = _fit([r for line in lines for r in _lenient_runs(line, repairs, None, flags)],
                    height * width, None, repairs, flags)
    else:
        rows = [_lenient_runs(line, repairs, i, flags) for i, line in enumerate(lines)]
        if len(rows) == 1 and height > 1 and sum(c for lab, c in rows[0] if lab is not None) > width:
            repairs.append(Repair("single_line", REPAIR_KINDS["single_line"]))
            runs = _fit(rows[0], height * width, None, repairs, flags)
        else:
            if len(rows) > height:
                repairs.append(Repair("rows_long", f"{len(rows)} rows for {height}: dropped the rest"))
                rows = rows[:height]
            runs = [r for i, row in enumerate(rows) for r in _fit(row, width, i, repairs, flags)]
            if len(rows) < height:
                fill = runs[-1][0]
                repairs.append(Repair("rows_short", f"{len(rows)} rows for {height}: padded with {_show(fill)}"))
                runs.append((fill, (height - len(rows)) * width))
    if flags["noncanonical"]:
        repairs.insert(0, Repair("noncanonical", REPAIR_KINDS["noncanonical"]))
    repairs.sort(key=lambda r: -1 if r.row is None else r.row)  # whole-text repairs first, then by row
    return _grid_from_runs(runs, _lenient_names(runs), height, width, repairs, "lenient")


def _decode_lenient_full(text: str, height: int, width: int) -> DecodedGrid:
    repairs: list[Repair] = []
    body = text.strip()
    if not body:
        return _background(height, width, [Repair("empty", REPAIR_KINDS["empty"])], "lenient")
    parts = _CELL_SPLIT.split(body)
    cells = [p for p in parts if p]
    if len(cells) < len(parts):
        repairs.append(Repair("empty_cell", f"dropped {len(parts) - len(cells)} empty cell(s)"))
    flags = {"noncanonical": any(sep != "| " for sep in _CELL_SPLIT.findall(body))}
    flags["noncanonical"] |= any(c in cell for cell in set(cells) for c in _FORBIDDEN_IN_LABEL)
    if not cells:
        return _background(height, width, [*repairs, Repair("empty", REPAIR_KINDS["empty"])], "lenient")
    runs = _fit([(label, sum(1 for _ in group)) for label, group in groupby(cells)], height * width, None, repairs,
                flags)
    if flags["noncanonical"]:
        repairs.insert(0, Repair("noncanonical", REPAIR_KINDS["noncanonical"]))
    return _grid_from_runs(runs, _lenient_names(runs), height, width, repairs, "lenient")


def _check_format_mode(format: str, mode: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown descriptor format {format!r}; accepted: {list(FORMATS)}")
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; accepted: {list(DECODE_MODES)}")


def decode(text: Any, height: int, width: int, *, format: str = "rrle", mode: str = "lenient") -> DecodedGrid:
    """Descriptor text (the part inside ``<seg>…</seg>``) → :class:`DecodedGrid` [height, width].

    Never raises on the text (a non-str is decoded as empty); raises ValueError only for a bad
    ``height``/``width``/``format``/``mode``.
    """
    height, width = _check_shape(height, width)
    _check_format_mode(format, mode)
    if not isinstance(text, str):
        text = ""
    if mode == "reference":
        return _decode_reference(text, height, width, format)
    if format == "full":
        return _decode_lenient_full(text, height, width)
    return _decode_lenient_rle(text, height, width, format)


def decode_rrle(text: str, height: int, width: int, *, mode: str = "lenient") -> DecodedGrid:
    """R-RLE text → :class:`DecodedGrid` (``.grid`` str [height, width], ``.repairs``); never raises."""
    return decode(text, height, width, format="rrle", mode=mode)


def decode_irle(text: str, height: int, width: int, *, mode: str = "lenient") -> DecodedGrid:
    """Image-wise RLE text → :class:`DecodedGrid` [height, width]; never raises."""
    return decode(text, height, width, format="irle", mode=mode)


def decode_descriptors(text: str, height: int, width: int, *, mode: str = "lenient") -> DecodedGrid:
    """Uncompressed descriptor text → :class:`DecodedGrid` [height, width]; never raises."""
    return decode(text, height, width, format="full", mode=mode)


# ---------------------------------------------------------------------------------------------
# Answer wrapping
# ---------------------------------------------------------------------------------------------


def wrap_answer(sentence: str, seg: str) -> str:
    """``"{sentence}\\n<seg>{seg}</seg>"``: the reference training answer (tags are plain text)."""
    return f"{sentence}\n{SEG_START}{seg}{SEG_END}"


def extract_seg(text: str) -> str | None:
    """The text between the first ``<seg>`` and the next ``</seg>`` (to the end when unclosed), as
    the reference's ``split("<seg>")[1].split("</seg>")[0]``; None when there is no ``<seg>``."""
    if not isinstance(text, str) or SEG_START not in text:
        return None
    return text.split(SEG_START, 1)[1].split(SEG_END, 1)[0]


def decode_answer(
    text: Any, height: int, width: int, *, format: str = "rrle", mode: str = "lenient"
) -> DecodedGrid:
    """Generated answer → :class:`DecodedGrid`: extract ``<seg>…</seg>`` and decode; never raises.

    No ``<seg>`` gives an all-background grid (repair ``no_seg``), as the reference.
    """
    height, width = _check_shape(height, width)
    seg = extract_seg(text)
    if seg is None:
        _check_format_mode(format, mode)
        return _background(height, width, [Repair("no_seg", REPAIR_KINDS["no_seg"])], mode)
    decoded = decode(seg, height, width, format=format, mode=mode)
    if SEG_END not in text.split(SEG_START, 1)[1]:
        return dataclasses.replace(
            decoded, repairs=(Repair("unclosed_seg", REPAIR_KINDS["unclosed_seg"]), *decoded.repairs)
        )
    return decoded
