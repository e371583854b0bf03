"""Resource bounds on untrusted input (issue 20): restricted, size-bounded refs unpickling; Text4Seg decoders and
parsers linear in the text and bounded by the grid however long a label is; huge images downscaled when opened.

Memory is measured with ``tracemalloc`` (every Python and numpy allocation) and, for PIL's own buffers, as the
peak RSS of a fresh subprocess."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]


def _peak(fn, *args, **kwargs):
    """(result or exception, peak bytes traced while ``fn`` ran)."""
    tracemalloc.start()
    try:
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (returned for the caller to check)
            out = err
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------------
# RefCOCO refs pickles
# ---------------------------------------------------------------------------------------------

#: Tiny pickles that make an unrestricted (or the previous) unpickler allocate gigabytes.
BOMBS = {
    # bytearray(1_879_048_192): a global call (protocol 2, 33 bytes)
    "bytearray_call": b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00p\x85R.",
    # the same through STACK_GLOBAL (protocol 4)
    "stack_global": b"\x80\x04\x8c\x08builtins\x8c\tbytearray\x93J\x00\x00\x00p\x85R.",
    # bytes(1_879_048_192)
    "bytes_call": b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00p\x85R.",
    # BINBYTES8 / BYTEARRAY8 declaring 1.5 GB: the C unpickler allocates the declared size before reading
    "binbytes8": b"\x80\x04\x8e" + (1_500_000_000).to_bytes(8, "little") + b".",
    "bytearray8": b"\x80\x05\x96" + (1_500_000_000).to_bytes(8, "little") + b".",
    # LONG_BINPUT 2**24: the C unpickler grows its memo table to twice the index (256 MB)
    "memo_index": b"\x80\x02Nr" + (2**24).to_bytes(4, "little") + b".",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_refs_pickle_bombs_are_refused_without_allocating(tmp_path, name):
    from vlmkit.evaluation.readers import load_refs_pickle
    from vlmkit.seg.refseg_data import load_refs

    path = tmp_path / f"{name}.p"
    path.write_bytes(BOMBS[name])
    assert len(BOMBS[name]) <= 43
    for load in (load_refs_pickle, load_refs):
        err, peak = _peak(load, path)
        assert isinstance(err, ValueError) and isinstance(err, pickle.UnpicklingError), err
        assert str(err).startswith(f"{path}: "), err  # names the file
        assert peak < 1_000_000, (name, peak)  # the bombs ask for 256 MB .. 1.9 GB


def test_refs_pickle_admits_python2_refs_and_caps_the_size(tmp_path):
    from vlmkit.data.safe_pickle import load_refs_pickle, loads_refs_pickle

    # a Python 2 cPickle (protocol 2) of [{'split': 'val', 'sent': 'caf\xe9', 'ref_id': 7, 'bbox': [1.5]}]:
    # Python 2 str are SHORT_BINSTRING, decoded as latin-1
    py2 = (b"\x80\x02]q\x00}q\x01(U\x05splitq\x02U\x03valq\x03U\x04sentq\x04U\x04caf\xe9q\x05U\x06ref_idq\x06"
           b"K\x07U\x04bboxq\x07]q\x08G?\xf8\x00\x00\x00\x00\x00\x00aua.")
    assert loads_refs_pickle(py2) == [{"split": "val", "sent": "café", "ref_id": 7, "bbox": [1.5]}]
    big = tmp_path / "big.p"
    big.write_bytes(pickle.dumps(["x" * 2000], protocol=2))
    with pytest.raises(ValueError, match=r"big\.p: \d+ bytes, more than the 1000"):
        load_refs_pickle(big, max_bytes=1000)
    with pytest.raises(ValueError, match=r"complex"):  # complex(...) was admitted before; RefCOCO needs none
        loads_refs_pickle(pickle.dumps([1j], protocol=2))


# ---------------------------------------------------------------------------------------------
# Text4Seg decoders and parsers on a megabyte label
# ---------------------------------------------------------------------------------------------

LABEL = "x" * 1_000_000  # one 1 MB label
BOUND = 16 * 2**20  # traced bytes allowed per call: 16 MB for ~1-2 MB of text (a str grid would need 4 GB)


def _texts():
    """Answers carrying the 1 MB label: R-RLE over a 32 x 32 grid, one run, I-RLE, and descriptors."""
    row = f"{LABEL} *16| others *16"
    return {
        "rrle": "sure\n<seg>" + "\n ".join([row] + ["others *32"] * 31) + "\n</seg>",
        "one_run": f"<seg>{LABEL} *1024\n</seg>",
        "irle": f"<seg>{LABEL} *500| others *524\n</seg>",
        "full": f"<seg>{LABEL}| others\n</seg>",
    }


@pytest.mark.parametrize("mode", ["lenient", "reference"])
def test_decoders_on_a_megabyte_label_stay_bounded(mode):
    from vlmkit.seg.rrle import decode, decode_answer, decode_descriptors, decode_irle, decode_rrle, extract_seg

    texts = _texts()
    for key, text in texts.items():
        fmt = {"one_run": "rrle"}.get(key, key)
        seg = extract_seg(text)
        calls = [(decode_answer, (text, 32, 32), {"format": fmt, "mode": mode}),
                 (decode, (seg, 32, 32), {"format": fmt, "mode": mode})]
        calls.append({"rrle": (decode_rrle, (seg, 32, 32), {"mode": mode}),
                      "irle": (decode_irle, (seg, 32, 32), {"mode": mode}),
                      "full": (decode_descriptors, (seg, 32, 32), {"mode": mode})}[fmt])
        for fn, args, kw in calls:
            t0 = time.perf_counter()
            d, peak = _peak(fn, *args, **kw)
            assert not isinstance(d, Exception), (key, fn.__name__, d)
            assert peak < BOUND, (key, fn.__name__, mode, peak)
            assert time.perf_counter() - t0 < 10, (key, fn.__name__)
            assert d.ids.shape == (32, 32) and d.ids.dtype == np.int64
            assert len(d.names) <= 3
            assert all(len(r.detail) < 400 for r in d.repairs)  # repair details show labels shortened
            grid, peak = _peak(lambda: d.grid)  # built on demand: an object array, not 1024 x 4 MB
            assert peak < BOUND and grid.dtype == object and grid.shape == (32, 32)
    d = decode_answer(texts["rrle"], 32, 32, mode=mode)
    if mode == "lenient":  # the label's cells, exactly
        want = np.zeros((32, 32), bool)
        want[0, :16] = True
        assert d.ok and np.array_equal(d.mask, want) and d.grid[0, 0] == LABEL and d.grid[0, 16] == "others"


def test_parsers_and_the_head_on_a_megabyte_label_stay_bounded():
    from vlmkit.evaluation.parsers import SampleContext, Text4SegParser, Text4SegSemanticParser
    from vlmkit.seg.text4seg import Text4Seg, Text4SegConfig

    texts = _texts()
    ctx = SampleContext(doc={}, image_size=(64, 48))
    semantic = Text4SegSemanticParser(["wall", "sky"], grid=32)
    for text in texts.values():
        for parser in (Text4SegParser(grid=32), Text4SegParser(grid=32, decode="reference"), semantic):
            out, peak = _peak(parser, text, ctx)
            assert not isinstance(out, Exception), out
            assert peak < BOUND + 4 * 64 * 48 * 8, (type(parser).__name__, peak)
            assert out.data.shape == (64, 48)
    head = Text4Seg(Text4SegConfig(grid=32))
    res, peak = _peak(head.masks_from_text, [texts["rrle"]], [(64, 48)])
    assert peak < BOUND + 4 * 64 * 48 * 8 and res[0].mask.shape == (64, 48)


def test_semantic_parser_work_is_per_present_class_not_per_name():
    """Reference mode keeps every name seen in the text (here 200,000): one pass per *present* id."""
    from vlmkit.evaluation.parsers import SampleContext, Text4SegSemanticParser

    text = "<seg>" + "| ".join(f"w{i} *1" for i in range(200_000)) + "\n</seg>"
    parser = Text4SegSemanticParser(["w0", "w5"], grid=16, decode="reference", format="irle")
    t0 = time.perf_counter()
    out = parser(text, SampleContext(doc={}, image_size=(32, 32)))
    assert time.perf_counter() - t0 < 10
    # cell k of the 16 x 16 grid holds w_k; w0 -> class 0, w5 -> class 1, the rest unknown (255)
    want = np.full(256, 255)
    want[0], want[5] = 0, 1
    assert np.array_equal(out.data[::2, ::2].reshape(-1), want)
    assert len(out.value["unknown_labels"]) == 254


@pytest.mark.parametrize("text", [
    "a" + " " * 200_000 + "b *3",          # a long blank run inside a run (was quadratic in the run splitter)
    "a" + " \t" * 100_000 + "*",           # blanks before a star without a count (was quadratic in the run regex)
    " " * 200_000 + "|x",                  # blanks before a separator
    "x *1\n" + " " * 200_000 + "y",        # blanks after a row break
])
def test_decoders_are_linear_on_long_blank_runs(text):
    from vlmkit.seg.rrle import decode

    for fmt in ("rrle", "irle", "full"):
        for mode in ("lenient", "reference"):
            t0 = time.perf_counter()
            decode(text, 16, 16, format=fmt, mode=mode)
            assert time.perf_counter() - t0 < 5, (fmt, mode)  # the quadratic versions needed minutes


# The plain separator patterns and run parser the linear ones replace (vlmkit/seg/rrle.py before issue 20): the
# splits and parses must be identical.
_PLAIN = {"_ROW_SPLIT": r"[ \t]*\r?\n\s*", "_RUN_SPLIT": r"[ \t]*\|[ \t]*", "_CELL_SPLIT": r"\s*[|\n]\s*"}
_PLAIN_RUN = re.compile(r"(.*?)([ \t]*\*[ \t]*)([0-9]+)[ \t]*", re.S)


def _plain_parse_run(part):
    label, sep, digits = part.rpartition(" *")  # the fast path, unchanged
    if sep and digits.isascii() and digits.isdigit() and len(digits) <= 9:
        if label and label[0] not in " \t" and label[-1] not in " \t" and "*" not in label and "\r" not in label:
            return label, int(digits), digits[0] != "0" or len(digits) == 1
    m = _PLAIN_RUN.fullmatch(part)
    if m is None:
        return None, 0, True
    raw, sep, digits = m.groups()
    label = raw.strip()
    count = int(digits) if len(digits) <= 9 else 10**9
    canonical = (sep == " *" and raw == label and m.end(3) == len(part) and (digits[0] != "0" or len(digits) == 1)
                 and not any(c in label for c in ("|", "*", "\n", "\r")))
    return label, count, canonical


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \t\n\r\x0b|*0123ab", max_size=40))
def test_linear_separators_split_exactly_like_the_plain_patterns(text):
    from vlmkit.seg import rrle

    for name, plain in _PLAIN.items():
        pattern = getattr(rrle, name)
        assert pattern.split(text) == re.split(plain, text)
        assert pattern.findall(text) == re.findall(plain, text)
    assert rrle._parse_run(text) == _plain_parse_run(text)


def test_box_parser_is_fast_on_adversarial_text():
    from vlmkit.evaluation.parsers import BoxParser, SampleContext

    ctx = SampleContext(doc={})
    for text in ["[" + "1" * 200_000, "[1," * 60_000, "[1, 2, 3" + " " * 200_000, "[" + " " * 200_000,
                 "-" * 200_000 + "[1,2,3,4]"]:
        for parser in (BoxParser(), BoxParser(fallback_numbers=True)):
            t0 = time.perf_counter()
            parser(text, ctx)
            assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------------
# Huge images
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    """A 10000 x 10000 RGB JPEG (100 MP: 300 MB decoded), 1.5 MB on disk."""
    from PIL import Image

    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.new("RGB", (10000, 10000), (10, 120, 200)).save(path, quality=50)
    return path


def test_huge_images_are_downscaled_when_opened_and_it_is_said(huge_jpeg, tmp_path):
    from PIL import Image

    from vlmkit.data.images import MAX_PIXELS, ImageDownscaledWarning, fit_size, open_image
    from vlmkit.evaluation.readers import load_image
    from vlmkit.train.data import _load_mask, _load_rgb

    assert fit_size((10000, 10000), MAX_PIXELS) == (4096, 4096)
    with pytest.warns(ImageDownscaledWarning) as rec:
        im = open_image(huge_jpeg, where="record 3: ")
    msg = str(rec[0].message)
    assert "record 3: " in msg and str(huge_jpeg) in msg and "10000x10000" in msg and "4096x4096" in msg
    assert im.size == (4096, 4096) and im.mode == "RGB"
    assert np.abs(np.asarray(im, dtype=int)[2000, 2000] - [10, 120, 200]).max() <= 3  # the same picture
    with pytest.warns(ImageDownscaledWarning):  # the evaluation readers' and the fine-tuning loaders' path
        assert load_image({"id": 1, "image": str(huge_jpeg)}).size == (4096, 4096)
    with pytest.warns(ImageDownscaledWarning):
        assert _load_rgb(str(huge_jpeg)).size == (4096, 4096)
    with warnings.catch_warnings():  # segmentation docs are scored at the image's own size: not downscaled
        warnings.simplefilter("error", ImageDownscaledWarning)
        small = tmp_path / "small.png"
        Image.new("RGB", (30, 20)).save(small)
        assert load_image({"id": 2, "image": str(small), "mask": {"kind": "coco"}}).size == (30, 20)
    # a record's mask is downscaled to its image's size (nearest: still binary)
    mask = tmp_path / "mask.png"
    m = np.zeros((10000, 10000), np.uint8)
    m[:5000, :5000] = 255
    Image.fromarray(m).save(mask)
    with pytest.warns(ImageDownscaledWarning):
        t = _load_mask(str(mask), (4096, 4096), "r0")
    assert tuple(t.shape) == (4096, 4096) and t[:2040, :2040].all() and not t[2060:, :].any()
    assert open_image(huge_jpeg, max_pixels=None).size == (10000, 10000)  # opt-out


_RSS = """
import sys, warnings
from PIL import Image
Image.MAX_IMAGE_PIXELS = None

def hwm():  # peak RSS of this process image in KiB (VmHWM starts afresh at exec, unlike ru_maxrss)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

if sys.argv[2] == "vlmkit":
    from vlmkit.data.images import open_image
    warnings.simplefilter("ignore")
    before = hwm()
    im = open_image(sys.argv[1])
else:
    before = hwm()
    with Image.open(sys.argv[1]) as f:
        im = f.convert("RGB")
print(hwm() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status (Linux)")
def test_huge_image_peak_memory_is_a_fraction_of_a_full_decode(huge_jpeg):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def peak_kib(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", _RSS, str(huge_jpeg), how], capture_output=True, text=True,
                             env=env, check=True)
        return int(out.stdout.split()[-1])

    ours, plain = peak_kib("vlmkit"), peak_kib("plain")
    assert plain > 500_000  # decode + RGB copy of 10000 x 10000: ~600-750 MB
    assert ours < plain / 2, (ours, plain)  # JPEG decoded at half scale: ~250 MB, never decode + copy
