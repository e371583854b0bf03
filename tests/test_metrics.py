"""Hand-worked checks of vlmkit.evaluation.metrics against the reference behaviours.

Every expected value below is computed by hand from the reference sources (GT-Vision-Lab/VQA ``vqaEval.py``,
lmms-eval v0.7.2, VLMEvalKit, LLaVA ``llava/eval/``, LISA ``train_ds.py::validate`` +
``utils/utils.py::intersectionAndUnionGPU``, mmsegmentation ``IoUMetric``, detectron2 ``SemSegEvaluator``).
Float scores are compared with a tolerance (float sums depend on summation order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmkit.evaluation.metrics import (
    box_iou,
    gqa_accuracy,
    intersection_and_union,
    mean_iou,
    normalize_vqa_answer,
    parse_yes_no,
    per_sample_iou,
    pope_metrics,
    refcoco_box_accuracy,
    refer_seg_scores,
    vqa_accuracy,
)

approx = pytest.approx

# ---------------------------------------------------------------------------------------------
# VQA normalisation: worked examples (official vqaEval.py processDigitArticle(processPunctuation(s)))
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1,000", "1000"),
        ("Yes, it is.", "yes it is"),
        ("black/white", "black white"),
        ("The two dogs", "2 dogs"),
        ("Dont know", "don't know"),
        ("3.", "3"),
        ("a-b c", "b c"),  # hyphen -> space, then "a" dropped as an article
        ("It's red!", "it's red"),
        ("None", "0"),
        ("one-way", "1 way"),
    ],
)
def test_official_normalisation_worked_examples(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_period_regex_deletes_every_period_not_followed_by_digit():
    # (?!<=\d) is a typo'd look-behind that always passes.
    assert normalize_vqa_answer("3.") == "3"
    assert normalize_vqa_answer("e.g.") == "eg"
    assert normalize_vqa_answer("a.b") == "ab"
    assert normalize_vqa_answer("3.5") == "3.5"  # followed by a digit: kept
    # VLMEvalKit "fixed" the regex with a real look-behind: "3." keeps its dot there.
    assert normalize_vqa_answer("3.", "vlmevalkit") == "3."
    assert normalize_vqa_answer("e.g.", "vlmevalkit") == "eg"


def test_at_most_32_periods_removed():
    # re.UNICODE (== 32) is passed positionally as `count`: 40 dots -> 8 left.
    assert normalize_vqa_answer("." * 40) == "." * 8
    assert normalize_vqa_answer("x." * 40) == "x" * 32 + "x." * 8
    assert normalize_vqa_answer("." * 40, "vlmevalkit") == "." * 8


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("t-shirt 1,000", "tshirt 1000"),  # digit,digit anywhere -> every listed char deleted
        ("x-ray, 2,3", "xray 23"),
        ("A-B, C", "b c"),  # ", " present -> ',' deleted; '-' has no neighbouring space -> space
        ("t-shirt", "t shirt"),
        ("t - shirt", "t shirt"),  # " -" present -> deleted (double space collapses in split)
        # ';' becomes a space first, creating " -" in the OUTPUT; the decision for '-' still looks at the
        # original (no "- "/" -" there), so every '-' becomes a space: not "tshirt b".
        ("t-shirt a;-b", "t shirt b"),
    ],
)
def test_punctuation_delete_or_space_decided_on_original_text(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_contraction_anomalies():
    assert normalize_vqa_answer("Im") == "im"  # capitalised key "Im" can never match after lowercasing
    assert normalize_vqa_answer("Ive") == "ive"
    assert normalize_vqa_answer("somebody'd") == "somebodyd"  # reversed entry
    assert normalize_vqa_answer("dont") == "don't"  # a normal entry does apply
    assert normalize_vqa_answer("whats up") == "what's up"


def test_apostrophe_colon_dollar_percent_are_kept():
    assert normalize_vqa_answer("it's 5:30") == "it's 5:30"
    assert normalize_vqa_answer("$5 or 50%") == "$5 or 50%"


def test_number_words_only_up_to_ten():
    assert normalize_vqa_answer("ten eleven zero") == "10 eleven 0"


def test_lone_articles_and_empty_string_normalise_to_empty_and_match():
    assert normalize_vqa_answer("the") == ""
    assert normalize_vqa_answer("a") == ""
    assert normalize_vqa_answer("") == ""
    # GT not all identical -> normalisation runs; "a", "the", "" all become "": k = 3 -> 0.9.
    answers = ["a", "the", ""] + ["dog"] * 7
    assert vqa_accuracy("the", answers) == approx(0.9)
    assert vqa_accuracy("an", answers) == approx(0.9)


def test_variant_specific_normalisation():
    # M4C / EvalAIAnswerProcessor.__call__: lowercase, delete ',' and '?', "'s" -> " 's".
    assert normalize_vqa_answer("It's a dog?", "m4c") == "it 's dog"
    assert normalize_vqa_answer("t-shirt 1,000", "m4c") == "t shirt 1000"  # commas gone before the digit test
    # EvalAIAnswerProcessor's COMMA_STRIP (?<=\d)(\,)+(?=\d) also matches "1,,2"; the official (\d)(\,)(\d) not.
    assert normalize_vqa_answer("1,,2") == "1 2"
    assert normalize_vqa_answer("1,,2", "lmms_eval") == "12"


# ---------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_closed_form_leave_one_out(k, expected):
    answers = ["red"] * k + ["blue", "green", "black", "white", "pink", "gray", "brown", "tan", "teal", "navy"][: 10 - k]
    for variant in ("official", "lmms_eval", "m4c", "vlmevalkit"):
        assert vqa_accuracy("red", answers, variant) == approx(expected)


def test_leave_one_out_removes_one_record_by_position():
    # Removing by string value would drop all three "red"s when one is left out: (3*0 + 7*1)/10 = 0.7.
    answers = ["red", "red", "red", "blue", "blue", "blue", "blue", "green", "green", "green"]
    assert vqa_accuracy("red", answers) == approx(0.9)
    assert vqa_accuracy("red", answers) != approx(0.7)


def test_official_no_normalisation_when_all_gt_identical():
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10) == approx(1.0)
    # Identical after trimming whitespace counts as identical.
    assert vqa_accuracy("Yes", ["yes "] * 5 + ["\tyes"] * 5) == 0.0
    # As soon as one answer differs, both sides are normalised.
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == approx(1.0)
    assert vqa_accuracy("two", ["2"] * 9 + ["3"]) == approx(1.0)


def test_other_variants_always_normalise():
    for variant in ("lmms_eval", "m4c", "vlmevalkit"):
        assert vqa_accuracy("Yes", ["yes"] * 10, variant) == approx(1.0)
        assert vqa_accuracy("two", ["2"] * 10, variant) == approx(1.0)
    # vlmevalkit keeps "3." (fixed period regex) so it no longer matches "3"; the others strip it.
    answers = ["3"] * 9 + ["4"]
    assert vqa_accuracy("3.", answers) == approx(1.0)
    assert vqa_accuracy("3.", answers, "lmms_eval") == approx(1.0)
    assert vqa_accuracy("3.", answers, "vlmevalkit") == 0.0
    # m4c splits "'s": a GT "it's" and the prediction "it's" both become "it 's" and match...
    assert vqa_accuracy("it's", ["it's"] * 10, "m4c") == approx(1.0)
    # ...while a prediction "it 's" matches under m4c but not under official normalisation.
    mixed = ["it's"] * 9 + ["no"]
    assert vqa_accuracy("it 's", mixed, "m4c") == approx(1.0)
    assert vqa_accuracy("it 's", mixed) == 0.0


def test_vqa_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown variant 'mmf'.*'official'.*'lmms_eval'.*'m4c'.*'vlmevalkit'"):
        vqa_accuracy("yes", ["yes"] * 10, variant="mmf")
    with pytest.raises(ValueError, match="unknown variant"):
        normalize_vqa_answer("yes", variant="bogus")
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="exactly 10 answers"):
        vqa_accuracy("yes", ["yes"] * 9, variant="m4c")
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")


@pytest.mark.parametrize("pred", ["Yes", "yes.", "YES!", "yes"])
def test_closed_form_every_k(pred):
    # k answers normalise to "yes", 10-k to distinct other words (GT not all identical when 0 < k < 10).
    others = ["no", "maybe", "blue", "2", "cat", "dog", "red", "left", "up", "down"]
    for k in range(11):
        answers = ["yes"] * k + others[: 10 - k]
        expected = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
        if k == 10 and pred != "yes":
            expected = 0.0  # official: identical GT -> no normalisation
        assert vqa_accuracy(pred, answers) == approx(expected), (pred, k)


# ---------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------


def test_gqa_variants():
    # LLaVA (default): prediction.rstrip('.').lower(), then raw equality with the gold answer.
    assert gqa_accuracy("Yes.", "yes") == 1.0
    assert gqa_accuracy("Left...", "left") == 1.0
    assert gqa_accuracy(" yes", "yes") == 0.0  # no whitespace strip
    # Official eval.py: raw equality.
    assert gqa_accuracy("Yes", "yes", "official") == 0.0
    assert gqa_accuracy("yes", "yes", "official") == 1.0
    # lmms-eval exact_match(ignore_case, ignore_punctuation): punctuation deleted anywhere, NO strip.
    assert gqa_accuracy("Yes.", "yes", "lmms_eval") == 1.0
    assert gqa_accuracy("left-side", "leftside", "lmms_eval") == 1.0
    assert gqa_accuracy("yes ", "yes", "lmms_eval") == 0.0
    # VLMEvalKit: strip + lower only.
    assert gqa_accuracy(" Yes ", "yes", "vlmevalkit") == 1.0
    assert gqa_accuracy("yes.", "yes", "vlmevalkit") == 0.0
    with pytest.raises(ValueError, match="unknown variant"):
        gqa_accuracy("yes", "yes", "vqa")


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "yes"),
        ("No, there is not.", "no"),
        ("There is no cat.", "no"),
        ("NO", "yes"),  # case-sensitive word set {No, not, no}
        ("Not sure", "yes"),  # "Not" is not in the set
        ("", "yes"),  # empty / garbage -> yes
        ("Yes. But not really", "yes"),  # only the first sentence is kept
        ("no\n", "yes"),  # split(' ') keeps the newline on the word
        ("no, it is", "no"),  # commas deleted before splitting
    ],
)
def test_llava_pope_parser(text, expected):
    assert parse_yes_no(text, "llava") == expected


PREDS = ["Yes.", "No, there is not.", "There is no cat.", "NO", "", "Yes. But not really", "Not sure", "no\n"]
LABELS = ["yes", "no", "yes", "no", "no", "yes", "no", "no"]


def test_pope_llava_metrics_hand_computed():
    # llava parse: yes, no, no, yes, yes, yes, yes, yes -> TP=2 (1,6) TN=1 (2) FN=1 (3) FP=4 (4,5,7,8)
    r = pope_metrics(PREDS, LABELS)
    assert r["accuracy"] == approx(3 / 8)
    assert r["precision"] == approx(2 / 6)
    assert r["recall"] == approx(2 / 3)
    assert r["f1"] == approx(4 / 9)
    assert r["yes_ratio"] == approx(6 / 8)


def test_pope_lmms_eval_exact_quirks():
    # lower().strip() == label: only samples 4 ("no") and 8 ("no") are right; "Yes." is wrong.
    r = pope_metrics(PREDS, LABELS, parser="exact")
    assert r["accuracy"] == approx(2 / 8)
    assert r["precision"] == 0.0 and r["recall"] == 0.0 and r["f1"] == 0.0  # zero denominators -> 0
    assert r["yes_ratio"] == approx(3 / 8)  # counts GROUND-TRUTH yeses
    r2 = pope_metrics(["yes", "Yes.", "no", "yes"], ["yes", "yes", "yes", "no"], parser="exact")
    # TP=1, FP=1, FN=1 (only the exact "no"); "Yes." is in neither.
    assert r2["accuracy"] == approx(1 / 4)
    assert r2["precision"] == approx(0.5)
    assert r2["recall"] == approx(0.5)
    assert r2["yes_ratio"] == approx(3 / 4)


def test_pope_vlmevalkit_extraction():
    assert parse_yes_no("Yes, there is no dog", "vlmevalkit") == "unknown"
    assert parse_yes_no("YES.", "vlmevalkit") == "yes"
    # YOrN: yes, no, no, no, unknown, yes, unknown, no -> correct 1,2,4,6,8; TP=2 FP=0 FN=1.
    r = pope_metrics(PREDS, LABELS, parser="vlmevalkit")
    assert r["accuracy"] == approx(5 / 8)
    assert r["precision"] == approx(1.0)
    assert r["recall"] == approx(2 / 3)
    assert r["f1"] == approx(0.8)
    assert r["yes_ratio"] == approx(2 / 8)
    # An "unknown" answer to a yes question is wrong and counts as a false negative.
    r2 = pope_metrics(["Yes, there is no dog", "yes"], ["yes", "yes"], parser="vlmevalkit")
    assert r2["accuracy"] == approx(0.5) and r2["recall"] == approx(0.5) and r2["precision"] == approx(1.0)


def test_pope_bad_inputs():
    with pytest.raises(ValueError, match="len"):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="'maybe'"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="unknown parser"):
        pope_metrics(["yes"], ["yes"], parser="gpt")
    assert pope_metrics(["yes"], [" Yes "])["accuracy"] == 1.0  # labels: case/whitespace ignored


# ---------------------------------------------------------------------------------------------
# RefCOCO REC
# ---------------------------------------------------------------------------------------------


def test_box_iou_continuous_and_inclusive():
    a, b = [0, 0, 10, 10], [5, 0, 15, 10]
    assert float(box_iou(a, b)) == approx(50 / 150)
    # MAttNet inclusive pixels: widths 11, inter 6*11 = 66, union 121 + 121 - 66 = 176.
    assert float(box_iou(a, b, inclusive=True)) == approx(66 / 176)
    assert float(box_iou(a, [20, 20, 30, 30])) == 0.0
    assert float(box_iou([5, 5, 5, 5], [5, 5, 5, 5])) == 0.0  # zero union
    assert box_iou(np.array([a, a]), np.array([a, b])) == approx([1.0, 1 / 3])


def test_refcoco_threshold_is_inclusive():
    gt = [[0, 0, 10, 10], [0, 0, 10, 10]]
    pred = [[0, 0, 5, 10], [0, 0, 4, 10]]  # IoU exactly 0.5 (hit) and 0.4 (miss)
    assert refcoco_box_accuracy(pred, gt) == approx(0.5)
    assert refcoco_box_accuracy(pred, gt, thr=0.4) == approx(1.0)


def test_refcoco_coordinate_conventions():
    sizes = [[200, 100]]
    gt = [[20, 10, 100, 50]]
    assert refcoco_box_accuracy([[0.1, 0.1, 0.5, 0.5]], gt, coord="norm1", image_sizes=sizes) == 1.0
    assert refcoco_box_accuracy([[100, 100, 500, 500]], gt, coord="norm1000", image_sizes=sizes) == 1.0
    assert refcoco_box_accuracy([[0.1, 0.1, 0.5, 0.5]], gt) == 0.0  # "abs": no rescaling
    # lmms-eval style: GT [x, y, w, h] normalised by (W, H), compared with a 0-1 prediction as is.
    gt_norm = [[20 / 200, 10 / 100, (20 + 80) / 200, (10 + 40) / 100]]
    assert refcoco_box_accuracy([[0.1, 0.1, 0.5, 0.5]], gt_norm) == 1.0
    # COCO xywh ground truth.
    assert refcoco_box_accuracy([[20, 10, 100, 50]], [[20, 10, 80, 40]], gt_format="xywh") == 1.0


def test_refcoco_auto_scale_detection_like_vlmevalkit():
    sizes = [[2000, 1000]] * 4
    gt = [[200, 100, 1000, 500]] * 4
    pred = [
        [0.1, 0.1, 0.5, 0.5],  # max <= 1.5 -> 0-1
        [100, 100, 500, 500],  # max <= 1000 -> 0-1000
        [0.5, 0.5, 0.1, 0.1],  # reversed -> reordered
        [1000, 500, 200, 100],  # absolute pixels but max <= 1000 -> misread as 0-1000 (VLMEvalKit quirk)
    ]
    assert refcoco_box_accuracy(pred, gt, coord="auto", image_sizes=sizes) == approx(0.75)
    # max > 1000 -> absolute, then clipped to the image: [200,100,1000,1500] -> [200,100,1000,1000].
    gt2 = [[200, 100, 1000, 900]]
    big = [[200, 100, 1000, 1500]]
    assert refcoco_box_accuracy(big, gt2, thr=0.7, coord="auto", image_sizes=[[2000, 1000]]) == 1.0  # IoU 0.889
    assert refcoco_box_accuracy(big, gt2, thr=0.7) == 0.0  # unclipped IoU 0.571


def test_refcoco_nan_prediction_is_a_miss_and_bad_inputs():
    assert refcoco_box_accuracy([[np.nan] * 4, [0, 0, 10, 10]], [[0, 0, 10, 10]] * 2) == approx(0.5)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        refcoco_box_accuracy([[0, 0, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="len"):
        refcoco_box_accuracy([[0, 0, 1, 1]], [[0, 0, 1, 1]] * 2)
    with pytest.raises(ValueError, match="image_sizes"):
        refcoco_box_accuracy([[0, 0, 1, 1]], [[0, 0, 1, 1]], coord="norm1")
    with pytest.raises(ValueError, match="unknown coord"):
        refcoco_box_accuracy([[0, 0, 1, 1]], [[0, 0, 1, 1]], coord="pixels")


# ---------------------------------------------------------------------------------------------
# LISA cIoU / gIoU
# ---------------------------------------------------------------------------------------------


def _mask_pair(n_pixels, pred_range, gt_range, shape):
    p = np.zeros(n_pixels, np.uint8)
    g = np.zeros(n_pixels, np.uint8)
    p[slice(*pred_range)] = 1
    g[slice(*gt_range)] = 1
    return p.reshape(shape), g.reshape(shape)


A = _mask_pair(200, (0, 75), (25, 100), (10, 20))  # I = 50, U = 100
B = (np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8))  # empty pred, empty GT
C = _mask_pair(800, (0, 200), (200, 400), (20, 40))  # I = 0, U = 400


def test_intersection_and_union_lisa():
    i, u, t = intersection_and_union(*A)
    assert i.tolist() == [100, 50] and u.tolist() == [150, 100] and t.tolist() == [125, 75]
    # K = 3, an out-of-range prediction (7) falls in no bin; target 255 pixels cancel out.
    pred = np.array([0, 1, 2, 7, 1, 2])
    tgt = np.array([0, 1, 1, 2, 255, 255])
    i, u, t = intersection_and_union(pred, tgt, num_classes=3)
    assert i.tolist() == [1, 1, 0]
    assert t.tolist() == [1, 2, 1]
    assert u.tolist() == [1, 2, 2]  # class 2: predicted once (pixel 2), target once (pixel 3)


def test_lisa_worked_example():
    r = refer_seg_scores([A[0], B[0]], [A[1], B[1]])
    assert r["gIoU"] == approx(0.75, abs=1e-5)
    assert r["cIoU"] == approx(0.5, abs=1e-6)
    r = refer_seg_scores([A[0], B[0], C[0]], [A[1], B[1], C[1]])
    assert r["gIoU"] == approx(0.5, abs=1e-5)
    assert r["cIoU"] == approx(0.1, abs=1e-6)


def test_lisa_epsilons():
    # Per-sample IoU = I / (U + 1e-5) in float32: identical small masks are NOT exactly 1.
    m = np.array([[1, 1, 1, 0]], np.uint8)
    iou = per_sample_iou([m], [m])
    assert iou.dtype == np.float32
    assert iou[0] < 1.0 and iou[0] == approx(3 / (3 + 1e-5), rel=1e-6)
    m100 = np.ones((10, 10), np.uint8)
    iou100 = per_sample_iou([m100], [m100])[0]
    assert 0.9999998 < iou100 < 1.0  # LISA's "~0.9999999" (float32 nearest to 100/100.00001)
    # float32 consequence: for unions >= 256 px the 1e-5 is below float32 resolution -> exactly 1.0.
    m300 = np.ones((10, 30), np.uint8)
    assert per_sample_iou([m300], [m300])[0] == 1.0
    # Both empty (union 0) scores exactly 1.0 by the +1 rule.
    assert per_sample_iou([B[0]], [B[1]])[0] == 1.0
    # gIoU = sum / (count + 1e-5): one perfect both-empty sample gives 1/(1+1e-5), not 1.
    r = refer_seg_scores([B[0]], [B[1]])
    assert r["gIoU"] == approx(1 / (1 + 1e-5), rel=1e-6) and r["gIoU"] < 1.0
    # cIoU = sum(I) / (sum(U) + 1e-10): all-empty split gives 0.0.
    assert r["cIoU"] == 0.0
    # Epsilon-free variant (not the default).
    r = refer_seg_scores([B[0]], [B[1]], epsilon=False)
    assert r == {"cIoU": 1.0, "gIoU": 1.0}
    assert per_sample_iou([m], [m], epsilon=False)[0] == 1.0
    r = refer_seg_scores([A[0], B[0], C[0]], [A[1], B[1], C[1]], epsilon=False)
    assert r["gIoU"] == approx(0.5, abs=1e-12) and r["cIoU"] == approx(0.1, abs=1e-12)


def test_lisa_ignore_index_excluded():
    pred = np.ones((1, 4), np.uint8)
    tgt = np.array([[1, 0, 255, 255]], np.uint8)  # ignored pixels leave the prediction too
    # fg: I = 1, pred area 2, target area 1 -> U = 2
    assert per_sample_iou([pred], [tgt], epsilon=False)[0] == approx(0.5)
    assert refer_seg_scores([pred], [tgt])["cIoU"] == approx(0.5, abs=1e-6)


def test_refer_seg_bad_inputs():
    with pytest.raises(ValueError, match="binary"):
        refer_seg_scores([np.array([[0, 2]])], [np.array([[0, 1]])])
    with pytest.raises(ValueError, match="threshold logits"):
        refer_seg_scores([np.array([[0.3, 0.9]])], [np.array([[0, 1]])])
    with pytest.raises(ValueError, match="shape"):
        refer_seg_scores([np.zeros((2, 2))], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="len"):
        refer_seg_scores([A[0]], [A[1], B[1]])
    with pytest.raises(ValueError, match="wrap a single map"):
        refer_seg_scores(A[0], A[1])
    with pytest.raises(ValueError, match="targets"):
        refer_seg_scores([A[0]], [A[1] * 3])


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    r_np = refer_seg_scores([A[0], C[0]], [A[1], C[1]])
    r_t = refer_seg_scores(torch.from_numpy(np.stack([A[0], A[0]])).bool(), torch.from_numpy(np.stack([A[1], A[1]])))
    assert r_t["cIoU"] == approx(0.5, abs=1e-6)
    assert refer_seg_scores([torch.from_numpy(A[0]), torch.from_numpy(C[0])], [A[1], C[1]]) == r_np
    assert mean_iou(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]), 2)["mIoU"] == approx(1.0)


# ---------------------------------------------------------------------------------------------
# mIoU: mmsegmentation and detectron2
# ---------------------------------------------------------------------------------------------


def _worked_example_maps():
    # GT class 0: 100 px (pred 0 on 80, pred 1 on 10, pred 2 on 10); GT class 1: 50 px (pred 1 on 40, pred 0 on 10)
    # -> I = (80, 40, 0), pred area = (90, 50, 10), GT area = (100, 50, 0).
    gt = np.array([0] * 100 + [1] * 50).reshape(10, 15)
    pred = np.array([0] * 80 + [1] * 10 + [2] * 10 + [1] * 40 + [0] * 10).reshape(10, 15)
    return pred, gt


def test_miou_worked_example_mmseg_vs_detectron2():
    pred, gt = _worked_example_maps()
    r = mean_iou([pred], [gt], num_classes=3)
    assert r["IoU"].dtype == np.float32
    assert r["IoU"] == approx([80 / 110, 40 / 60, 0.0], rel=1e-6)  # FP-only class 2 gets IoU 0 and counts
    assert r["mIoU"] == approx((80 / 110 + 40 / 60) / 3, rel=1e-6)  # 0.465
    assert r["mIoU"] == approx(0.465, abs=5e-4)
    assert r["aAcc"] == approx(120 / 150, rel=1e-6)
    d = mean_iou([pred], [gt], num_classes=3, mode="detectron2")
    assert math.isnan(d["IoU"][2])  # GT-absent class skipped
    assert d["mIoU"] == approx((80 / 110 + 40 / 60) / 2, rel=1e-12)  # 0.697
    assert d["mIoU"] == approx(0.697, abs=5e-4)
    assert d["aAcc"] == approx(120 / 150)


def test_mmseg_class_never_seen_is_nan_and_dropped():
    pred, gt = _worked_example_maps()
    r = mean_iou([pred], [gt], num_classes=4)
    assert math.isnan(r["IoU"][3])
    assert r["mIoU"] == approx((80 / 110 + 40 / 60) / 3, rel=1e-6)


def test_mmseg_areas_summed_over_dataset_not_per_image():
    preds = [np.array([[0, 0, 0, 0]]), np.array([[1, 1, 1, 1]])]
    gts = [np.array([[0, 0, 0, 0]]), np.array([[0, 0, 1, 1]])]
    # totals: class 0 I=4 U=6; class 1 I=2 U=4 -> (2/3 + 1/2)/2; a per-image mean would give 0.625.
    r = mean_iou(preds, gts, num_classes=2)
    assert r["mIoU"] == approx((2 / 3 + 1 / 2) / 2, rel=1e-6)
    assert r["aAcc"] == approx(6 / 8)
    assert mean_iou(np.stack(preds), np.stack(gts), num_classes=2)["mIoU"] == approx(r["mIoU"])


def test_mmseg_ignore_and_out_of_range_predictions():
    # GT 255 pixels are removed from both maps: class 1 is only predicted there -> union 0 -> NaN.
    r = mean_iou([np.array([[0, 0, 1, 1]])], [np.array([[0, 0, 255, 255]])], num_classes=2)
    assert r["IoU"][0] == 1.0 and math.isnan(r["IoU"][1]) and r["mIoU"] == 1.0
    # A predicted 255 on a valid pixel is in no predicted class but still in its GT class's union.
    r = mean_iou([np.array([[0, 255, 1, 1]])], [np.array([[0, 0, 1, 1]])], num_classes=2)
    assert r["IoU"] == approx([0.5, 1.0])
    assert r["mIoU"] == approx(0.75)
    assert r["aAcc"] == approx(0.75)


def test_reduce_zero_label():
    # GT 0 -> 255 (ignored), 1 -> 0, 2 -> 1; 255 stays 255.
    pred = np.array([[5, 0, 1, 1]])
    gt = np.array([[0, 1, 2, 255]])
    r = mean_iou([pred], [gt], num_classes=2, reduce_zero_label=True)
    assert r["IoU"] == approx([1.0, 1.0]) and r["mIoU"] == approx(1.0)
    # without the reduction nothing lines up: pred (5, 0, 1) vs GT (0, 1, 2) on the valid pixels
    r = mean_iou([pred], [gt], num_classes=3)
    assert r["IoU"] == approx([0.0, 0.0, 0.0]) and r["aAcc"] == 0.0


def test_detectron2_ignore_pixels_leave_prediction_counts():
    # ignored GT pixels are the confusion matrix's last column, dropped from pos_pred too
    d = mean_iou([np.array([[0, 0, 1, 1]])], [np.array([[0, 0, 255, 255]])], num_classes=2, mode="detectron2")
    assert d["IoU"][0] == 1.0 and math.isnan(d["IoU"][1]) and d["mIoU"] == 1.0


def test_miou_bad_inputs():
    with pytest.raises(ValueError, match="unknown mode"):
        mean_iou([np.zeros((2, 2))], [np.zeros((2, 2))], 2, mode="cityscapes")
    with pytest.raises(ValueError, match="shape"):
        mean_iou([np.zeros((2, 2))], [np.zeros((3, 2))], 2)
    with pytest.raises(ValueError, match="outside"):
        mean_iou([np.full((2, 2), 255)], [np.zeros((2, 2))], 2, mode="detectron2")
    with pytest.raises(ValueError, match="num_classes"):
        mean_iou([np.zeros((2, 2))], [np.zeros((2, 2))], 0)
