"""The ``shapes`` synthetic benchmark: seeded images of coloured shapes with exact masks, VQA
questions and referring expressions, plus writers for the standard on-disk formats.

Each image has a grey background (uniform, or with per-pixel noise) and 1..``max_shapes`` objects
(circle / square / triangle), each in a different colour of :data:`COLORS`, painted back to front
without anti-aliasing. An
object's mask is exactly the pixels that show its colour: its own raster minus what later objects
cover. Placements that would leave an earlier object less than :data:`MIN_VISIBLE_FRACTION`
visible are rejected, so no object is (nearly) hidden. A shape's extent (side of its bounding
square) is drawn from ``[size // 4, 7 * size // 16]`` pixels: 16..28 px at the default 64×64
(min 16 px), so every mask still covers several cells after quantisation to a 16×16 grid.

All texts use the closed vocabulary :data:`VOCAB_WORDS`: :func:`tokenize` (lowercase, split into
runs of letters/digits and single punctuation marks) turns any question, answer or referring
expression into words of that list. Answers are single words: a colour, a shape, a digit for counts
("2"), "yes"/"no", or "left"/"right".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from vlmkit.data.rle import rle_encode

__all__ = [
    "COLORS", "SHAPES", "CATEGORY_IDS", "QUESTION_TYPES", "VOCAB_WORDS", "BACKGROUNDS",
    "BACKGROUND_RGB", "NOISE_AMPLITUDE", "MIN_SIZE", "MIN_VISIBLE_FRACTION", "ShapeObject", "ShapesSample", "tokenize", "shape_mask",
    "extent_range", "draw_questions", "generate", "generate_one", "question_id", "annotation_id", "write_images",
    "write_vqav2", "write_coco_refs", "write_llava", "write_dataset", "LLAVA_FORMATS", "MULTI_PREFIX",
    "multi_question", "multi_vocabulary", "draw_multi", "write_multi",
]

# ---------------------------------------------------------------------------------------------
# Constants: palette, geometry limits, text templates, vocabulary
# ---------------------------------------------------------------------------------------------

#: Object colours, pairwise far apart in RGB and from the (noisy) grey background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 50, 170),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CATEGORY_IDS: dict[str, int] = {shape: i + 1 for i, shape in enumerate(SHAPES)}
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "left_right")
BACKGROUNDS: tuple[str, ...] = ("plain", "noise")
LLAVA_FORMATS: tuple[str, ...] = ("single-turn", "multi-turn")  # write_llava: one question per record, or per image

BACKGROUND_RGB: tuple[int, int, int] = (128, 128, 128)
NOISE_AMPLITUDE = 16  # "noise" background: grey ± this much per pixel, never a palette colour
MIN_SIZE = 32  # smallest image side; shapes are then >= 8 px
MIN_VISIBLE_FRACTION = 0.7  # each object keeps >= 70 % of its own raster visible
MAX_PLACEMENT_TRIES = 100  # per object; when all fail the image keeps fewer objects

QUESTION_TEMPLATES: dict[str, str] = {
    "count": "How many shapes are there?",
    "shape": "What shape is the {color} object?",
    "color": "What color is the {shape}?",
    "exists": "Is there {article} {color} {shape}?",
    "pair": "Is the {a} left or right of the {b}?",
    "side": "Which side of the image is the {a} on?",
}
REF_TEMPLATES: dict[str, str] = {
    "color_shape": "the {color} {shape}",
    "color": "the {color} shape",
    "shape": "the {shape}",
    "side_shape": "the {side} {shape}",
    "extreme": "the {extreme} shape",
}
ANSWER_TYPES: dict[str, str] = {"count": "number", "exists": "yes/no"}  # VQAv2; else "other"

_Rng = np.random.Generator
_QA = dict[str, str]  # {"question", "answer", "type"}

_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words and single punctuation marks ("shapes?" → shapes, ?)."""
    return _TOKEN_RE.findall(text.lower())


def _vocabulary() -> list[str]:
    """Every word any template, fill-in or answer can produce, sorted."""
    words = set(COLORS) | set(SHAPES) | {"yes", "no", "left", "right", "leftmost", "rightmost", "a", "an"}
    words |= {str(k) for k in range(1, len(COLORS) + 1)}
    for template in (*QUESTION_TEMPLATES.values(), *REF_TEMPLATES.values()):
        words |= set(tokenize(re.sub(r"\{\w+\}", " ", template)))
    return sorted(words)


#: Closed vocabulary (lowercase, sorted) of all questions, answers and referring expressions.
VOCAB_WORDS: list[str] = _vocabulary()

# ---------------------------------------------------------------------------------------------
# Data classes
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ShapeObject:
    """One painted object.

    ``mask`` bool [H, W]: the pixels showing this object (after occlusion by later objects).
    ``bbox`` [x, y, w, h]: tight box of ``mask`` in pixels. ``center`` (x, y): centre of the
    shape's unoccluded bounding square, used for left/right relations.
    """

    shape: str
    color: str
    bbox: list[int]
    mask: np.ndarray
    center: tuple[float, float]

    @property
    def name(self) -> str:
        """Colour and shape, e.g. "red circle" (unique within an image: colours are distinct)."""
        return f"{self.color} {self.shape}"


@dataclass(eq=False)
class ShapesSample:
    """One image with its objects (paint order, back to front) and annotations.

    ``questions``: list of {"question", "answer", "type"} with type in :data:`QUESTION_TYPES`.
    ``refs``: list of {"sentence", "object_index"}; each sentence names exactly one object.
    """

    image: Image.Image
    objects: list[ShapeObject]
    questions: list[dict[str, str]]
    refs: list[dict[str, Any]]
    image_id: int
    file_name: str


# ---------------------------------------------------------------------------------------------
# Geometry and rendering
# ---------------------------------------------------------------------------------------------


def extent_range(size: int) -> tuple[int, int]:
    """Inclusive (min, max) extent in pixels of a shape's bounding square for an image side ``size``."""
    return size // 4, (7 * size) // 16


def shape_mask(shape: str, x0: int, y0: int, extent: int, size: int) -> np.ndarray:
    """Bool [size, size] raster of ``shape`` inscribed in the square (x0, y0, extent).

    A pixel is painted when its centre lies inside the shape: the square fills the box, the circle
    is inscribed in it, the triangle has its apex at the top middle and its base on the bottom edge.
    """
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    in_box = (xs >= x0) & (xs < x0 + extent) & (ys >= y0) & (ys < y0 + extent)
    cx, cy, r = x0 + extent / 2, y0 + extent / 2, extent / 2
    if shape == "square":
        return in_box
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "triangle":
        return in_box & (np.abs(xs - cx) <= (ys - y0) / 2)
    raise ValueError(f"unknown shape {shape!r}; accepted: {SHAPES}")


@dataclass(eq=False)
class _Placed:
    """A placed object before occlusion: its raster and the box it was drawn in."""

    shape: str
    color: str
    x0: int
    y0: int
    extent: int
    raster: np.ndarray


def _random_placement(rng: np.random.Generator, size: int, color: str) -> _Placed:
    """Draw a shape kind, extent and position uniformly."""
    lo, hi = extent_range(size)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    extent = int(rng.integers(lo, hi + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - extent + 1, size=2))
    return _Placed(shape, color, x0, y0, extent, shape_mask(shape, x0, y0, extent, size))


def _keeps_visible(candidate: np.ndarray, placed: list[_Placed], visible: list[np.ndarray]) -> bool:
    """True when painting ``candidate`` on top leaves every earlier object visible enough."""
    return all(
        (vis & ~candidate).sum() >= MIN_VISIBLE_FRACTION * obj.raster.sum()
        for obj, vis in zip(placed, visible)
    )


def _place_objects(
    rng: _Rng, size: int, n_objects: int
) -> tuple[list[_Placed], list[np.ndarray]]:
    """Place up to ``n_objects`` objects in distinct colours; return them and their visible masks."""
    colors = [str(c) for c in rng.permutation(list(COLORS))[:n_objects]]
    placed: list[_Placed] = []
    visible: list[np.ndarray] = []
    for color in colors:
        for _ in range(MAX_PLACEMENT_TRIES):
            candidate = _random_placement(rng, size, color)
            if _keeps_visible(candidate.raster, placed, visible):
                break
        else:  # too crowded: keep what fits (the first object always fits)
            break
        visible = [vis & ~candidate.raster for vis in visible] + [candidate.raster.copy()]
        placed.append(candidate)
    return placed, visible


def _background(size: int, background: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3] canvas: uniform grey, or grey with per-pixel grey noise."""
    canvas = np.empty((size, size, 3), dtype=np.int16)
    canvas[...] = BACKGROUND_RGB
    if background == "noise":
        canvas += rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(size, size, 1), dtype=np.int16)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _render(placed: list[_Placed], canvas: np.ndarray) -> Image.Image:
    """Paint the objects back to front onto ``canvas`` (no anti-aliasing)."""
    for obj in placed:
        canvas[obj.raster] = COLORS[obj.color]
    return Image.fromarray(canvas)  # uint8 [H, W, 3] -> RGB


def _mask_bbox(mask: np.ndarray) -> list[int]:
    """Tight [x, y, w, h] box of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _to_object(placed: _Placed, mask: np.ndarray) -> ShapeObject:
    """Public view of a placed object given its visible mask."""
    center = (placed.x0 + placed.extent / 2, placed.y0 + placed.extent / 2)
    return ShapeObject(placed.shape, placed.color, _mask_bbox(mask), mask, center)


# ---------------------------------------------------------------------------------------------
# Questions and referring expressions
# ---------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    """One uniformly chosen element of a non-empty sequence."""
    return items[int(rng.integers(len(items)))]


def _qa(question: str, answer: str, qtype: str) -> dict[str, str]:
    """A question record as stored in :attr:`ShapesSample.questions`."""
    return {"question": question, "answer": answer, "type": qtype}


def _article(word: str) -> str:
    """Indefinite article for ``word`` ("an orange", "a red")."""
    return "an" if word[0] in "aeiou" else "a"


def _pair_margin(size: int) -> float:
    """Minimum horizontal distance between centres for a left/right relation to count as clear."""
    return size / 8


def _side_margin(size: int) -> float:
    """Minimum distance of a centre from the vertical midline for "which side" questions."""
    return size / 16


def _count_questions(rng: _Rng, objects: list[ShapeObject], size: int) -> list[_QA]:
    return [_qa(QUESTION_TEMPLATES["count"], str(len(objects)), "count")]


def _shape_questions(rng: _Rng, objects: list[ShapeObject], size: int) -> list[_QA]:
    obj = _pick(rng, objects)  # colours are distinct, so "the <colour> object" is unambiguous
    return [_qa(QUESTION_TEMPLATES["shape"].format(color=obj.color), obj.shape, "shape")]


def _color_questions(rng: _Rng, objects: list[ShapeObject], size: int) -> list[_QA]:
    unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if not unique:
        return []
    obj = _pick(rng, unique)
    return [_qa(QUESTION_TEMPLATES["color"].format(shape=obj.shape), obj.color, "color")]


def _exists_questions(rng: _Rng, objects: list[ShapeObject], size: int) -> list[_QA]:
    """One "yes" and one "no" question per image (balanced); half the negatives share a colour or shape."""
    present = {(o.color, o.shape) for o in objects}
    absent = [combo for combo in product(COLORS, SHAPES) if combo not in present]
    hard = [c for c in absent if any(c[0] == p[0] or c[1] == p[1] for p in present)]
    pool = hard if hard and rng.random() < 0.5 else absent
    template = QUESTION_TEMPLATES["exists"]
    yes = _pick(rng, objects)
    no_color, no_shape = _pick(rng, pool)
    return [
        _qa(template.format(article=_article(yes.color), color=yes.color, shape=yes.shape), "yes", "exists"),
        _qa(template.format(article=_article(no_color), color=no_color, shape=no_shape), "no", "exists"),
    ]


def _left_right_questions(rng: _Rng, objects: list[ShapeObject], size: int) -> list[_QA]:
    """A relation between two clearly separated objects and the image side of one object, when clear."""
    questions = []
    pairs = [
        (a, b) for a in objects for b in objects
        if a is not b and abs(a.center[0] - b.center[0]) >= _pair_margin(size)
    ]
    if pairs:
        a, b = _pick(rng, pairs)
        answer = "left" if a.center[0] < b.center[0] else "right"
        questions.append(_qa(QUESTION_TEMPLATES["pair"].format(a=a.name, b=b.name), answer, "left_right"))
    sided = [o for o in objects if abs(o.center[0] - size / 2) >= _side_margin(size)]
    if sided:
        obj = _pick(rng, sided)
        answer = "left" if obj.center[0] < size / 2 else "right"
        questions.append(_qa(QUESTION_TEMPLATES["side"].format(a=obj.name), answer, "left_right"))
    return questions


_QUESTION_BUILDERS: tuple[Callable[..., list[dict[str, str]]], ...] = (
    _count_questions, _shape_questions, _color_questions, _exists_questions, _left_right_questions,
)


def draw_questions(rng: _Rng, objects: list[ShapeObject], size: int) -> list[_QA]:
    """One draw of every applicable question kind for an image, in random order (4..7 per image)."""
    questions = [q for build in _QUESTION_BUILDERS for q in build(rng, objects, size)]
    return [questions[i] for i in rng.permutation(len(questions))]


def _extreme_side(obj: ShapeObject, group: list[ShapeObject], margin: float) -> str | None:
    """"left"/"right" when ``obj`` is clearly left/right of every other member of ``group``."""
    others = [o.center[0] for o in group if o is not obj]
    if not others:
        return None
    if obj.center[0] <= min(others) - margin:
        return "left"
    if obj.center[0] >= max(others) + margin:
        return "right"
    return None


def _ref_sentences(obj: ShapeObject, objects: list[ShapeObject], size: int) -> list[str]:
    """Every template expression that names ``obj`` and no other object."""
    same_shape = [o for o in objects if o.shape == obj.shape]
    sentences = [
        REF_TEMPLATES["color_shape"].format(color=obj.color, shape=obj.shape),
        REF_TEMPLATES["color"].format(color=obj.color),
    ]
    if len(same_shape) == 1:
        sentences.append(REF_TEMPLATES["shape"].format(shape=obj.shape))
    side = _extreme_side(obj, same_shape, _pair_margin(size)) if len(same_shape) == 2 else None
    if side:
        sentences.append(REF_TEMPLATES["side_shape"].format(side=side, shape=obj.shape))
    extreme = _extreme_side(obj, objects, _pair_margin(size))
    if extreme:
        sentences.append(REF_TEMPLATES["extreme"].format(extreme=extreme + "most"))
    return sentences


def _refs(objects: list[ShapeObject], size: int) -> list[dict[str, Any]]:
    return [
        {"sentence": sentence, "object_index": i}
        for i, obj in enumerate(objects)
        for sentence in _ref_sentences(obj, objects, size)
    ]


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _check_options(size: int, max_shapes: int, background: str) -> None:
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE}, got {size!r}")
    if not isinstance(max_shapes, int) or not 1 <= max_shapes <= len(COLORS):
        raise ValueError(f"max_shapes must be an int in [1, {len(COLORS)}], got {max_shapes!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")


def generate_one(
    rng: np.random.Generator,
    image_id: int,
    size: int = 64,
    max_shapes: int = 4,
    background: str = "plain",
) -> ShapesSample:
    """One sample drawn from ``rng``: a [size, size] RGB image with 1..max_shapes objects."""
    _check_options(size, max_shapes, background)
    n_objects = int(rng.integers(1, max_shapes + 1))
    placed, visible = _place_objects(rng, size, n_objects)
    canvas = _background(size, background, np.random.default_rng(int(rng.integers(2**32))))
    objects = [_to_object(p, m) for p, m in zip(placed, visible)]
    return ShapesSample(
        image=_render(placed, canvas),
        objects=objects,
        questions=draw_questions(rng, objects, size),
        refs=_refs(objects, size),
        image_id=image_id,
        file_name=f"shapes_{image_id:06d}.png",
    )


def generate(
    n: int, seed: int = 0, size: int = 64, max_shapes: int = 4, background: str = "plain"
) -> list[ShapesSample]:
    """``n`` samples with image ids 1..n; sample k depends only on (seed, k, options).

    Same arguments give identical pixels, masks and texts; ``generate(m, s)`` is a prefix of
    ``generate(n, s)`` for m <= n.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _check_options(size, max_shapes, background)
    return [
        generate_one(np.random.default_rng([seed, image_id]), image_id, size, max_shapes, background)
        for image_id in range(1, n + 1)
    ]


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def question_id(image_id: int, index: int) -> int:
    """VQAv2-style question id: image id × 1000 + the question's index in its image."""
    return image_id * 1000 + index


def annotation_id(image_id: int, object_index: int) -> int:
    """COCO annotation id of an object: image id × 10 + its paint-order index (at most 6 objects)."""
    return image_id * 10 + object_index


def _write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    return path


def _info(split: str) -> dict[str, str]:
    return {"description": "vlmkit shapes synthetic benchmark", "version": "1.0", "split": split}


def write_images(samples: Sequence[ShapesSample], out_dir: str | Path) -> list[Path]:
    """Save every sample's image as ``out_dir/<file_name>`` (PNG, lossless)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in samples:
        path = out_dir / sample.file_name
        sample.image.save(path, format="PNG")
        paths.append(path)
    return paths


def write_vqav2(samples: Sequence[ShapesSample], out_dir: str | Path, split: str = "val") -> dict[str, Path]:
    """Write the VQAv2 question/annotation pair; 10 identical human answers per question.

    ``question_type`` holds the shapes question type (see :data:`QUESTION_TYPES`) so results can be
    broken down by type; ``answer_type`` is VQAv2's "yes/no" | "number" | "other".
    """
    out_dir = Path(out_dir)
    questions, annotations = [], []
    for sample in samples:
        for k, qa in enumerate(sample.questions):
            qid = question_id(sample.image_id, k)
            questions.append({"image_id": sample.image_id, "question": qa["question"], "question_id": qid})
            annotations.append({
                "question_id": qid,
                "image_id": sample.image_id,
                "question_type": qa["type"],
                "answer_type": ANSWER_TYPES.get(qa["type"], "other"),
                "multiple_choice_answer": qa["answer"],
                "answers": [
                    {"answer": qa["answer"], "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)
                ],
            })
    header = {"info": _info(split), "license": {"name": "synthetic", "url": ""}, "data_type": "shapes",
              "data_subtype": split}
    return {
        "vqa_questions": _write_json(
            out_dir / f"v2_OpenEnded_mscoco_{split}_questions.json",
            {**header, "task_type": "Open-Ended", "questions": questions},
        ),
        "vqa_annotations": _write_json(
            out_dir / f"v2_mscoco_{split}_annotations.json", {**header, "annotations": annotations}
        ),
    }


def _coco_annotation(sample: ShapesSample, index: int) -> dict[str, Any]:
    obj = sample.objects[index]
    return {
        "id": annotation_id(sample.image_id, index),
        "image_id": sample.image_id,
        "category_id": CATEGORY_IDS[obj.shape],
        "segmentation": rle_encode(obj.mask),
        "area": float(obj.mask.sum()),
        "bbox": [float(v) for v in obj.bbox],
        "iscrowd": 0,
    }


def _refcoco_refs(samples: Sequence[ShapesSample], split: str) -> list[dict[str, Any]]:
    """One RefCOCO-style ref per object, holding all of its sentences."""
    refs: list[dict[str, Any]] = []
    sent_id = 0
    for sample in samples:
        for index, obj in enumerate(sample.objects):
            sentences = []
            for ref in (r for r in sample.refs if r["object_index"] == index):
                sentences.append({"sent": ref["sentence"], "raw": ref["sentence"],
                                  "tokens": tokenize(ref["sentence"]), "sent_id": sent_id})
                sent_id += 1
            refs.append({
                "ref_id": len(refs),
                "ann_id": annotation_id(sample.image_id, index),
                "image_id": sample.image_id,
                "category_id": CATEGORY_IDS[obj.shape],
                "split": split,
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": sample.file_name,
            })
    return refs


def write_coco_refs(
    samples: Sequence[ShapesSample], out_dir: str | Path, split: str = "val"
) -> dict[str, Path]:
    """Write COCO ``instances.json`` (compressed-RLE masks) and RefCOCO-style ``refs.json``.

    Real RefCOCO ships its refs as the pickle ``refs(unc).p``; here they are JSON (the project
    serialises JSON only) with the same fields. A ref's ``file_name`` is its image's file name.
    """
    out_dir = Path(out_dir)
    instances = {
        "info": _info(split),
        "licenses": [],
        "images": [
            {"id": s.image_id, "file_name": s.file_name, "height": s.image.height, "width": s.image.width}
            for s in samples
        ],
        "annotations": [_coco_annotation(s, i) for s in samples for i in range(len(s.objects))],
        "categories": [
            {"id": cid, "name": name, "supercategory": "shape"} for name, cid in CATEGORY_IDS.items()
        ],
    }
    return {
        "instances": _write_json(out_dir / "instances.json", instances),
        "refs": _write_json(out_dir / "refs.json", _refcoco_refs(samples, split)),
    }


def _single_turn(markers: str, question: str, answer: str, record_id: str, images: str | list[str]) -> dict:
    """One isolated question as a LLaVA record: ``"<image> QUESTION"`` (a space, not LLaVA's ``"\\n"``: the
    shipped model's prompt is ``user : <image> QUESTION assistant :``, and ``"\\n"`` is a token of its
    vocabulary it never saw there)."""
    return {"id": record_id, "image": images, "conversations": [
        {"from": "human", "value": f"{markers} {question}"}, {"from": "gpt", "value": answer}]}


def write_llava(
    samples: Sequence[ShapesSample], out_dir: str | Path, name: str = "llava_shapes_vqa.json",
    format: str = "multi-turn",
) -> Path:
    """Write LLaVA conversation JSON of the VQA questions.

    ``format``: ``"multi-turn"`` (LLaVA's layout): one record per image, ``"<image>\\n"`` + its first question,
    then every QA pair as a turn that sees the earlier ones. ``"single-turn"``: one record per question,
    ``"<image> QUESTION"`` → ``ANSWER`` (id ``<stem>_q<k>``): what the shipped model was trained on
    (``vlmkit.train.shapes_data``: every turn isolated, right after the image), so ``vlmkit finetune
    --template plain`` tokenizes each record to exactly the prompt and labels of its training.
    """
    if not name.startswith("llava_"):
        raise ValueError(f"LLaVA file name must start with 'llava_', got {name!r}")
    if format not in LLAVA_FORMATS:
        raise ValueError(f"unknown LLaVA format {format!r}; accepted: {list(LLAVA_FORMATS)}")
    records = []
    for sample in samples:
        stem = Path(sample.file_name).stem
        if format == "single-turn":
            records += [_single_turn("<image>", qa["question"], qa["answer"], f"{stem}_q{k}", sample.file_name)
                        for k, qa in enumerate(sample.questions)]
            continue
        turns = []
        for k, qa in enumerate(sample.questions):
            turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + qa["question"]})
            turns.append({"from": "gpt", "value": qa["answer"]})
        records.append({"id": stem, "image": sample.file_name, "conversations": turns})
    return _write_json(Path(out_dir) / name, records)


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    size: int = 64,
    split: str = "val",
    max_shapes: int = 4,
    background: str = "plain",
    llava_format: str = "multi-turn",
) -> dict[str, Path]:
    """Generate ``n`` samples and write every format under ``out_dir``; return the written paths.

    Keys: "images" (folder of PNGs), "vqa_questions", "vqa_annotations", "instances", "refs", "llava"
    (``llava_format``, see :func:`write_llava`; ``vlmkit shapes`` writes "single-turn" by default).
    """
    out_dir = Path(out_dir)
    samples = generate(n, seed=seed, size=size, max_shapes=max_shapes, background=background)
    images_dir = out_dir / "images"
    write_images(samples, images_dir)
    return {
        "images": images_dir,
        **write_vqav2(samples, out_dir, split=split),
        **write_coco_refs(samples, out_dir, split=split),
        "llava": write_llava(samples, out_dir, format=llava_format),
    }


# ---------------------------------------------------------------------------------------------
# shapes_multi: N images in one prompt, one question about image k
# ---------------------------------------------------------------------------------------------

#: Prefix naming the asked image; the question follows with its first letter lowercased:
#: "In image 7, how many shapes are there?". Its words ("in", "image", ",", the numbers) are not in
#: :data:`VOCAB_WORDS` (the single-image texts) but are in the shipped model's tokenizer and in
#: ``vlmkit.testing.tokenizer_words`` (numbers 0..64): see :func:`multi_vocabulary`.
MULTI_PREFIX = "In image {k}, "
MAX_MULTI_IMAGES = 64  # the vocabularies hold the numbers 0..64


def multi_question(question: str, k: int) -> str:
    """The shapes question ``question`` asked about image ``k`` (1-based) of a multi-image prompt."""
    return MULTI_PREFIX.format(k=k) + question[0].lower() + question[1:]


def multi_vocabulary(max_images: int = MAX_MULTI_IMAGES) -> list[str]:
    """Every word a ``shapes_multi`` question or answer with up to ``max_images`` images can use, sorted."""
    words = set(VOCAB_WORDS) | set(tokenize(MULTI_PREFIX.format(k=""))) | {str(k) for k in range(1, max_images + 1)}
    return sorted(words)


def _check_images(images: int | Sequence[int]) -> list[int]:
    choices = [images] if isinstance(images, int) and not isinstance(images, bool) else list(images)
    if not choices or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_MULTI_IMAGES
                          for n in choices):
        raise ValueError(f"images per question must be an int in [1, {MAX_MULTI_IMAGES}] or a non-empty list of "
                         f"them, got {images!r}")
    return choices


def draw_multi(samples: Sequence[ShapesSample], n: int, images: int | Sequence[int], seed: int = 0) -> list[dict]:
    """``n`` multi-image questions over the image pool ``samples``.

    Question q (0-based) depends only on (seed, q, the pool, ``images``): N = ``images`` (or drawn uniformly
    from the list ``images``), N distinct pool images in random order, k uniform in 1..N, and one of image
    k's own :attr:`ShapesSample.questions` drawn uniformly, asked with :func:`multi_question`. Its answer
    and type are that question's: they depend on image k's scene alone. Returns dicts ``{"question",
    "answer", "type", "image_ids" (the N pool ids in prompt order), "image_index" (k, 1-based)}``.
    """
    choices = _check_images(images)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if len(samples) < max(choices):
        raise ValueError(f"{max(choices)} images per question need a pool of at least that many images, "
                         f"got {len(samples)}")
    out = []
    for q in range(n):
        rng = np.random.default_rng([seed, 7, q])  # 7: a stream apart from generate()'s [seed, image_id]
        count = choices[int(rng.integers(len(choices)))]
        picked = [samples[int(i)] for i in rng.choice(len(samples), size=count, replace=False)]
        k = int(rng.integers(1, count + 1))
        qa = _pick(rng, picked[k - 1].questions)
        out.append({"question": multi_question(qa["question"], k), "answer": qa["answer"], "type": qa["type"],
                    "image_ids": [s.image_id for s in picked], "image_index": k})
    return out


def write_multi(
    out_dir: str | Path,
    n: int,
    images: int | Sequence[int] = 4,
    seed: int = 0,
    pool: int | None = None,
    size: int = 64,
    split: str = "val",
    max_shapes: int = 4,
    background: str = "plain",
) -> dict[str, Path]:
    """Write ``n`` ``shapes_multi`` questions (:func:`draw_multi`) over a pool of ``pool`` images (default
    ``max(N, n)``; ``generate(pool, seed, ...)``, so the pool of seed 0 is the ``shapes`` images of seed 0).

    Files: ``images/`` (the pool's PNGs), the VQAv2 question / annotation pair (each question holds
    ``image_ids``: its images in prompt order, read by the ``vqav2`` reader as a multi-image doc;
    ``image_id``: the asked image; ``image_index``: k), and ``llava_shapes_multi.json``: one single-turn
    record per question (``"<image> … <image> In image k, …"``), the format of ``write_llava(...,
    format="single-turn")``. Keys: "images", "vqa_questions", "vqa_annotations", "llava".
    """
    choices = _check_images(images)
    pool = max(max(choices), n) if pool is None else pool
    samples = generate(pool, seed=seed, size=size, max_shapes=max_shapes, background=background)
    drawn = draw_multi(samples, n, choices, seed=seed)
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    write_images(samples, images_dir)
    questions, annotations, records = [], [], []
    for q, d in enumerate(drawn, start=1):
        questions.append({"image_id": d["image_ids"][d["image_index"] - 1], "image_ids": d["image_ids"],
                          "image_index": d["image_index"], "question": d["question"], "question_id": q})
        annotations.append({
            "question_id": q, "image_id": questions[-1]["image_id"], "question_type": d["type"],
            "answer_type": ANSWER_TYPES.get(d["type"], "other"), "multiple_choice_answer": d["answer"],
            "answers": [{"answer": d["answer"], "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)],
        })
        files = [f"shapes_{i:06d}.png" for i in d["image_ids"]]
        records.append(_single_turn(" ".join(["<image>"] * len(files)), d["question"], d["answer"], f"multi_{q}", files))
    header = {"info": {**_info(split), "description": "vlmkit shapes_multi synthetic benchmark"},
              "license": {"name": "synthetic", "url": ""}, "data_type": "shapes_multi", "data_subtype": split}
    return {
        "images": images_dir,
        "vqa_questions": _write_json(out_dir / f"v2_OpenEnded_mscoco_{split}_questions.json",
                                     {**header, "task_type": "Open-Ended", "questions": questions}),
        "vqa_annotations": _write_json(out_dir / f"v2_mscoco_{split}_annotations.json",
                                       {**header, "annotations": annotations}),
        "llava": _write_json(out_dir / "llava_shapes_multi.json", records),
    }


def cli_main(argv: list[str]) -> int:
    """``vlmkit shapes --out DIR --n N --seed S [--size 64] [--split val] [--max-shapes 4] [--background plain]
    [--format single-turn|multi-turn] [--images N[,N...] [--pool P]]``."""
    from vlmkit.cli import ArgumentParser, command, positive_int, user_input

    @command("vlmkit shapes")
    def main(argv: list[str]) -> int:
        parser = ArgumentParser(prog="vlmkit shapes", description="Write the synthetic shapes benchmark: images, "
                                "VQAv2-style questions and annotations, COCO refs and instances, LLaVA conversations.")
        parser.add_argument("--out", required=True, help="output folder (created)")
        parser.add_argument("--n", type=positive_int, default=100, help="number of images")
        parser.add_argument("--seed", type=int, default=0, help="seed of the images and questions")
        parser.add_argument("--size", type=positive_int, default=64, help=f"image side in pixels, >= {MIN_SIZE}")
        parser.add_argument("--split", default="val", help="split name written into the file names and records")
        parser.add_argument("--max-shapes", type=positive_int, default=4, help="most objects per image")
        parser.add_argument("--background", choices=list(BACKGROUNDS), default="plain",
                            help="plain grey, or grey with per-pixel noise")
        parser.add_argument("--format", choices=list(LLAVA_FORMATS), default="single-turn",
                            help="LLaVA records: one isolated question per record (single-turn: the format the shipped "
                            "model was trained on) or every question of an image as turns of one record (multi-turn)")
        parser.add_argument("--images", default=None, metavar="N[,N...]",
                            help="write shapes_multi instead: --n questions, each about one of N images in one prompt "
                            "(a list: N drawn per question); single-turn records")
        parser.add_argument("--pool", type=positive_int, default=None,
                            help="with --images: shapes images the questions draw from (default: max(N, --n))")
        args = parser.parse_args(argv)
        with user_input():
            if Path(args.out).exists() and not Path(args.out).is_dir():
                raise ValueError(f"--out {args.out!r} is a file; expected a folder")
            if args.size < MIN_SIZE:
                raise ValueError(f"--size {args.size}: expected an image side >= {MIN_SIZE} pixels")
            if args.images is not None:
                try:
                    images = [int(v) for v in args.images.split(",")]
                except ValueError:
                    raise ValueError(f"--images {args.images!r}: expected N or a comma-separated list of N") from None
                paths = write_multi(args.out, args.n, images, seed=args.seed, pool=args.pool, size=args.size,
                                    split=args.split, max_shapes=args.max_shapes, background=args.background)
            else:
                paths = write_dataset(args.out, args.n, seed=args.seed, size=args.size, split=args.split,
                                      max_shapes=args.max_shapes, background=args.background, llava_format=args.format)
        for key, path in paths.items():
            print(f"{key:16s} {path}")
        return 0

    return main(argv)
