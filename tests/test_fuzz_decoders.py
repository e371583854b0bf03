"""Bounded fuzzing (hypothesis) of every public decoder and answer parser: model text is data, so on any text
they return a well-formed, bounded result and raise nothing (the decoders raise ValueError only for a bad grid
size, format or mode, which the fuzzed calls always pass correctly). Examples are few per test so the whole file
runs in well under a minute; ``derandomize`` makes CI runs repeatable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmkit.seg import rrle
from vlmkit.seg.rrle import (
    BACKGROUND, DECODE_MODES, FORMATS, REPAIR_KINDS, decode, decode_answer, decode_descriptors, decode_irle,
    decode_rrle, encode, extract_seg, grid_to_mask, label_ids, labels_to_mask,
)

FUZZ = settings(max_examples=400, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

LABELS = st.sampled_from(["others", "dog", "red circle", "a", "b c", "x" * 30])
#: Pieces of R-RLE and its near misses: separators with odd spacing, stars, counts, tags, unicode blanks.
PIECES = st.sampled_from([
    "others", "dog", "a", " *", "*", " * ", "| ", "|", " | ", "\n ", "\n", "\r\n", "\t", " ", "\u3000", "\x0b",
    "0", "1", "2", "7", "16", "007", "99999999999", "<seg>", "</seg>", "others *4", "dog *2| ", "\n others *",
])


@st.composite
def grids(draw, max_side=5):
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    cells = draw(st.lists(LABELS, min_size=h * w, max_size=h * w))
    return np.asarray(cells, dtype=object).astype(str).reshape(h, w)


@st.composite
def model_text(draw):
    """Encoded grids with random edits, or free-form pieces: reaches the fast path, the repairs and the junk."""
    if draw(st.booleans()):
        text = encode(draw(grids()), draw(st.sampled_from(FORMATS)))
        for _ in range(draw(st.integers(0, 4))):
            i = draw(st.integers(0, len(text)))
            if draw(st.booleans()):
                text = text[:i] + draw(PIECES) + text[i:]
            else:
                text = text[:i] + text[i + draw(st.integers(1, 3)):]
        return text
    return "".join(draw(st.lists(st.one_of(PIECES, st.text(max_size=3)), max_size=25)))


def _check(d, h: int, w: int, text_len: int, mode: str) -> None:
    """Well-formed and bounded: shapes, ids within names, grid = names[ids], known repair kinds, short details."""
    assert d.ids.shape == (h, w) and d.ids.dtype == np.int64 and d.shape == (h, w)
    assert d.ids.min() >= 0 and d.ids.max() < len(d.names)
    assert len(d.names) <= text_len + 2
    assert d.mode == mode and d.ok == (not d.repairs)
    grid = d.grid
    assert grid.shape == (h, w)
    assert all(grid[i, j] == d.names[d.ids[i, j]] for i in range(h) for j in range(w))
    assert np.array_equal(d.mask, d.ids > 0) and np.array_equal(np.asarray(d), grid)
    assert len(d.repairs) <= 2 * h + 8
    for r in d.repairs:
        assert r.kind in REPAIR_KINDS and len(r.detail) < 600 and (r.row is None or 0 <= r.row < max(h, 1) + text_len)
    if mode == "lenient":
        assert d.names[0] == BACKGROUND
    assert set(d.labels) <= set(d.names[1:])


@FUZZ
@given(text=model_text(), h=st.integers(1, 6), w=st.integers(1, 6), fmt=st.sampled_from(FORMATS),
       mode=st.sampled_from(DECODE_MODES))
def test_decoders_never_raise_and_stay_bounded(text, h, w, fmt, mode):
    d = decode(text, h, w, format=fmt, mode=mode)
    _check(d, h, w, len(text), mode)
    named = {"rrle": decode_rrle, "irle": decode_irle, "full": decode_descriptors}[fmt](text, h, w, mode=mode)
    assert np.array_equal(named.ids, d.ids) and named.names == d.names and named.repairs == d.repairs
    answer = f"Sure.\n<seg>{text}</seg>"
    a = decode_answer(answer, h, w, format=fmt, mode=mode)
    _check(a, h, w, len(answer), mode)
    if "<seg>" not in text and "</seg>" not in text:
        assert extract_seg(answer) == text
        assert np.array_equal(a.ids, d.ids) and a.names == d.names  # the answer wraps the same descriptors
    m = grid_to_mask(d, (h * 3, w + 1))
    assert m.shape == (h * 3, w + 1) and m.dtype == bool
    assert np.array_equal(labels_to_mask(d), d.grid != BACKGROUND)


@FUZZ
@given(text=model_text(), h=st.integers(1, 5), w=st.integers(1, 5), fmt=st.sampled_from(FORMATS))
def test_lenient_ok_holds_exactly_for_canonical_text(text, h, w, fmt):
    """The documented contract: no repair exactly when the stripped text is the canonical encoding of the grid."""
    d = decode(text, h, w, format=fmt)
    try:
        canonical = encode(d.grid, fmt).strip()
    except (ValueError, TypeError):  # the grid holds labels the encoder refuses: the text cannot be canonical
        canonical = None
    assert d.ok == (canonical is not None and text.strip() == canonical)


@FUZZ
@given(grid=grids(), fmt=st.sampled_from(FORMATS), mode=st.sampled_from(DECODE_MODES))
def test_encoded_grids_round_trip(grid, fmt, mode):
    h, w = grid.shape
    d = decode(encode(grid, fmt), h, w, format=fmt, mode=mode)
    assert np.array_equal(d.grid, grid)
    if mode == "lenient":
        assert d.ok
    cells = grid.ravel().tolist()
    ids = label_ids(cells)
    assert len(ids) == len(cells) and (BACKGROUND not in cells or ids[cells.index(BACKGROUND)] == 0)


@FUZZ
@given(obj=st.one_of(st.none(), st.integers(), st.binary(max_size=8), st.lists(st.text(max_size=3), max_size=3)),
       fmt=st.sampled_from(FORMATS), mode=st.sampled_from(DECODE_MODES))
def test_non_text_decodes_as_empty(obj, fmt, mode):
    d = decode(obj, 3, 2, format=fmt, mode=mode)
    assert d.ids.shape == (3, 2) and not d.mask.any()
    assert decode_answer(obj, 3, 2, format=fmt, mode=mode).repair_kinds() == ["no_seg"]
    assert extract_seg(obj) is None


@pytest.mark.parametrize("bad", [dict(height=0), dict(width=-1), dict(height=True), dict(width=2.5),
                                 dict(format="rle"), dict(mode="strict")])
def test_the_only_errors_are_bad_sizes_formats_and_modes(bad):
    kwargs = {"height": 4, "width": 4, "format": "rrle", "mode": "lenient", **bad}
    for fn in (decode, decode_answer):
        with pytest.raises(ValueError):
            fn("<seg>others *16\n</seg>", **kwargs)


# ---------------------------------------------------------------------------------------------
# Answer parsers
# ---------------------------------------------------------------------------------------------


def _parsers():
    from vlmkit.evaluation.parsers import (
        BoxParser, RawParser, StripParser, Text4SegParser, Text4SegSemanticParser, YesNoParser,
    )

    out = [StripParser(), RawParser(), BoxParser(), BoxParser(fallback_numbers=True)]
    out += [YesNoParser(p) for p in ("llava", "exact", "vlmevalkit")]
    out += [Text4SegParser(grid=4, format=f, decode=m) for f in FORMATS for m in DECODE_MODES]
    out += [Text4SegSemanticParser(["dog", "red circle", "sky"], grid=4, format="rrle", decode=m) for m in DECODE_MODES]
    return out


PARSERS = _parsers()
ANSWERS = st.one_of(model_text().map(lambda t: f"Sure, here it is:\n<seg>{t}</seg>"), model_text(),
                    st.text(max_size=40), st.sampled_from(["Yes.", "no", "NO, not", "[1, 2.5, -3e2, 4]", "1 2 3",
                                                            "[1,2,3]", "<seg>", "</seg><seg>"]))


@FUZZ
@given(text=ANSWERS, size=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_parsers_never_raise_on_text_and_store_json(text, size):
    from vlmkit.evaluation.parsers import MaskHeadParser, SampleContext

    ctx = SampleContext(doc={"id": 0}, image_size=size)
    for parser in PARSERS:
        parsed = parser(text, ctx)
        json.dumps(parsed.value)  # what goes to the samples file is JSON
        if parsed.data is not None:
            assert parsed.data.shape == size
    masks = np.zeros((text.count("[SEG]") % 3, *size), bool)
    out = MaskHeadParser("union")(text, SampleContext(doc={}, image_size=size, masks=masks))
    assert out.data.shape == size and out.value["num_masks"] == masks.shape[0]


@FUZZ
@given(text=ANSWERS)
def test_text4seg_head_decodes_any_answer(text):
    from vlmkit.seg.text4seg import Text4Seg, Text4SegConfig

    for fmt in FORMATS:
        head = Text4Seg(Text4SegConfig(grid=4, format=fmt))
        res = head.masks_from_text([text, text], [(5, 7), (3, 2)])
        assert [r.mask.shape for r in res] == [(5, 7), (3, 2)]
        assert np.array_equal(res[0].decoded.ids, rrle.decode_answer(text, 4, 4, format=fmt).ids)
