"""Text4Seg codec, decoding repairs, referring-segmentation data conversion, the head stage, overlays.

Independent facts used: worked strings in Text4Seg's ``encode_mask`` format (``mc-lan/Text4Seg`` @ d6540b6),
hand-written encodings, PIL's NEAREST sampling rule, pycocotools 2.0.11 outputs recorded as RLE strings,
round trips.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmkit.seg import rrle as T
from vlmkit.seg.rrle import (
    BACKGROUND, DecodedGrid, decode, decode_answer, decode_descriptors, decode_irle, decode_rrle, downsample_mask,
    encode, encode_descriptors, encode_irle, encode_rrle, extract_seg, grid_to_mask, label_ids, labels_to_mask,
    mask_to_labels, wrap_answer,
)
from vlmkit.seg.text4seg import Text4Seg, Text4SegConfig

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])



def blob_grid(h=16, w=16, label="dog", rows=(4,), cols=(5, 12)):
    g = np.full((h, w), BACKGROUND, dtype=object)
    for r in rows:
        g[r, cols[0]:cols[1]] = label
    return g.astype(str)


# ---------------------------------------------------------------------------------------------
# Worked examples (Text4Seg ``encode_mask`` / ``decode_mask`` + ``translate_sequence``)
# ---------------------------------------------------------------------------------------------


def test_worked_example_16x16_blob_exact():
    text = encode_rrle(blob_grid())
    rows = ["others *16"] * 4 + ["others *5| dog *7| others *4"] + ["others *16"] * 11
    assert text == "\n ".join(rows) + "\n"
    assert text.startswith("others *16\n others *16\n others *16\n others *16\n others *5| dog *7| others *4\n ")
    assert text.endswith("\n others *16\n")
    answer = wrap_answer("Sure, here is the segmentation mask for 'dog':", text)
    assert answer.endswith("others *16\n</seg>")
    assert answer == "Sure, here is the segmentation mask for 'dog':\n<seg>" + text + "</seg>"
    for mode in ("lenient", "reference"):
        d = decode_answer(answer, 16, 16, mode=mode)
        assert d.ok and np.array_equal(d.grid, blob_grid())
        assert d.mask.sum() == 7 and d.mask[4, 5:12].all()


def test_multilabel_grid_hand_encoded_and_reference_ids():
    grid = np.array([
        ["cat", "cat", "others", "dog", "dog"],
        ["others"] * 5,
        ["dog", "dog", "dog", "cat", "others"],
    ])
    text = "cat *2| others *1| dog *2\n others *5\n dog *3| cat *1| others *1\n"
    assert encode_rrle(grid) == text
    # translate_sequence: first-seen order cat, others, dog; others moved to 0
    assert label_ids(grid.ravel().tolist()) == [1, 1, 0, 2, 2, 0, 0, 0, 0, 0, 2, 2, 2, 1, 0]
    for mode in ("lenient", "reference"):
        d = decode_rrle(text, 3, 5, mode=mode)
        assert d.ok and np.array_equal(d.grid, grid)
        assert d.ids.ravel().tolist() == [1, 1, 0, 2, 2, 0, 0, 0, 0, 0, 2, 2, 2, 1, 0]
        assert d.names == ("others", "cat", "dog") and d.labels == ["cat", "dog"]


def test_runs_never_cross_rows():
    g = np.full((2, 4), "x")
    assert encode_rrle(g) == "x *4\n x *4\n"
    g = np.array([["a", "others", "a", "others"], ["others", "others", "a", "a"]])  # per-cell alternating row
    assert encode_rrle(g) == "a *1| others *1| a *1| others *1\n others *2| a *2\n"


def test_24x24_grid():
    g = np.full((24, 24), BACKGROUND).astype("<U16")
    for i in range(24):
        g[i, max(0, i - 3): i + 2] = "the left zebra"
    text = encode_rrle(g)
    rows = text[:-1].split("\n ")
    assert len(rows) == 24 and text.endswith("\n")
    assert rows[0] == "the left zebra *2| others *22"
    assert rows[10] == "others *7| the left zebra *5| others *12"
    assert rows[23] == "others *20| the left zebra *4"
    for mode in ("lenient", "reference"):
        d = decode_rrle(text, 24, 24, mode=mode)
        assert d.ok and np.array_equal(d.grid, g)


def test_empty_and_full_grids_and_the_no_others_quirk():
    empty = np.full((16, 16), BACKGROUND)
    assert encode_rrle(empty) == "others *16\n" + " others *16\n" * 15
    full = np.full((16, 16), "dog")
    text = encode_rrle(full)
    assert text == "dog *16\n" + " dog *16\n" * 15
    lenient, ref = decode_rrle(text, 16, 16), decode_rrle(text, 16, 16, mode="reference")
    assert np.array_equal(lenient.grid, full) and np.array_equal(ref.grid, full)
    # documented divergence: translate_sequence gives the first label id 0 when no "others" exists,
    # so the reference chain (pred > 0) reads a full mask as empty; lenient keeps others = 0 always
    assert lenient.mask.all() and lenient.names == ("others", "dog")
    assert not ref.mask.any() and ref.names == ("dog",)
    assert labels_to_mask(ref).all()  # by name, every non-"others" label is foreground


def test_nonsquare_source_downsampled_with_pil_nearest():
    rng = np.random.default_rng(3)
    mask = rng.random((48, 72)) > 0.6
    small = downsample_mask(mask, 16, 16)
    rows = ((np.arange(16) + 0.5) * 48 / 16).astype(int)
    cols = ((np.arange(16) + 0.5) * 72 / 16).astype(int)
    assert np.array_equal(small, mask[np.ix_(rows, cols)])  # PIL NEAREST samples cell centres
    grid = mask_to_labels(mask, "dog")
    assert np.array_equal(grid == "dog", small)
    for mode in ("lenient", "reference"):
        assert np.array_equal(decode_rrle(encode_rrle(grid), 16, 16, mode=mode).grid, grid)


def test_downsample_no_majority_vote_thin_objects_vanish():
    mask = np.zeros((64, 64), bool)
    mask[:, 0] = True  # a column of pixels never sampled (samples at x = 2, 6, ...)
    mask[10:30, 10:30] = True
    small = downsample_mask(mask, 16, 16)
    assert not small[:, 0].any()
    mostly = np.ones((64, 64), bool)
    mostly[2::4, 2::4] = False  # 1/16 of the pixels, exactly the sampled ones
    assert not downsample_mask(mostly, 16, 16).any()


def test_downsample_dtypes():
    labels = np.arange(24 * 36).reshape(24, 36) % 300
    out = downsample_mask(labels, 12, 12)
    assert out.dtype == labels.dtype and np.array_equal(out, labels[1::2, 1::3])
    assert downsample_mask(np.eye(8, dtype=np.float32), 4, 4).dtype == bool
    with pytest.raises(ValueError, match="0 and 1"):
        downsample_mask(np.full((4, 4), 0.5), 2, 2)
    with pytest.raises(ValueError, match="2-D"):
        downsample_mask(np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="height"):
        downsample_mask(np.zeros((4, 4), bool), 0, 2)


def test_grid_to_mask_nearest():
    g = blob_grid()
    up = grid_to_mask(g, (64, 64))
    assert up.shape == (64, 64) and np.array_equal(up, np.kron(g == "dog", np.ones((4, 4), int)).astype(bool))
    up = grid_to_mask(g, (50, 37))  # non-integer ratios: pixel y takes row floor(y * 16 / 50)
    rows, cols = (np.arange(50) * 16 // 50), (np.arange(37) * 16 // 37)
    assert np.array_equal(up, (g == "dog")[np.ix_(rows, cols)])
    assert np.array_equal(grid_to_mask(decode_rrle(encode_rrle(g), 16, 16), (64, 64)), grid_to_mask(g, (64, 64)))


def test_ablation_formats_exact():
    g = np.array([["a", "a", "others"], ["others", "b", "b"]])
    assert encode_irle(g) == "a *2| others *2| b *2\n"
    assert encode_descriptors(g) == "a| a| others| others| b| b\n"
    assert np.array_equal(decode_irle("a *2| others *2| b *2\n", 2, 3).grid, g)
    assert np.array_equal(decode_descriptors("a| a| others| others| b| b\n", 2, 3, mode="reference").grid, g)
    for fmt in ("irle", "full"):
        for mode in ("lenient", "reference"):
            d = decode(encode(g, fmt), 2, 3, format=fmt, mode=mode)
            assert d.ok and np.array_equal(d.grid, g), (fmt, mode)


def test_encode_rejects_bad_labels():
    for bad in ["a|b", "a *2", "two\nlines", " pad", ""]:
        with pytest.raises(ValueError, match="invalid descriptor label"):
            encode_rrle(np.array([[bad, "others"]]))
    with pytest.raises(TypeError, match="str labels"):
        encode_rrle(np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="format"):
        encode(np.array([["a"]]), "rle")


# ---------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------

_label_text = st.text(
    alphabet=st.characters(blacklist_characters="|*\n\r", blacklist_categories=("Cs",)), min_size=1, max_size=12
).filter(lambda s: s == s.strip() and s != "")
_labels = st.one_of(st.sampled_from([BACKGROUND, "dog", "the red cat", "man in 2nd row", "7"]), _label_text)


@st.composite
def label_grids(draw):
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    pool = draw(st.lists(_labels, min_size=1, max_size=4, unique=True))
    idx = draw(st.lists(st.integers(0, len(pool) - 1), min_size=h * w, max_size=h * w))
    # runs are more typical than noise: smear some cells
    cells = [pool[i] for i in idx]
    return np.array(cells, dtype=object).astype(str).reshape(h, w)


@SETTINGS
@given(label_grids())
def test_roundtrip_random_grids(grid):
    h, w = grid.shape
    for fmt in ("rrle", "irle", "full"):
        text = encode(grid, fmt)
        d = decode(text, h, w, format=fmt)
        assert d.ok, (fmt, d.repairs)
        assert np.array_equal(d.grid, grid)
        assert np.array_equal(d.mask, grid != BACKGROUND)
    # reference mode: the same grid; its ids are translate_sequence's
    d = decode_rrle(encode_rrle(grid), h, w, mode="reference")
    assert d.ok and np.array_equal(d.grid, grid)
    assert d.ids.ravel().tolist() == label_ids(grid.ravel().tolist())


def _check_shape(d: DecodedGrid, h: int, w: int) -> None:
    assert isinstance(d, DecodedGrid)
    assert d.grid.shape == (h, w) and d.ids.shape == (h, w) and d.mask.shape == (h, w)
    assert d.ids.min() >= 0 and d.ids.max() < len(d.names)
    assert all(r.kind in T.REPAIR_KINDS for r in d.repairs)
    assert np.array_equal(np.asarray(d), d.grid)


_noise = st.text(alphabet=st.sampled_from(list("ab o*|\n\t 0123456789<>/seg")) , max_size=200)


@SETTINGS
@given(st.one_of(st.text(max_size=300), _noise), st.integers(1, 32), st.integers(1, 32))
def test_decode_never_raises_on_arbitrary_text(text, h, w):
    for fmt in ("rrle", "irle", "full"):
        for mode in ("lenient", "reference"):
            _check_shape(decode(text, h, w, format=fmt, mode=mode), h, w)
            _check_shape(decode_answer(text, h, w, format=fmt, mode=mode), h, w)
            _check_shape(decode_answer("ok\n<seg>" + text, h, w, format=fmt, mode=mode), h, w)


@SETTINGS
@given(label_grids(), st.data())
def test_decode_never_raises_on_corrupted_encodings(grid, data):
    h, w = grid.shape
    text = encode_rrle(grid)
    i = data.draw(st.integers(0, len(text)))
    j = data.draw(st.integers(i, len(text)))
    junk = data.draw(st.sampled_from(["", "\n", "|", " *", "*999999999999", "others", "\n\n ", "| x *"]))
    corrupted = text[:i] + junk + text[j:]
    for mode in ("lenient", "reference"):
        _check_shape(decode_rrle(corrupted, h, w, mode=mode), h, w)
    d = decode_rrle(corrupted, h, w)
    if d.ok:  # lenient contract: no repair reported <=> the text is the canonical encoding of the result
        assert encode_rrle(d.grid).strip() == corrupted.strip()
    else:
        assert corrupted.strip() != text.strip()


@pytest.mark.parametrize("text", [
    None, 12, "", "   ", "\n\n", "others *", "*5", "dog *99999999999999999999999", "others *" + "9" * 5000,
    "| | |", "dog *-3| others *300", "a|b *2", "others *16\n" * 40, "<seg></seg>", "others *0",
], ids=lambda t: repr(t)[:24])
def test_decode_adversarial_inputs(text):
    for fmt in ("rrle", "irle", "full"):
        for mode in ("lenient", "reference"):
            _check_shape(decode(text, 16, 16, format=fmt, mode=mode), 16, 16)


def test_decoder_argument_errors():
    with pytest.raises(ValueError, match="height"):
        decode_rrle("x *1\n", 0, 4)
    with pytest.raises(ValueError, match="mode"):
        decode_rrle("x *1\n", 1, 1, mode="strict")
    with pytest.raises(ValueError, match="format"):
        decode_answer("hi", 1, 1, format="rle")


# ---------------------------------------------------------------------------------------------
# Repairs (hand-computed)
# ---------------------------------------------------------------------------------------------


def test_newline_without_space_pitfall():
    text = encode_rrle(blob_grid()).replace("\n ", "\n")
    d = decode_rrle(text, 16, 16)
    assert np.array_equal(d.grid, blob_grid()) and d.repair_kinds() == ["noncanonical"]
    ref = decode_rrle(text, 16, 16, mode="reference")  # the reference silently empties the mask
    assert not ref.mask.any() and ref.repair_kinds() == ["unparseable"]


def test_truncated_generation():
    full = encode_rrle(blob_grid(rows=(4, 5)))
    cut = full[: full.index("dog *7", full.index("dog *7") + 1) + 4]  # "... others *5| dog" in row 5
    answer = "Sure\n<seg>" + cut
    d = decode_answer(answer, 16, 16)
    assert d.repair_kinds() == ["unclosed_seg", "rows_short", "bad_run"]
    expect = blob_grid(rows=(4,))
    expect[5, :5] = BACKGROUND  # the unreadable tail "dog" of row 5 is background
    assert np.array_equal(d.grid, expect)
    assert not decode_answer(answer, 16, 16, mode="reference").mask.any()


def test_short_row_padded_per_row_not_shifted():
    rows = ["others *16"] * 3 + ["others *15"] + ["others *5| dog *7| others *4"] + ["others *16"] * 11
    text = "\n ".join(rows) + "\n"
    d = decode_rrle(text, 16, 16)
    assert np.array_equal(d.grid, blob_grid()) and d.repair_kinds() == ["row_short"]
    assert d.repairs[0].row == 3
    ref = decode_rrle(text, 16, 16, mode="reference")  # flat: everything after row 3 shifts left by one
    assert ref.repair_kinds() == ["short"]
    assert ref.mask[4, 4:11].all() and not ref.mask[4, 11] and ref.mask.sum() == 7


def test_unparseable_run_and_empty_label_are_background():
    rows = ["others *5| dog *x| others *4"] + ["others *2| *3| dog *2| others *9"] + ["others *16"] * 14
    d = decode_rrle("\n ".join(rows) + "\n", 16, 16)
    assert (d.grid[0] == BACKGROUND).all()
    assert (d.grid[1, :5] == BACKGROUND).all() and (d.grid[1, 5:7] == "dog").all()
    assert d.repair_kinds() == ["noncanonical", "bad_run", "empty_label"]
    assert [r.row for r in d.repairs] == [None, 0, 1]


def test_long_output_and_extra_rows_truncated():
    g = blob_grid()
    text = encode_rrle(g) + " dog *16\n dog *16\n"
    d = decode_rrle(text, 16, 16)
    assert np.array_equal(d.grid, g) and d.repair_kinds() == ["rows_long"]
    ref = decode_rrle(text, 16, 16, mode="reference")
    assert np.array_equal(ref.grid, g) and ref.repair_kinds() == ["long"]
    rows = ["others *20"] + ["others *16"] * 15
    d = decode_rrle("\n ".join(rows), 16, 16)
    assert (d.grid == BACKGROUND).all() and d.repair_kinds() == ["row_long"]


def test_single_line_falls_back_to_image_wise():
    g = blob_grid()
    d = decode_rrle(encode_irle(g), 16, 16)
    assert np.array_equal(d.grid, g) and d.repair_kinds() == ["single_line"]


def test_missing_seg_and_extract_seg():
    d = decode_answer("I cannot see it.", 16, 16)
    assert not d.mask.any() and d.repair_kinds() == ["no_seg"]
    assert extract_seg("a<seg>x</seg>b<seg>y</seg>") == "x"
    assert extract_seg("<seg>open") == "open"
    assert extract_seg("none") is None and extract_seg(None) is None


# ---------------------------------------------------------------------------------------------
# Referring-segmentation data
# ---------------------------------------------------------------------------------------------


def _fixture(tmp_path):
    from vlmkit.data.rle import mask_to_counts, rle_encode

    m1 = np.zeros((40, 60), bool)
    m1[8:30, 20:50] = True
    m2 = np.zeros((40, 60), bool)
    m2[2:6, 2:58] = True
    m3 = np.zeros((30, 30), bool)
    m3[10:25, 5:12] = True
    instances = {
        "images": [
            {"id": 1, "file_name": "one.jpg", "height": 40, "width": 60},
            {"id": 2, "file_name": "two.jpg", "height": 30, "width": 30},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "segmentation": rle_encode(m1)},  # compressed RLE
            {"id": 12, "image_id": 1, "segmentation": [[2, 2, 58, 2, 58, 6, 2, 6]]},  # polygon
            {"id": 21, "image_id": 2, "segmentation": {"size": [30, 30], "counts": mask_to_counts(m3)}},
        ],
    }
    refs = [
        {"ref_id": 0, "ann_id": 11, "image_id": 1, "split": "train",
         "sentences": [{"sent": "big red box"}, {"sent": "the box | on the right"}]},
        {"ref_id": 1, "ann_id": 12, "image_id": 1, "split": "train", "sentences": [{"sent": "top strip"}]},
        {"ref_id": 2, "ann_id": 21, "image_id": 2, "split": "val",
         "sentences": [{"sent": "others"}, {"sent": "thin *bar*"}]},
    ]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    return instances, refs, {11: m1, 12: m2, 21: m3}


@pytest.mark.parametrize("grid", [16, 24, 32])
def test_converter_answers_decode_to_downsampled_masks(tmp_path, grid):
    from vlmkit.seg.refseg_data import ANSWER_PARTIAL, QUESTION_PARTIAL, refseg_to_llava

    instances, refs, masks = _fixture(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1"):
        records = refseg_to_llava(tmp_path / "instances.json", tmp_path / "refs.json", grid=grid, per_sentence=True)
    assert [r["id"] for r in records] == ["1_0_0", "1_0_1", "1_1_0", "2_2_0"]
    ann_of = {"1_0": 11, "1_1": 12, "2_2": 21}
    for rec in records:
        assert rec["height"] == rec["width"] == grid
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and human["value"].startswith("<image>\n")
        d = decode_answer(gpt["value"], grid, grid)
        assert d.ok
        expect = downsample_mask(masks[ann_of[rec["id"].rsplit("_", 1)[0]]], grid, grid)
        assert np.array_equal(d.mask, expect) and expect.any()
        (label,) = d.labels
        question = human["value"][len("<image>\n"):]
        assert question in [q.replace("[class_name]", label) for q in QUESTION_PARTIAL]
        sentence = gpt["value"].split("\n<seg>")[0]
        assert sentence in [a.replace("[class_name]", label) for a in ANSWER_PARTIAL]
    labels = [decode_answer(r["conversations"][1]["value"], grid, grid).labels[0] for r in records]
    assert labels == ["big red box", "the box on the right", "top strip", "thin bar"]  # sanitized


def test_converter_rounds_repeats_split_seed(tmp_path):
    from vlmkit.seg.refseg_data import refseg_to_llava

    instances, refs, _ = _fixture(tmp_path)
    a = refseg_to_llava(instances, refs, split="train", rounds=2, repeats=2, seed=5)
    assert len(a) == 4 and [r["id"] for r in a] == ["1_0_r0", "1_1_r0", "1_0_r1", "1_1_r1"]
    for rec in a:
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 2
        assert turns[0]["value"].startswith("<image>\n") and "<image>" not in turns[2]["value"]
    assert a == refseg_to_llava(instances, refs, split="train", rounds=2, repeats=2, seed=5)
    assert a != refseg_to_llava(instances, refs, split="train", rounds=2, repeats=2, seed=6)
    with pytest.raises(ValueError, match="grid"):
        refseg_to_llava(instances, refs, grid=3)
    bad = [dict(refs[0], ann_id=99)]
    with pytest.raises(ValueError, match="ann_id 99"):
        refseg_to_llava(instances, bad)


def test_converter_on_shapes_benchmark(tmp_path):
    from vlmkit.data.shapes import generate, write_coco_refs
    from vlmkit.seg.refseg_data import refseg_to_llava

    samples = generate(4, seed=1)
    paths = write_coco_refs(samples, tmp_path)
    records = refseg_to_llava(paths["instances"], paths["refs"], per_sentence=True)
    by_name = {(s.image_id, i): o.mask for s in samples for i, o in enumerate(s.objects)}
    refs = json.loads(paths["refs"].read_text())
    ann_obj = {r["ref_id"]: (r["image_id"], r["ann_id"] % 10) for r in refs}
    assert len(records) == sum(len(r["sentences"]) for r in refs)
    for rec in records:
        image_id, ref_id, _ = rec["id"].split("_")
        d = decode_answer(rec["conversations"][1]["value"], 16, 16)
        assert d.ok and np.array_equal(d.mask, downsample_mask(by_name[ann_obj[int(ref_id)]], 16, 16))


def test_refs_pickle_restricted(tmp_path):
    from vlmkit.seg.refseg_data import load_refs

    _, refs, _ = _fixture(tmp_path)
    for protocol in (2, 4):
        path = tmp_path / f"refs{protocol}.p"
        path.write_bytes(pickle.dumps(refs, protocol=protocol))
        assert load_refs(path) == refs
    (tmp_path / "set.p").write_bytes(pickle.dumps([{"ref_id": 1, "tags": {"a", "b"}}], protocol=2))
    assert load_refs(tmp_path / "set.p")[0]["tags"] == {"a", "b"}
    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps([_Evil()], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        load_refs(evil)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_polygon_rasterization_matches_pycocotools_vectors():
    from vlmkit.data.rle import rle_decode
    from vlmkit.seg.refseg_data import annotation_mask, polygon_to_mask

    # pycocotools 2.0.11: mask.merge(mask.frPyObjects(polys, 12, 12))["counts"]
    vectors = [
        ([[1.5, 0.7, 9.2, 3.3, 4.1, 8.8]], "i02:4M0OO1O2N1OR1"),
        ([[0.2, 0.2, 11.6, 0.9, 10.4, 6.5, 6.0, 3.1, 1.1, 7.7]], "02:5KO100O2N100001O1O0;"),
        ([[-2, -2, 5.5, -1, 4, 4.6], [7, 7, 11, 7.5, 9, 11]], "01;1O1O1OOP1NSO2N0a0"),
    ]
    for polys, counts in vectors:
        expect = rle_decode({"size": [12, 12], "counts": counts})
        assert np.array_equal(polygon_to_mask(polys, 12, 12), expect)
        assert np.array_equal(annotation_mask(polys, 12, 12), expect)
    square = polygon_to_mask([[2, 2, 6, 2, 6, 5, 2, 5]], 8, 8)  # covers x in [2, 6), y in [2, 5)
    expect = np.zeros((8, 8), bool)
    expect[2:5, 2:6] = True
    assert np.array_equal(square, expect)


# ---------------------------------------------------------------------------------------------
# Config and stage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, word", [
    ({"grid": 3}, "3"), ({"grid": 65}, "65"), ({"grid": True}, "True"), ({"grid": "16"}, "'16'"),
    ({"refine": "crf"}, "'crf'"), ({"sam_type": "vit_x"}, "'vit_x'"), ({"points": 0}, "points"),
    ({"iterations": 0}, "iterations"), ({"seed": -1}, "seed"), ({"decode": "strict"}, "'strict'"),
    ({"format": "rle"}, "'rle'"), ({"align_prior": 1}, "align_prior"),
])
def test_config_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Text4SegConfig(**kwargs)


def test_config_registry_roundtrip():
    import vlmkit
    from vlmkit.config import config_from_dict

    assert vlmkit.Text4SegConfig is Text4SegConfig
    c = Text4SegConfig(grid=24, refine="sam", sam_checkpoint="/x/sam_vit_h_4b8939.pth", sam_type="vit_h", points=20)
    d = c.to_dict()
    assert d["type"] == "text4seg" and config_from_dict(json.loads(json.dumps(d))) == c
    assert isinstance(Text4SegConfig().build(), Text4Seg)


def test_masks_from_text_coarse():
    head = Text4SegConfig(grid=16).build()
    g = blob_grid()
    texts = [wrap_answer("ok", encode_rrle(g)), "no mask here", "x\n<seg>" + encode_rrle(g).replace("\n ", "\n")]
    out = head.masks_from_text(texts, [(48, 80), (10, 10), (16, 16)])
    assert [r.mask.shape for r in out] == [(48, 80), (10, 10), (16, 16)]
    assert np.array_equal(out[0].mask, grid_to_mask(g, (48, 80))) and not out[0].refined and out[0].repairs == ()
    assert not out[1].mask.any() and [r.kind for r in out[1].repairs] == ["no_seg"]
    assert np.array_equal(out[2].mask, g == "dog") and out[2].decoded.repair_kinds() == ["unclosed_seg", "noncanonical"]
    from PIL import Image

    img = Image.new("RGB", (80, 48))  # PIL size is (W, H)
    assert head.masks_from_text(texts[:1], images=[img])[0].mask.shape == (48, 80)
    with pytest.raises(ValueError, match=r"\(80, 48\)"):
        head.masks_from_text(texts[:1], [(80, 48)], images=[img])
    with pytest.raises(ValueError, match="image_sizes"):
        head.masks_from_text(texts[:1])
    ref_head = Text4SegConfig(decode="reference").build()
    assert not ref_head.masks_from_text(texts[2:], [(16, 16)])[0].mask.any()


def test_wrap_with_head_and_save(tmp_path):
    import vlmkit
    from vlmkit.testing import tiny_vlm

    model, _ = tiny_vlm("llava")
    wrapped = vlmkit.wrap(model, Text4SegConfig(grid=24))
    (head,) = wrapped.stages_of("head")
    assert isinstance(head, Text4Seg) and head.config.grid == 24
    answer = wrap_answer("ok", encode_rrle(np.array([["others"] * 24] * 23 + [["x"] * 24])))
    (result,) = head.masks_from_text([answer], image_sizes=[(48, 48)])
    assert result.mask.shape == (48, 48) and result.mask[46:].all() and not result.mask[:46].any()
    wrapped.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "vlmkit.json").read_text())["stages"]
    assert saved == [Text4SegConfig(grid=24).to_dict()] and not (tmp_path / "vlmkit_stages.safetensors").exists()
    model = vlmkit.unwrap(wrapped)
    with pytest.raises(ValueError, match="sam_checkpoint"):
        vlmkit.wrap(model, Text4SegConfig(refine="sam"))
    with pytest.raises(ValueError, match="not a file"):
        vlmkit.wrap(model, Text4SegConfig(refine="sam", sam_checkpoint=str(tmp_path / "none.pth")))


# ---------------------------------------------------------------------------------------------
# Overlay
# ---------------------------------------------------------------------------------------------


def test_mask_overlay():
    from PIL import Image

    import vlmkit.viz
    from vlmkit.viz.masks import PALETTE

    base = np.full((20, 30, 3), 100, np.uint8)
    a = np.zeros((20, 30), bool)
    a[2:10, 3:12] = True
    b = np.zeros((20, 30), bool)
    b[5:15, 8:20] = True
    out = np.asarray(vlmkit.viz.mask_overlay(Image.fromarray(base), [a, b], alpha=0.5))
    assert out.shape == (20, 30, 3)
    assert (out[0, 0] == 100).all()  # untouched outside
    assert tuple(out[2, 3]) == tuple(int(np.rint(50 + c / 2)) for c in PALETTE[0])  # a only
    assert tuple(out[14, 19]) == tuple(int(np.rint(50 + c / 2)) for c in PALETTE[1])  # b only
    labelled = np.asarray(vlmkit.viz.mask_overlay(base, np.stack([a, b]), ["dog", "cat"]))
    assert (labelled != out).any()
    with pytest.raises(ValueError, match="shape"):
        vlmkit.viz.mask_overlay(base, [np.zeros((5, 5), bool)])
    with pytest.raises(ValueError, match="labels"):
        vlmkit.viz.mask_overlay(base, [a], ["x", "y"])
