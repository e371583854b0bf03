"""Referring-segmentation annotations → LLaVA conversation JSON with Text4Seg answers.

Input: COCO instances (``images``, ``annotations`` whose ``segmentation`` is polygons, compressed or
uncompressed RLE) and RefCOCO-style refs (``[{ref_id, ann_id, image_id, split, sentences: [{sent}]}]``)
as JSON, or as the ``refs(unc).p`` pickles RefCOCO ships (read by ``vlmkit.data.safe_pickle``: builtin
containers and scalars only, bounded by the file's size). Output, as ``playground/data/create_json/create_refcoco.py``
of the reference (``mc-lan/Text4Seg`` @ d6540b6; Text4Seg, arXiv 2410.09855)::

    [{"id", "image", "height": grid, "width": grid,
      "conversations": [{"from": "human", "value": "<image>\\n{question}"},
                        {"from": "gpt", "value": "{answer}\\n<seg>{R-RLE}</seg>"}, ...]}]

``height``/``width`` are the descriptor grid size (the reference's field names). Each round picks a
random sentence of the ref, a random ``QUESTION_PARTIAL`` and ``ANSWER_PARTIAL`` template (seeded
``random.Random``, draws in the reference's order); rounds after the first use a random ref of the
same image. The reference uses ``rounds=2, repeats=2``; the defaults here are one round, one pass.

[choice] Labels: the reference puts the sentence verbatim into the grid; a sentence containing
``|``, ``*`` or a line break would corrupt R-RLE (the reference ``decode_mask`` / ``translate_sequence`` split
on them), so :func:`sanitize_label` replaces those with spaces and collapses whitespace; the sanitized
text is used in the question, answer and grid alike. A sentence that is empty or ``others`` after that is
skipped (with a warning).
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmkit.seg.rrle import BACKGROUND, FORMATS, GRID_RANGE, encode, wrap_answer

__all__ = [
    "QUESTION_PARTIAL", "ANSWER_PARTIAL", "make_question", "sanitize_label", "load_refs", "load_instances",
    "polygon_to_mask", "annotation_mask", "refseg_to_llava", "write_refseg_llava", "main",
]

#: Referring-segmentation questions of the reference (``question_answer_list.py``).
QUESTION_PARTIAL = [
    "Please segment only the [class_name] in the image.",
    "Can you segment the [class_name] in the image?",
    "Where is the [class_name] in this picture? Please respond with segmentation mask.",
    "Where is '[class_name]' in this image? Please output segmentation mask.",
    "Could you provide the segmentation mask for '[class_name]' in this image?",
    "Please segment the image and highlight '[class_name]'.",
]
#: Answer sentences of the reference (the last one repeats the fifth, as there).
ANSWER_PARTIAL = [
    "Sure, here is the segmentation mask for '[class_name]':",
    "Here is the segmentation map focusing on the [class_name]:",
    "Here is the segmentation mask highlighting the [class_name]:",
    "The segmentation map for '[class_name]' is:",
    "The segmentation mask for '[class_name]' is shown below:",
    "Sure, Here's the segmentation of the [class_name]:",
    "Sure, the segmented output for '[class_name]' is:",
    "Certainly, the segmentation map for '[class_name]' is:",
    "Certainly, here is the segmentation mask for '[class_name]':",
    "The segmentation mask for '[class_name]' is shown below:",
]
_PLACEHOLDER = "[class_name]"


def make_question(expression: str, template: int = 0) -> str:
    """The ``template``-th ``QUESTION_PARTIAL`` question about ``expression`` (an inference prompt)."""
    if not 0 <= template < len(QUESTION_PARTIAL):
        raise ValueError(f"template must be in [0, {len(QUESTION_PARTIAL) - 1}], got {template!r}")
    return QUESTION_PARTIAL[template].replace(_PLACEHOLDER, expression)


_UNSAFE = re.compile(r"[|*\r\n\t]")
_SPACES = re.compile(r" {2,}")


def sanitize_label(text: str) -> str:
    """``text`` made safe as a descriptor label: ``|``, ``*``, tabs and line breaks → spaces, runs of
    spaces collapsed, stripped."""
    return _SPACES.sub(" ", _UNSAFE.sub(" ", str(text))).strip()


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

def _read_json_or_pickle(path: str | os.PathLike) -> Any:
    path = Path(path)
    if path.suffix.lower() in (".p", ".pkl", ".pickle"):
        from vlmkit.data.safe_pickle import load_refs_pickle

        # RefCOCO's pickles were written by Python 2: its str are decoded as latin-1. Builtin containers and
        # scalars only, size-bounded; errors name the file (RefsPickleError, a ValueError and UnpicklingError)
        return load_refs_pickle(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{os.fspath(path)}: not a UTF-8 JSON file ({err})") from err


def load_refs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """RefCOCO-style refs from JSON or from a ``refs(*).p`` pickle (restricted unpickler)."""
    refs = _read_json_or_pickle(path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{os.fspath(path)!r} does not hold a list of ref dicts")
    return refs


def load_instances(path: str | os.PathLike) -> dict[str, Any]:
    """COCO instances JSON (``images`` and ``annotations`` are required)."""
    data = _read_json_or_pickle(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{os.fspath(path)!r} is not a COCO instances file (needs 'images' and 'annotations')")
    return data


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def _poly_counts(xy: np.ndarray, height: int, width: int) -> list[int]:
    """Uncompressed COCO RLE counts of one polygon, pixel-identical to pycocotools' ``frPyObjects``.

    The boundary is traced on a 5× upsampled lattice, its crossings of pixel-column centres are
    snapped down to pixel rows, and the column-major mask toggles at each crossing.
    """
    scale = 5.0
    x = np.trunc(scale * xy[:, 0] + 0.5).astype(np.int64)  # C's (int) truncates toward zero
    y = np.trunc(scale * xy[:, 1] + 0.5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    for j in range(len(xy)):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        n = max(dx, dy)
        t = np.arange(n + 1)
        if flip:
            t = n - t
        if dx >= dy:
            s = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + 0.5).astype(np.int64))
        else:
            s = (xe - xs) / dy
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    change = np.flatnonzero(u[1:] != u[:-1]) + 1
    uj, up, vj, vp = u[change], u[change - 1], v[change], v[change - 1]
    xd = (np.where(uj < up, uj, uj - 1) + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = (np.minimum(vj, vp)[keep] + 0.5) / scale - 0.5
    yd = np.ceil(np.clip(yd, 0, height))
    a = np.sort(np.append(xd[keep].astype(np.int64) * height + yd.astype(np.int64), height * width))
    diffs = np.diff(a, prepend=0).tolist()
    counts = [diffs[0]]
    j = 1
    while j < len(diffs):  # a zero-length run merges its neighbours
        if diffs[j] > 0:
            counts.append(diffs[j])
            j += 1
        else:
            j += 1
            if j < len(diffs):
                counts[-1] += diffs[j]
                j += 1
    return counts


def polygon_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` → bool [height, width] (union), as pycocotools.

    As ``frPyObjects``, a list whose first entry has exactly 4 numbers is read as ``[x, y, w, h]`` boxes.
    """
    from vlmkit.data.rle import rle_decode

    out = np.zeros((height, width), dtype=bool)
    if not polygons:
        return out
    boxes = len(polygons[0]) == 4
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64)
        if boxes:
            x0, y0, w, h = xy
            xy = np.array([x0, y0, x0, y0 + h, x0 + w, y0 + h, x0 + w, y0])
        if xy.size < 2 or xy.size % 2:
            raise ValueError(f"a polygon needs an even number (>= 2) of coordinates, got {xy.size}")
        counts = _poly_counts(xy.reshape(-1, 2), height, width)
        out |= rle_decode({"size": [height, width], "counts": counts})
    return out


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, an RLE dict, or a list of RLE dicts) → bool [height, width]:
    the union of its parts clipped to {0, 1}, as the reference data scripts."""
    from vlmkit.data.rle import rle_decode

    if isinstance(segmentation, dict):
        parts = [segmentation]
    elif isinstance(segmentation, (list, tuple)):
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        if all(isinstance(p, dict) for p in segmentation):
            parts = list(segmentation)
        else:
            return polygon_to_mask(segmentation, height, width)
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
    out = np.zeros((height, width), dtype=bool)
    for rle in parts:
        mask = rle_decode(rle)
        if mask.shape != (height, width):
            raise ValueError(f"RLE size {list(mask.shape)} does not match the image [{height}, {width}]")
        out |= mask
    return out


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def _grid_shape(grid: Any) -> tuple[int, int]:
    lo, hi = GRID_RANGE
    if isinstance(grid, bool) or not isinstance(grid, int) or not lo <= grid <= hi:
        raise ValueError(f"grid must be an int in [{lo}, {hi}] (reference: 16, 24 or 32), got {grid!r}")
    return grid, grid


def _sentences(ref: dict[str, Any], skipped: list[str]) -> list[str]:
    out = []
    for s in ref.get("sentences", []):
        raw = s.get("sent", s.get("raw", "")) if isinstance(s, dict) else str(s)
        label = sanitize_label(raw)
        if not label or label == BACKGROUND:
            skipped.append(repr(raw))
            continue
        out.append(label)
    return out


def refseg_to_llava(
    instances: dict[str, Any] | str | os.PathLike,
    refs: Sequence[dict[str, Any]] | str | os.PathLike,
    *,
    grid: int = 16,
    split: str | None = None,
    rounds: int = 1,
    repeats: int = 1,
    per_sentence: bool = False,
    seed: int = 0,
    image_prefix: str = "",
    format: str = "rrle",
    allow_absolute_paths: bool = False,
) -> list[dict[str, Any]]:
    """Convert refs (of ``split``, or all) into LLaVA records with Text4Seg answers.

    One record per ref (per sentence with ``per_sentence``), ``repeats`` passes over the images,
    ``rounds`` question/answer rounds per record. ``grid``: descriptor grid side (16 default; 24,
    32). ``format``: ``"rrle"`` (``"irle"``/``"full"`` for the ablations). An instances ``file_name`` (and
    ``image_prefix``) must be a relative path that stays below its folder (``vlmkit.data.images.relative_name``)
    unless ``allow_absolute_paths``: the records name images that ``vlmkit finetune`` opens.
    """
    if isinstance(instances, (str, os.PathLike)):
        instances = load_instances(instances)
    if isinstance(refs, (str, os.PathLike)):
        refs = load_refs(refs)
    gh, gw = _grid_shape(grid)
    for name, v in (("rounds", rounds), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")

    images = {img["id"]: img for img in instances["images"]}
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    skipped: list[str] = []
    by_image: dict[Any, list[tuple[dict[str, Any], list[str]]]] = {}
    for ref in refs:
        if split is not None and ref.get("split") != split:
            continue
        for key, table in (("image_id", images), ("ann_id", anns)):
            if ref.get(key) not in table:
                raise ValueError(f"ref {ref.get('ref_id')!r} names {key} {ref.get(key)!r}, absent from the instances")
        sentences = _sentences(ref, skipped)
        if sentences:
            by_image.setdefault(ref["image_id"], []).append((ref, sentences))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} sentence(s) unusable as labels: {skipped[:5]}", stacklevel=2)

    small: dict[Any, np.ndarray] = {}

    def grid_mask(ref: dict[str, Any]) -> np.ndarray:
        if ref["ann_id"] not in small:
            from vlmkit.seg.rrle import downsample_mask

            img = images[ref["image_id"]]
            mask = annotation_mask(anns[ref["ann_id"]]["segmentation"], int(img["height"]), int(img["width"]))
            small[ref["ann_id"]] = downsample_mask(mask, gh, gw)
        return small[ref["ann_id"]]

    from vlmkit.data.images import relative_name

    names = {}
    for image_id in by_image:
        name = images[image_id].get("file_name")
        name = f"{image_prefix.rstrip('/')}/{name}" if image_prefix and isinstance(name, str) else name
        names[image_id] = relative_name(name, allow_absolute=allow_absolute_paths,
                                        where=f"instances image id={image_id!r}")
    rng = random.Random(seed)
    records = []
    for rep in range(repeats):
        for image_id, img_refs in by_image.items():
            for ref, sentences in img_refs:
                for k in range(len(sentences) if per_sentence else 1):
                    turns = []
                    for rnd in range(rounds):
                        cur, cur_sents = (ref, sentences) if rnd == 0 else rng.choice(img_refs)
                        label = sentences[k] if (rnd == 0 and per_sentence) else rng.choice(cur_sents)
                        question = rng.choice(QUESTION_PARTIAL).replace(_PLACEHOLDER, label)
                        seg = encode(np.where(grid_mask(cur), label, BACKGROUND), format)
                        answer = wrap_answer(rng.choice(ANSWER_PARTIAL).replace(_PLACEHOLDER, label), seg)
                        turns.append({"from": "human", "value": f"<image>\n{question}" if rnd == 0 else question})
                        turns.append({"from": "gpt", "value": answer})
                    rid = f"{image_id}_{ref.get('ref_id')}" + (f"_{k}" if per_sentence else "")
                    records.append({
                        "id": rid + (f"_r{rep}" if repeats > 1 else ""),
                        "image": names[image_id],
                        "height": gh,
                        "width": gw,
                        "conversations": turns,
                    })
    return records


def write_refseg_llava(
    instances: str | os.PathLike, refs: str | os.PathLike, out: str | os.PathLike, **kwargs: Any
) -> Path:
    """:func:`refseg_to_llava` on files, written as JSON to ``out``; returns the path."""
    records = refseg_to_llava(instances, refs, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlmkit.seg.refseg_data --instances I --refs R --out O [--grid 16] [--split train] ...``"""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", required=True)
    p.add_argument("--refs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--split", default=None)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--per-sentence", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-prefix", default="")
    p.add_argument("--format", default="rrle", choices=list(FORMATS))
    p.add_argument("--allow-absolute-paths", action="store_true",
                   help="accept image file names that are absolute or leave their folder (default: refused)")
    a = p.parse_args(argv)
    path = write_refseg_llava(
        a.instances, a.refs, a.out, grid=a.grid, split=a.split, rounds=a.rounds, repeats=a.repeats,
        per_sentence=a.per_sentence, seed=a.seed, image_prefix=a.image_prefix, format=a.format,
        allow_absolute_paths=a.allow_absolute_paths,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
