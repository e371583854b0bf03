"""Tests for the shapes synthetic benchmark (vlmkit.data.shapes) and COCO RLE (vlmkit.data.rle).

Answers, references and masks are re-derived here from the objects and pixels, independently of
the generator's own logic.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from vlmkit.data import shapes
from vlmkit.data.rle import counts_to_string, mask_to_counts, rle_decode, rle_encode, string_to_counts

SIZE = 64


@pytest.fixture(scope="module")
def samples() -> list[shapes.ShapesSample]:
    return shapes.generate(40, seed=3)


def _pixels(sample: shapes.ShapesSample) -> np.ndarray:
    return np.asarray(sample.image)


def _find(objects, color=None, shape=None):
    return [o for o in objects if (color is None or o.color == color) and (shape is None or o.shape == shape)]


# ------------------------------------------------------------------------------------- generation


def test_same_seed_identical_different_seed_differs():
    a, b = shapes.generate(12, seed=5), shapes.generate(12, seed=5)
    for x, y in zip(a, b):
        assert np.array_equal(_pixels(x), _pixels(y))
        assert [o.mask.tobytes() for o in x.objects] == [o.mask.tobytes() for o in y.objects]
        assert x.questions == y.questions and x.refs == y.refs
        assert (x.image_id, x.file_name) == (y.image_id, y.file_name)
    c = shapes.generate(12, seed=6)
    assert any(not np.array_equal(_pixels(x), _pixels(z)) for x, z in zip(a, c))
    assert [x.questions for x in a] != [z.questions for z in c]


def test_generate_is_prefix_stable():
    short, long = shapes.generate(3, seed=9), shapes.generate(6, seed=9)
    assert all(np.array_equal(_pixels(s), _pixels(t)) for s, t in zip(short, long))


def test_image_format_and_ids(samples):
    assert [s.image_id for s in samples] == list(range(1, 41))
    assert len({s.file_name for s in samples}) == len(samples)
    for s in samples:
        assert s.image.mode == "RGB" and s.image.size == (SIZE, SIZE)
        assert 1 <= len(s.objects) <= 4
        assert len({o.color for o in s.objects}) == len(s.objects)  # distinct colours per image
    assert {len(s.objects) for s in samples} == {1, 2, 3, 4}


def test_masks_are_exactly_the_painted_pixels(samples):
    background = np.array(shapes.BACKGROUND_RGB, dtype=np.uint8)
    for s in samples:
        px = _pixels(s)
        union = np.zeros((SIZE, SIZE), dtype=int)
        for o in s.objects:
            is_color = np.all(px == np.array(shapes.COLORS[o.color], dtype=np.uint8), axis=-1)
            assert o.mask.dtype == bool and o.mask.shape == (SIZE, SIZE)
            assert o.mask.sum() > 0
            assert is_color.sum() == o.mask.sum()
            assert np.array_equal(is_color, o.mask)
            union += o.mask
            ys, xs = np.nonzero(o.mask)
            assert o.bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert o.bbox[0] <= o.center[0] <= o.bbox[0] + o.bbox[2]
        assert union.max() <= 1  # disjoint
        assert np.array_equal(union == 0, np.all(px == background, axis=-1))


def test_noise_background_keeps_exact_masks():
    for s in shapes.generate(6, seed=1, background="noise"):
        px = _pixels(s).astype(int)
        covered = np.zeros((SIZE, SIZE), dtype=bool)
        for o in s.objects:
            assert np.array_equal(np.all(px == shapes.COLORS[o.color], axis=-1), o.mask)
            covered |= o.mask
        bg = px[~covered]
        assert np.all(bg[:, 0] == bg[:, 1]) and np.all(bg[:, 1] == bg[:, 2])  # grey noise
        assert np.abs(bg[:, 0] - shapes.BACKGROUND_RGB[0]).max() <= shapes.NOISE_AMPLITUDE
        assert len(np.unique(bg[:, 0])) > 1


def test_max_shapes_curriculum_and_size_option():
    assert all(len(s.objects) == 1 for s in shapes.generate(10, seed=0, max_shapes=1))
    big = shapes.generate(3, seed=0, size=96)
    assert all(s.image.size == (96, 96) for s in big)


@pytest.mark.parametrize(
    "kwargs", [{"size": 16}, {"max_shapes": 0}, {"max_shapes": 7}, {"background": "stripes"}, {"seed": -1}]
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        shapes.generate(1, **kwargs)


def test_extent_range_and_visibility(samples):
    assert shapes.extent_range(64) == (16, 28)
    # The smallest default shape, a 16-px triangle, keeps >= 70 % of its raster.
    smallest = shapes.shape_mask("triangle", 0, 0, 16, SIZE).sum()
    assert min(o.mask.sum() for s in samples for o in s.objects) >= 0.7 * smallest


def test_shape_rasters_hand_checked():
    triangle = ["0000", "0110", "0110", "1111"]
    circle = ["0110", "1111", "1111", "0110"]
    for shape, rows in (("triangle", triangle), ("circle", circle)):
        expect = np.array([[c == "1" for c in r] for r in rows])
        got = shapes.shape_mask(shape, 3, 2, 4, 10)
        assert np.array_equal(got[2:6, 3:7], expect) and got.sum() == expect.sum()
    square = shapes.shape_mask("square", 2, 3, 5, 10)
    assert square.sum() == 25 and square[3:8, 2:7].all()
    with pytest.raises(ValueError):
        shapes.shape_mask("star", 0, 0, 4, 10)


# ------------------------------------------------------------------------------------------ texts


def _all_texts(sample):
    yield from (q["question"] for q in sample.questions)
    yield from (q["answer"] for q in sample.questions)
    yield from (r["sentence"] for r in sample.refs)


def test_vocabulary_covers_every_text(samples):
    vocab = shapes.VOCAB_WORDS
    assert vocab == sorted(set(vocab)) and all(w == w.lower() for w in vocab)
    assert "?" in vocab
    used = set()
    for s in samples:
        for text in _all_texts(s):
            words = re.findall(r"\w+|[^\w\s]", text.lower())
            assert words == shapes.tokenize(text)
            assert set(words) <= set(vocab), text
            used |= set(words)
    assert len(used) >= len(vocab) - 6  # the vocabulary is not padded with unused words


def _check_answer(q, objects):
    text, answer = q["question"], q["answer"]
    if q["type"] == "count":
        assert text == "How many shapes are there?" and answer == str(len(objects))
    elif q["type"] == "shape":
        (color,) = re.fullmatch(r"What shape is the (\w+) object\?", text).groups()
        (obj,) = _find(objects, color=color)
        assert answer == obj.shape
    elif q["type"] == "color":
        (shape,) = re.fullmatch(r"What color is the (\w+)\?", text).groups()
        (obj,) = _find(objects, shape=shape)  # only asked when unambiguous
        assert answer == obj.color
    elif q["type"] == "exists":
        article, color, shape = re.fullmatch(r"Is there (an?) (\w+) (\w+)\?", text).groups()
        assert article == ("an" if color[0] in "aeiou" else "a")
        assert answer == ("yes" if _find(objects, color, shape) else "no")
    else:
        _check_left_right(text, answer, objects)


def _check_left_right(text, answer, objects):
    pair = re.fullmatch(r"Is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", text)
    if pair:
        (a,), (b,) = _find(objects, *pair.groups()[:2]), _find(objects, *pair.groups()[2:])
        dx = a.center[0] - b.center[0]
        assert abs(dx) >= SIZE / 8 and answer == ("left" if dx < 0 else "right")
        return
    color, shape = re.fullmatch(r"Which side of the image is the (\w+) (\w+) on\?", text).groups()
    (obj,) = _find(objects, color, shape)
    assert abs(obj.center[0] - SIZE / 2) >= SIZE / 16
    assert answer == ("left" if obj.center[0] < SIZE / 2 else "right")


def test_answers_correct_by_construction(samples):
    for s in samples:
        assert {q["type"] for q in s.questions} <= set(shapes.QUESTION_TYPES)
        for q in s.questions:
            _check_answer(q, s.objects)
        exists = sorted(q["answer"] for q in s.questions if q["type"] == "exists")
        assert exists == ["no", "yes"]  # balanced per image
    types = {q["type"] for s in samples for q in s.questions}
    assert types == set(shapes.QUESTION_TYPES)


def _resolve(sentence, objects):
    """Objects an expression can denote, by an independent reading of the templates."""
    words = sentence.split()
    assert words[0] == "the" and len(words) in (2, 3)
    if len(words) == 2:
        return _find(objects, shape=words[1])
    mod, head = words[1:]
    if mod in shapes.COLORS:
        return _find(objects, color=mod, shape=None if head == "shape" else head)
    group = objects if head == "shape" else _find(objects, shape=head)
    assert mod in (("leftmost", "rightmost") if head == "shape" else ("left", "right"))
    assert head == "shape" or len(group) == 2
    xs = sorted(o.center[0] for o in group)
    gap = xs[1] - xs[0] if mod.startswith("left") else xs[-1] - xs[-2]
    assert gap >= SIZE / 8  # clearly the extreme one
    target = xs[0] if mod.startswith("left") else xs[-1]
    return [o for o in group if o.center[0] == target]


def test_refs_name_exactly_their_object(samples):
    for s in samples:
        assert {r["object_index"] for r in s.refs} == set(range(len(s.objects)))
        for r in s.refs:
            (obj,) = _resolve(r["sentence"], s.objects)
            assert obj is s.objects[r["object_index"]]
    kinds = {len(r["sentence"].split()) for s in samples for r in s.refs}
    assert kinds == {2, 3}
    assert any("most" in r["sentence"] for s in samples for r in s.refs)


# -------------------------------------------------------------------------------------------- RLE


def test_rle_hand_vectors():
    # Column-major 0 0 0 | 1 1 0 | 0 1 0 -> runs [3, 2, 2, 1, 1]; counts 3, 4 are stored as
    # deltas 1-2 = -1 -> 5-bit group 31 (sign bit set, no more) -> chr(48 + 31) = "O".
    mask = np.array([[0, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=bool)
    assert mask_to_counts(mask) == [3, 2, 2, 1, 1]
    assert rle_encode(mask) == {"size": [3, 3], "counts": "322OO"}
    assert np.array_equal(rle_decode({"size": [3, 3], "counts": "322OO"}), mask)
    # 64 = 0b10_00000: low group 0 with "more" bit -> chr(48 + 32) = "P", then "2".
    full = np.ones((8, 8), dtype=bool)
    assert rle_encode(full)["counts"] == "0P2" and counts_to_string([0, 64]) == "0P2"
    # 50 -> groups 18|more, 1 -> "b1"; delta 10 - 50 = -40 -> groups 24|more, 30 -> "hN".
    assert counts_to_string([0, 50, 5, 10]) == "0b15hN"
    assert string_to_counts("0b15hN") == [0, 50, 5, 10]
    # A 5x13 mask with runs [50, 5, 10]: no deltas yet (fewer than four counts); 10 -> chr(58) = ":".
    flat = np.repeat([False, True, False], [50, 5, 10])
    assert rle_encode(flat.reshape((5, 13), order="F")) == {"size": [5, 13], "counts": "b15:"}
    assert rle_encode(np.zeros((2, 2), dtype=bool)) == {"size": [2, 2], "counts": "4"}


def test_rle_accepts_uncompressed_and_bytes_and_rejects_bad_sizes():
    mask = np.array([[1, 0], [1, 1]], dtype=bool)  # column-major 1 1 0 1 -> [0, 2, 1, 1]
    assert np.array_equal(rle_decode({"size": [2, 2], "counts": [0, 2, 1, 1]}), mask)
    assert np.array_equal(rle_decode({"size": [2, 2], "counts": rle_encode(mask)["counts"].encode()}), mask)
    with pytest.raises(ValueError):
        rle_decode({"size": [2, 2], "counts": [0, 2, 1]})
    with pytest.raises(ValueError):
        rle_decode({"size": [2, 2], "counts": "0P"})  # value never terminates


@settings(max_examples=150, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_rle_round_trip(mask):
    rle = rle_encode(mask)
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    assert np.array_equal(rle_decode(rle), mask)
    counts = mask_to_counts(mask)
    assert sum(counts) == mask.size and counts[1::2] == [c for c in counts[1::2] if c > 0]
    assert sum(counts[1::2]) == mask.sum()
    assert string_to_counts(rle["counts"]) == counts


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 2**20), min_size=1, max_size=30))
def test_rle_string_round_trip_on_counts(counts):
    assert string_to_counts(counts_to_string(counts)) == counts


# ---------------------------------------------------------------------------------------- writers


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_write_dataset_round_trip(tmp_path):
    paths = shapes.write_dataset(tmp_path, n=6, seed=2, split="val")
    samples = shapes.generate(6, seed=2)
    by_id = {s.image_id: s for s in samples}
    assert {"images", "vqa_questions", "vqa_annotations", "instances", "refs", "llava"} <= set(paths)
    assert paths["vqa_questions"].name == "v2_OpenEnded_mscoco_val_questions.json"
    assert paths["vqa_annotations"].name == "v2_mscoco_val_annotations.json"

    for s in samples:
        written = Image.open(paths["images"] / s.file_name).convert("RGB")
        assert np.array_equal(np.asarray(written), _pixels(s))

    _check_vqa(_load(paths["vqa_questions"]), _load(paths["vqa_annotations"]), by_id)
    instances = _load(paths["instances"])
    _check_instances(instances, by_id)
    _check_refs(_load(paths["refs"]), instances, by_id)
    _check_llava(paths["llava"], by_id)


def _check_vqa(questions, annotations, by_id):
    for key in ("info", "task_type", "data_type", "data_subtype", "questions"):
        assert key in questions
    qs = questions["questions"]
    assert len({q["question_id"] for q in qs}) == len(qs) == sum(len(s.questions) for s in by_id.values())
    anns = {a["question_id"]: a for a in annotations["annotations"]}
    assert set(anns) == {q["question_id"] for q in qs}
    for q in qs:
        a = anns[q["question_id"]]
        assert q["image_id"] in by_id and a["image_id"] == q["image_id"]
        assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert {x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]}
        assert all(x["answer_confidence"] == "yes" for x in a["answers"])
        answer = a["multiple_choice_answer"]
        expected = "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"
        assert a["answer_type"] == expected
        record = {"question": q["question"], "answer": answer, "type": a["question_type"]}
        assert record in by_id[q["image_id"]].questions


def _check_instances(instances, by_id):
    images = {im["id"]: im for im in instances["images"]}
    assert set(images) == set(by_id)
    for image_id, sample in by_id.items():
        assert images[image_id]["file_name"] == sample.file_name
        assert (images[image_id]["height"], images[image_id]["width"]) == (SIZE, SIZE)
    categories = {c["id"]: c["name"] for c in instances["categories"]}
    assert sorted(categories.values()) == ["circle", "square", "triangle"]
    anns = instances["annotations"]
    assert len({a["id"] for a in anns}) == len(anns) == sum(len(s.objects) for s in by_id.values())
    per_image = {}
    for a in anns:
        assert a["image_id"] in images and a["iscrowd"] == 0
        per_image.setdefault(a["image_id"], []).append(a)
    for image_id, sample in by_id.items():
        for a, obj in zip(per_image[image_id], sample.objects):
            mask = rle_decode(a["segmentation"])
            assert isinstance(a["segmentation"]["counts"], str) and a["segmentation"]["size"] == [SIZE, SIZE]
            assert np.array_equal(mask, obj.mask)
            assert categories[a["category_id"]] == obj.shape
            assert a["area"] == float(mask.sum()) and a["bbox"] == [float(v) for v in obj.bbox]


def _check_refs(refs, instances, by_id):
    anns = {a["id"]: a for a in instances["annotations"]}
    sent_ids = [sid for r in refs for sid in r["sent_ids"]]
    assert len(set(sent_ids)) == len(sent_ids)
    assert len({r["ref_id"] for r in refs}) == len(refs)
    for r in refs:
        ann = anns[r["ann_id"]]
        assert ann["image_id"] == r["image_id"] and ann["category_id"] == r["category_id"]
        assert r["file_name"] == by_id[r["image_id"]].file_name and r["split"] == "val"
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]] and r["sentences"]
        mask = rle_decode(ann["segmentation"])
        for sent in r["sentences"]:
            assert sent["tokens"] == sent["sent"].split() and sent["raw"] == sent["sent"]
            (obj,) = _resolve(sent["sent"], by_id[r["image_id"]].objects)
            assert np.array_equal(obj.mask, mask)


def _check_llava(path, by_id):
    assert path.name.startswith("llava_")
    records = _load(path)
    assert len(records) == len(by_id)
    for rec in records:
        sample = next(s for s in by_id.values() if s.file_name == rec["image"])
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(sample.questions)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        pairs = [(h["value"].removeprefix("<image>\n"), g["value"]) for h, g in zip(turns[::2], turns[1::2])]
        assert pairs == [(q["question"], q["answer"]) for q in sample.questions]


def test_write_llava_rejects_other_names(tmp_path):
    with pytest.raises(ValueError):
        shapes.write_llava([], tmp_path, name="shapes.json")
