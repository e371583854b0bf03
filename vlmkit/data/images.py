"""Image files named by data files: confined resolution, opening (huge images downscaled) and up-front checks.

Every reader goes through this module: the evaluation readers (``vlmkit.evaluation.readers``), the fine-tuning
data (``vlmkit.train.data``) and the referring-segmentation converter (``vlmkit.seg.refseg_data``).

Confinement. A data file (questions JSON, POPE JSONL, COCO ``instances.json``, a LLaVA conversation file) names
its images; those names are data, not trusted paths:

- a *relative* name must resolve inside its root (the dataset's image folder, the ``--image-folder``, or the
  folder of the conversation file) after following symbolic links: ``../../etc/passwd`` and a link that points
  out of the root are refused;
- an *absolute* name is refused.

Both are accepted only with an explicit opt-in: ``allow_absolute=True`` here, ``allow_absolute_paths=True`` on
the readers, ``--allow-absolute-paths`` on ``vlmkit eval`` / ``vlmkit finetune``. The errors are ``ValueError``s
naming the record, the name and the root.

Huge images. :func:`open_image` downscales an image larger than ``max_pixels`` (default :data:`MAX_PIXELS`,
4096² = 16.8 MP, above the largest default input of any supported processor: Qwen2.5-VL's 12.8 MP) while it is
opened, before any processor sees it: JPEGs are decoded at a reduced scale (``Image.draft``), other formats are
resized straight from the decoded file without an intermediate full-size copy. Each downscale emits an
:class:`ImageDownscaledWarning` naming the file and both sizes. Callers that score at the image's own size
(segmentation evaluation) pass ``max_pixels=None``.

Verification. :func:`verify_image` / :func:`check_images` open every file once before any model is loaded
(PIL ``verify`` plus a decode, at 1/8 scale for JPEGs), so a text file or a truncated PNG in a dataset is
reported up front, naming the record and the file, instead of crashing mid-run.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "MAX_PIXELS", "ImageDownscaledWarning", "resolve_image_path", "relative_name", "open_image", "fit_size",
    "verify_image", "check_images",
]

#: Default pixel budget of :func:`open_image`; larger images are downscaled (aspect ratio kept) at open.
MAX_PIXELS = 4096 * 4096

_OPT_IN = "pass --allow-absolute-paths (allow_absolute=True) to read it anyway"
_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F")


class ImageDownscaledWarning(UserWarning):
    """An image above ``max_pixels`` was downscaled while opening it (the message names the file and sizes)."""


def _where(where: str) -> str:
    return f"{where}: " if where and not where.endswith((": ", ":")) else where


def resolve_image_path(
    name: Any, root: str | os.PathLike, *, allow_absolute: bool = False, where: str = ""
) -> Path:
    """``root / name``, refused (ValueError naming ``where``, the name and the root) when ``name`` is absolute
    or resolves outside ``root`` after following symbolic links, unless ``allow_absolute``.

    The file need not exist (a missing file is reported when it is opened or verified). The returned path is
    the join, not the resolved link target, so it reads like the data file's name.
    """
    w = _where(where)
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{w}image path must be a non-empty string, got {name!r}")
    p = Path(name)
    if p.is_absolute():
        if not allow_absolute:
            raise ValueError(f"{w}image path {name!r} is absolute; data files may only name images relative to "
                             f"{os.fspath(root)!r}; {_OPT_IN}")
        return p
    base = Path(root)
    joined = base / p
    if not allow_absolute and not _inside(joined, base):
        raise ValueError(f"{w}image path {name!r} resolves to {os.path.realpath(joined)!r}, outside "
                         f"{os.fspath(base)!r} (through '..' or a symbolic link); {_OPT_IN}")
    return joined


def _inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` lies in ``root`` once both are resolved (symbolic links followed, ``..`` collapsed)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    try:
        return os.path.commonpath([real, real_root]) == real_root
    except ValueError:  # different drives
        return False


def relative_name(name: Any, *, allow_absolute: bool = False, where: str = "") -> str:
    """``name`` if it is a relative path that stays below its folder (no leading ``..`` after normalising);
    ValueError naming it otherwise, unless ``allow_absolute``. A lexical check for names written into data
    files (no root on disk to resolve links against); the reader of that file confines them again."""
    w = _where(where)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{w}image name must be a non-empty string, got {name!r}")
    if allow_absolute:
        return name
    norm = os.path.normpath(name)
    ups = tuple(".." + sep for sep in (os.sep, os.altsep) if sep)
    if os.path.isabs(name) or norm == ".." or norm.startswith(ups):
        raise ValueError(f"{w}image name {name!r} is absolute or leaves its folder; {_OPT_IN}")
    return name


def fit_size(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    """(W, H) scaled down, aspect ratio kept, to at most ``max_pixels`` pixels (each side >= 1); unchanged
    when it already fits or ``max_pixels`` is None."""
    w, h = int(size[0]), int(size[1])
    if max_pixels is None or w * h <= max_pixels:
        return w, h
    s = math.sqrt(max_pixels / (w * h))
    nw, nh = max(1, int(w * s)), max(1, int(h * s))
    while nw * nh > max_pixels:  # float rounding
        if nw >= nh:
            nw -= 1
        else:
            nh -= 1
    return nw, nh


def open_image(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    allow_absolute: bool = False,
    where: str = "",
    mode: str | None = "RGB",
    max_pixels: int | None = MAX_PIXELS,
    resample: int | None = None,
):
    """Open an image file as a loaded PIL image (converted to ``mode``; None keeps the file's mode).

    ``root``: resolve ``path`` inside it first (:func:`resolve_image_path`); None opens ``path`` as given (a
    path a reader already resolved). Images above ``max_pixels`` are downscaled while opening, with an
    :class:`ImageDownscaledWarning` (see the module docstring); ``resample`` defaults to NEAREST for mask-like
    modes (``1``, ``L``, ``P``, ``I``, ``F``) kept as they are (``mode=None``), else BICUBIC.
    Errors: FileNotFoundError (no such file), ValueError (escape, or not a readable image), each naming
    ``where`` and the file.
    """
    from PIL import Image

    w = _where(where)
    if root is not None:
        path = resolve_image_path(path, root, allow_absolute=allow_absolute, where=where)
    src = os.fspath(path)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{w}image not found: {src!r}")
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # it is about to be downscaled; PIL's own >178 MP bomb error still applies
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                size = im.size
                target = fit_size(size, max_pixels)
                if target == size:
                    return im.convert(mode) if mode is not None else im.copy()
                if resample is None:
                    resample = Image.NEAREST if mode is None and im.mode in _MASK_MODES else Image.BICUBIC
                im.draft(mode if mode in ("RGB", "L") else None, target)  # JPEG: decode at a reduced scale
                src_im = im.convert(mode) if mode is not None and im.mode in ("P", "PA", "1") else im
                out = src_im.resize(target, resample)  # decodes once, no full-size copy
                out = out.convert(mode) if mode is not None and out.mode != mode else out
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"{w}cannot read image {src!r} ({err})") from err
    warnings.warn(f"{w}image {src!r} is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP): downscaled to "
                  f"{target[0]}x{target[1]} when opened (max_pixels={max_pixels})", ImageDownscaledWarning,
                  stacklevel=2)
    return out


def verify_image(path: str | os.PathLike, *, where: str = "", decode: bool = True) -> tuple[int, int]:
    """Check that ``path`` is a readable image → its (W, H). PIL ``verify`` (structure, PNG checksums), then,
    with ``decode``, a full decode (at 1/8 scale for JPEGs) that catches truncated files. FileNotFoundError /
    ValueError naming ``where`` and the file otherwise."""
    from PIL import Image

    w = _where(where)
    src = os.fspath(path)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{w}image not found: {src!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                size = im.size
                im.verify()
            if decode:
                with Image.open(src) as im:
                    im.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
                    im.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"{w}cannot read image {src!r} ({type(err).__name__}: {err})") from err
    return size


def _record_images(record: Any, index: int) -> list[tuple[str, Any]]:
    """(where, path) of every image file a record names; PIL images (Hugging Face datasets) are skipped."""
    if isinstance(record, tuple) and len(record) == 2 and isinstance(record[0], str):
        where, paths = record
        paths = paths if isinstance(paths, (list, tuple)) else [paths]
        return [(where, p) for p in paths]
    if isinstance(record, dict):
        rid = record.get("id", record.get("doc_id", index))
        src = record.get("image")
        paths = src if isinstance(src, (list, tuple)) else [src]
        return [(f"record {index} (id {rid!r})", p) for p in paths if isinstance(p, (str, os.PathLike))]
    if hasattr(record, "images"):
        rid = getattr(record, "id", index)
        names = [*getattr(record, "images", []), *getattr(record, "masks", [])]
        return [(f"record {index} (id {rid!r})", p) for p in names]
    raise TypeError(f"check_images: record {index} is a {type(record).__name__}; expected a (where, path) pair, "
                    "a doc dict with 'image', or an object with 'images'")


def check_images(
    records: Iterable[Any],
    root: str | os.PathLike | None = None,
    *,
    allow_absolute: bool = False,
    decode: bool = True,
    source: str = "",
) -> int:
    """Verify every image the records name (each distinct file once) → how many files were checked.

    ``records``: ``(where, path)`` / ``(where, [paths])`` pairs, reader docs (``{"id", "image"}``) or
    conversations (``.id``, ``.images``, ``.masks``). Paths are taken as the reader resolved them; with
    ``root`` each must also resolve inside it (:func:`resolve_image_path`). The first bad file raises
    FileNotFoundError / ValueError naming ``source``, the record and the file.
    """
    seen: set[str] = set()
    prefix = f"{source}: " if source else ""
    for i, record in enumerate(records):
        for where, path in _record_images(record, i):
            label = f"{prefix}{where}"
            key = os.fspath(path)
            if root is not None and not allow_absolute and not _inside(key, root):
                raise ValueError(f"{label}: image {key!r} resolves to {os.path.realpath(key)!r}, outside "
                                 f"{os.fspath(root)!r}; {_OPT_IN}")
            if key in seen:
                continue
            verify_image(key, where=label, decode=decode)
            seen.add(key)
    return len(seen)
