"""Benchmark metrics that reproduce the reference implementations number for number, quirks included.

Users compare vlmkit numbers with published ones, so every function here mirrors a specific piece of
reference code (named in its docstring): GT-Vision-Lab/VQA @ a013f00
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, lmms-eval v0.7.2 (@ 75571cf) ``lmms_eval/tasks/``,
VLMEvalKit @ e8e78f0, LLaVA ``llava/eval/``, LISA @ 3cb2d43 ``train_ds.py::validate`` +
``utils/utils.py::intersectionAndUnionGPU``, mmsegmentation ``IoUMetric`` and detectron2 ``SemSegEvaluator``.

* VQA soft accuracy: ``normalize_vqa_answer``, ``vqa_accuracy`` (official ``vqaEval.py`` + the lmms-eval,
  M4C/LLaVA and VLMEvalKit variants).
* GQA exact match: ``gqa_accuracy``.
* POPE: ``parse_yes_no``, ``pope_metrics`` (LLaVA ``eval_pope.py``, lmms-eval, VLMEvalKit).
* RefCOCO REC: ``box_iou``, ``refcoco_box_accuracy``.
* Referring segmentation (LISA): ``intersection_and_union``, ``per_sample_iou``, ``refer_seg_scores``.
* Semantic segmentation: ``mean_iou`` (mmsegmentation ``IoUMetric`` or detectron2 ``SemSegEvaluator``).

All functions are pure. Arrays may be numpy arrays or torch tensors (converted to numpy; torch is never
imported here). Scores are fractions in [0, 1], not percentages.
"""

from __future__ import annotations

import re
import statistics
import string
from typing import Any, Sequence

import numpy as np

__all__ = [
    "VQA_VARIANTS",
    "GQA_VARIANTS",
    "POPE_PARSERS",
    "BOX_COORDS",
    "MIOU_MODES",
    "normalize_vqa_answer",
    "vqa_accuracy",
    "gqa_accuracy",
    "parse_yes_no",
    "pope_metrics",
    "box_iou",
    "refcoco_box_accuracy",
    "intersection_and_union",
    "per_sample_iou",
    "refer_seg_scores",
    "mean_iou",
]

VQA_VARIANTS = ("official", "lmms_eval", "m4c", "vlmevalkit")
GQA_VARIANTS = ("llava", "official", "lmms_eval", "vlmevalkit")
POPE_PARSERS = ("llava", "exact", "vlmevalkit")
BOX_COORDS = ("abs", "norm1", "norm1000", "auto")
MIOU_MODES = ("mmseg", "detectron2")


def _check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(repr(a) for a in accepted)}")


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, torch tensor (any device/dtype) or array-like."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        t = x.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # bfloat16 & co. have no numpy dtype
            return t.float().numpy()
    return np.asarray(x)


# ============================================================================================
# VQA answer normalisation (GT-Vision-Lab/VQA vqaEval.py; mmf/lmms-eval EvalAIAnswerProcessor;
# VLMEvalKit vlmeval/smp/misc.py::process_punctuation + dataset/utils/vqa_eval.py)
# ============================================================================================

# 120 entries, identical in vqaEval.py, EvalAIAnswerProcessor.CONTRACTIONS and VLMEvalKit. Anomalies kept on
# purpose: the capitalised keys ("Id've", "I'dve", "Im", "Ive") can never match because the text is lowercased
# first; "somebody'd" maps to "somebodyd" (reversed); "let's" and "she's" map to themselves.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# Number words up to ten only; "none" -> "0".
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = ("a", "an", "the")
# 21 characters. Not listed (so kept): ' : * # $ % & ^ | ~ ; '.' is handled by the period regex.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Official regex: "(?!<=\d)" is a typo'd look-behind; it is a negative look-AHEAD for the literal "<=" + digit,
# which always passes, so the effective rule is "delete every '.' not immediately followed by a digit".
_PERIOD_STRIP_OFFICIAL = re.compile(r"(?!<=\d)(\.)(?!\d)")
# VLMEvalKit's "fixed" regex: a real look-behind, so "3." keeps its dot.
_PERIOD_STRIP_VLMEVALKIT = re.compile(r"(?<!\d)\.(?!\d)")
_COMMA_STRIP_OFFICIAL = re.compile(r"(\d)(\,)(\d)")  # only used as a condition
_COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # EvalAIAnswerProcessor: also matches "1,,2"
# Every reference passes re.UNICODE positionally to Pattern.sub, where it lands in `count`: at most 32 periods
# are removed per string.
_PERIOD_MAX_COUNT = int(re.UNICODE)  # == 32


def _process_punctuation(text: str, comma_strip: re.Pattern, period_strip: re.Pattern) -> str:
    """vqaEval.processPunctuation: delete-or-space decision per character, made on the ORIGINAL text."""
    out = text
    has_digit_comma_digit = comma_strip.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma_digit:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return period_strip.sub("", out, count=_PERIOD_MAX_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words -> digits, drop articles, then contractions."""
    words = []
    for word in text.lower().split():
        word = _MANUAL_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _evalai_call(text: str) -> str:
    """EvalAIAnswerProcessor.__call__ (mmf; used by M4C/LLaVA TextVQA and LLaVA's VQAv2 submission)."""
    text = text.lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's").strip()  # word_tokenize
    text = _clean_whitespace(text)
    text = _process_punctuation(text, _COMMA_STRIP_EVALAI, _PERIOD_STRIP_OFFICIAL)
    return _process_digit_article(text)


def normalize_vqa_answer(text: str, variant: str = "official") -> str:
    """Normalise a VQA answer exactly as the chosen reference does before comparing strings.

    * ``"official"``: ``processDigitArticle(processPunctuation(text))`` of GT-Vision-Lab ``vqaEval.py``
      (no whitespace cleanup: ``vqa_accuracy`` does that first, as ``evaluate`` does).
    * ``"lmms_eval"``: ``process_digit_article(process_punctuation(text))`` of lmms-eval's
      ``EvalAIAnswerProcessor`` (same as official except that its digit-comma-digit test also matches
      ``"1,,2"``).
    * ``"m4c"``: the full ``EvalAIAnswerProcessor.__call__`` (lowercase, delete ``,`` and ``?``,
      ``"'s" -> " 's"``, then punctuation and digit/article).
    * ``"vlmevalkit"``: VLMEvalKit ``process_answer`` (whitespace cleanup, punctuation with the fixed period
      regex ``(?<!\\d)\\.(?!\\d)``, digit/article).

    Shared quirks: each listed punctuation character is deleted everywhere if ``"p "`` or ``" p"`` occurs in
    the original text or the text contains digit,digit, otherwise replaced by a space; at most 32 periods are
    removed (``re.UNICODE`` passed as ``count``); lowercasing happens in the digit/article step.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}: {text!r}")
    _check_choice("variant", variant, VQA_VARIANTS)
    if variant == "official":
        return _process_digit_article(_process_punctuation(text, _COMMA_STRIP_OFFICIAL, _PERIOD_STRIP_OFFICIAL))
    if variant == "lmms_eval":
        return _process_digit_article(_process_punctuation(text, _COMMA_STRIP_EVALAI, _PERIOD_STRIP_OFFICIAL))
    if variant == "m4c":
        return _evalai_call(text)
    return _process_digit_article(
        _process_punctuation(_clean_whitespace(text), _COMMA_STRIP_OFFICIAL, _PERIOD_STRIP_VLMEVALKIT)
    )


def _leave_one_out(pred: str, gts: Sequence[str]) -> list[float]:
    """One acc per GT answer: min(1, #matches among the OTHER answers / 3). Removal is by position, so
    duplicates of the left-out string still count (official compares dicts carrying distinct answer_ids)."""
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1, float(matches) / 3))
    return accs


def vqa_accuracy(prediction: str, answers: Sequence[str], variant: str = "official") -> float:
    """VQA soft accuracy of one prediction against its human answers (10 for VQAv2/TextVQA).

    Score = mean over the leave-one-out subsets of ``min(1, #matching other answers / 3)``; for k matching
    answers out of 10 that is 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >=4. The variants differ only in
    when and how strings are normalised (see ``normalize_vqa_answer``):

    ============== ========================================= ================================================
    variant        normalises                                reference
    ============== ========================================= ================================================
    ``official``   ONLY if the whitespace-trimmed GT answers GT-Vision-Lab/VQA ``vqaEval.py``. With 10
                   are not all identical (both sides then)   identical GT answers nothing is normalised:
                                                             ``"Yes"``/``"yes."``/``"two"`` vs 10x
                                                             ``"yes"``/``"yes"``/``"2"`` all score 0.
    ``lmms_eval``  always, punctuation + digit/article       lmms-eval v0.7.2 ``tasks/vqav2/utils.py`` +
                                                             ``_task_utils/vqa_eval_metric.py``
    ``m4c``        always, full ``EvalAIAnswerProcessor``    LLaVA/M4C ``m4c_evaluator.py`` (TextVQA),
                   (adds lowercase, delete ``,``/``?``,      lmms-eval ``textvqa``; requires exactly 10
                   ``"'s" -> " 's"``)                        answers (the reference asserts it)
    ``vlmevalkit`` always, with the fixed period regex       VLMEvalKit ``process_line(method='vqa_score')``
    ============== ========================================= ================================================

    Note (documented choice): older lmms-eval ``vqav2/utils.py`` copies run the full EvalAIAnswerProcessor on
    the prediction and gate GT normalisation on the official rule; vlmkit follows lmms-eval v0.7.2
    ("always, punctuation + digit/article only"). Sums follow each reference's order; compare with a
    tolerance.

    Raises ValueError for an unknown variant or an empty answer list (m4c: not exactly 10 answers).
    """
    _check_choice("variant", variant, VQA_VARIANTS)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be str, got {type(prediction).__name__}: {prediction!r}")
    if isinstance(answers, str):
        raise TypeError(f"answers must be a list of str (the human answers), got a single str {answers!r}")
    answers = list(answers)
    if not answers:
        raise ValueError("answers is empty; expected the list of human answers (10 for VQAv2/TextVQA)")
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"every answer must be str, got {type(a).__name__}: {a!r}")

    if variant == "official":
        gts = [_clean_whitespace(a) for a in answers]
        pred = _clean_whitespace(prediction)
        if len(set(gts)) > 1:
            gts = [normalize_vqa_answer(g, "official") for g in gts]
            pred = normalize_vqa_answer(pred, "official")
        accs = _leave_one_out(pred, gts)
        return float(sum(accs)) / len(accs)
    if variant == "lmms_eval":
        gts = [normalize_vqa_answer(_clean_whitespace(a), "lmms_eval") for a in answers]
        pred = normalize_vqa_answer(_clean_whitespace(prediction), "lmms_eval")
        return float(statistics.mean(_leave_one_out(pred, gts)))
    if variant == "m4c":
        if len(answers) != 10:
            raise ValueError(f"variant 'm4c' expects exactly 10 answers (m4c_evaluator asserts it), got {len(answers)}")
        gts = [normalize_vqa_answer(a, "m4c") for a in answers]
        pred = normalize_vqa_answer(prediction, "m4c")
        accs = _leave_one_out(pred, gts)
        return sum(accs) / len(accs)
    gts = [normalize_vqa_answer(a, "vlmevalkit") for a in answers]
    pred = normalize_vqa_answer(prediction, "vlmevalkit")
    return float(np.mean(_leave_one_out(pred, gts)))


# ============================================================================================
# GQA exact match
# ============================================================================================

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def gqa_accuracy(prediction: str, answer: str, variant: str = "llava") -> float:
    """GQA exact match of one prediction (1.0 or 0.0).

    * ``"llava"`` (default): LLaVA's ``convert_gqa_for_eval.py`` cleans the prediction with
      ``rstrip('.').lower()``, then the official ``eval.py`` compares ``prediction == gold``. This is the
      pipeline behind the LLaVA-1.5 / token-pruning GQA numbers, hence the default (documented choice).
    * ``"official"``: GQA ``eval.py`` alone: raw string equality, no normalisation.
    * ``"lmms_eval"``: lmms-eval ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``: both sides
      lowercased and stripped of every ``string.punctuation`` character; NO whitespace strip.
    * ``"vlmevalkit"``: ``gt.strip().lower() == pred.strip().lower()``.
    """
    _check_choice("variant", variant, GQA_VARIANTS)
    for name, v in (("prediction", prediction), ("answer", answer)):
        if not isinstance(v, str):
            raise TypeError(f"{name} must be str, got {type(v).__name__}: {v!r}")
    if variant == "official":
        return float(prediction == answer)
    if variant == "llava":
        return float(prediction.rstrip(".").lower() == answer)
    if variant == "lmms_eval":
        return float(prediction.lower().translate(_PUNCT_TABLE) == answer.lower().translate(_PUNCT_TABLE))
    return float(prediction.strip().lower() == answer.strip().lower())


# ============================================================================================
# POPE
# ============================================================================================


def parse_yes_no(text: str, parser: str = "llava") -> str:
    """Map a free-form answer to the label the chosen POPE scorer compares.

    * ``"llava"`` (LLaVA ``eval_pope.py``): keep the text before the first ``.``, delete ``,``, split on
      single spaces; ``"no"`` if any word is exactly ``No``, ``not`` or ``no``, else ``"yes"`` (so empty or
      garbage -> yes, ``"NO"`` -> yes, ``"Not sure"`` -> yes, ``"no\\n"`` -> yes). Returns "yes" or "no".
    * ``"exact"`` (lmms-eval ``pope``): ``text.lower().strip()``, returned as is (anything but exactly
      "yes"/"no" is simply wrong).
    * ``"vlmevalkit"`` (``YOrN_Extraction``): lowercase, VLMEvalKit punctuation processing, split; "yes" if
      ``yes`` is a word and ``no`` is not, "no" for the converse, else "unknown".
    """
    _check_choice("parser", parser, POPE_PARSERS)
    if not isinstance(text, str):
        raise TypeError(f"prediction must be str, got {type(text).__name__}: {text!r}")
    if parser == "llava":
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        return "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    if parser == "exact":
        return text.lower().strip()
    words = _process_punctuation(text.lower(), _COMMA_STRIP_OFFICIAL, _PERIOD_STRIP_VLMEVALKIT).split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "yes" not in words and "no" in words:
        return "no"
    return "unknown"


def _safe_div(a: float, b: float) -> float:
    return a / b if b else 0.0


def pope_metrics(predictions: Sequence[str], labels: Sequence[str], parser: str = "llava") -> dict[str, float]:
    """POPE accuracy / precision / recall / F1 / yes_ratio over one split; positive class = yes.

    ``labels`` are "yes"/"no" (case and surrounding whitespace ignored). ``parser`` picks the reference:

    * ``"llava"`` (default, LLaVA ``eval_pope.py``): parse with ``parse_yes_no``; acc = (TP+TN)/N;
      yes_ratio = #predicted yes / N.
    * ``"exact"`` (lmms-eval ``pope``, NOT the default): correct iff ``pred.lower().strip() == label`` (so
      ``"Yes."`` is wrong); precision/recall only count predictions that are exactly "yes"/"no";
      **yes_ratio counts ground-truth yeses** (lmms-eval quirk).
    * ``"vlmevalkit"`` (``POPE_rating``): ``YOrN_Extraction``; an "unknown" answer is wrong for accuracy and
      counts as "no" for precision/recall/F1; yes_ratio = #extracted yes / N (VLMEvalKit does not report it;
      it reports the others x100).

    A zero denominator gives 0.0 (lmms-eval/VLMEvalKit behaviour; LLaVA's script would raise
    ZeroDivisionError).
    """
    _check_choice("parser", parser, POPE_PARSERS)
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"len(predictions)={len(predictions)} != len(labels)={len(labels)}; expected one label per prediction")
    if not predictions:
        raise ValueError("predictions is empty; expected at least one prediction")
    gts = []
    for lab in labels:
        if not isinstance(lab, str) or lab.strip().lower() not in ("yes", "no"):
            raise ValueError(f"label {lab!r} is not 'yes' or 'no'")
        gts.append(lab.strip().lower())
    preds = [parse_yes_no(p, parser) for p in predictions]
    n = len(preds)

    tp = sum(1 for p, g in zip(preds, gts) if p == "yes" and g == "yes")
    fp = sum(1 for p, g in zip(preds, gts) if p == "yes" and g == "no")
    if parser == "vlmevalkit":  # y_pred = 1 iff extracted == "Yes": unknown counts as no
        fn = sum(1 for p, g in zip(preds, gts) if p != "yes" and g == "yes")
    else:  # lmms-eval counts FN only for an exact "no"; for llava every pred is yes/no anyway
        fn = sum(1 for p, g in zip(preds, gts) if p == "no" and g == "yes")
    accuracy = sum(1 for p, g in zip(preds, gts) if p == g) / n
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    if parser == "exact":
        yes_ratio = sum(1 for g in gts if g == "yes") / n
    else:
        yes_ratio = sum(1 for p in preds if p == "yes") / n
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}


# ============================================================================================
# RefCOCO REC box accuracy
# ============================================================================================


def _boxes(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x).astype(np.float64)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {tuple(a.shape)}")
    return a


def box_iou(boxes1: Any, boxes2: Any, inclusive: bool = False) -> np.ndarray:
    """Element-wise IoU of ``[x1, y1, x2, y2]`` boxes; shapes ``[..., 4]`` broadcast, result ``[...]``.

    Continuous convention (default, lmms-eval and VLMEvalKit): ``inter = max(0, x2-x1) * max(0, y2-y1)``.
    ``inclusive=True`` is the MAttNet/refer-toolkit pixel convention (``x2`` is the last pixel, widths
    ``x2 - x1 + 1``). Reversed or degenerate boxes have zero area; a zero union gives IoU 0.
    """
    b1 = _to_numpy(boxes1).astype(np.float64)
    b2 = _to_numpy(boxes2).astype(np.float64)
    if b1.shape[-1:] != (4,) or b2.shape[-1:] != (4,):
        raise ValueError(f"boxes must have a last dimension of 4, got {tuple(b1.shape)} and {tuple(b2.shape)}")
    one = 1.0 if inclusive else 0.0
    iw = np.maximum(0.0, np.minimum(b1[..., 2], b2[..., 2]) - np.maximum(b1[..., 0], b2[..., 0]) + one)
    ih = np.maximum(0.0, np.minimum(b1[..., 3], b2[..., 3]) - np.maximum(b1[..., 1], b2[..., 1]) + one)
    inter = iw * ih
    area1 = np.maximum(0.0, b1[..., 2] - b1[..., 0] + one) * np.maximum(0.0, b1[..., 3] - b1[..., 1] + one)
    area2 = np.maximum(0.0, b2[..., 2] - b2[..., 0] + one) * np.maximum(0.0, b2[..., 3] - b2[..., 1] + one)
    union = area1 + area2 - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def refcoco_box_accuracy(
    pred_boxes: Any,
    gt_boxes: Any,
    thr: float = 0.5,
    coord: str = "abs",
    image_sizes: Any = None,
    gt_format: str = "xyxy",
    inclusive: bool = False,
) -> float:
    """REC Acc@thr: fraction of expressions whose one predicted box has IoU >= ``thr`` with the GT box.

    Shapes: ``pred_boxes`` [N, 4] ``[x1, y1, x2, y2]``; ``gt_boxes`` [N, 4] in ``gt_format`` ``"xyxy"`` or
    ``"xywh"`` (COCO; ``x2 = x + w``, or ``x + w - 1`` when ``inclusive``); ``image_sizes`` [N, 2] as (W, H).
    ``coord`` says how to read the predictions relative to the GT frame:

    * ``"abs"`` (default): already in the GT's frame, no transform (e.g. both 0-1 normalised, as lmms-eval's
      ``refcoco_bbox_rec`` compares them; or both absolute pixels).
    * ``"norm1"`` / ``"norm1000"``: 0-1 / 0-1000 normalised (Qwen2-VL, InternVL); scaled by ``image_sizes``.
    * ``"auto"``: VLMEvalKit ``RefCOCODataset._to_absolute``, per box: max|coord| <= 1.5 -> 0-1,
      <= 1000 -> 0-1000, else absolute; then clipped to the image and x/y pairs reordered if reversed.

    A prediction row holding NaN (unparsable answer) counts as a miss (IoU 0), as in VLMEvalKit.
    IoU is continuous by default (both harnesses); ``inclusive=True`` gives the MAttNet convention.
    """
    _check_choice("coord", coord, BOX_COORDS)
    _check_choice("gt_format", gt_format, ("xyxy", "xywh"))
    pred = _boxes(pred_boxes, "pred_boxes").copy()
    gt = _boxes(gt_boxes, "gt_boxes").copy()
    if len(pred) != len(gt):
        raise ValueError(f"len(pred_boxes)={len(pred)} != len(gt_boxes)={len(gt)}; expected one prediction per GT box")
    if len(pred) == 0:
        raise ValueError("no boxes given; expected at least one [x1, y1, x2, y2] row")
    if not 0.0 <= thr <= 1.0:
        raise ValueError(f"thr={thr!r} is outside [0, 1]")
    if gt_format == "xywh":
        extra = 1.0 if inclusive else 0.0
        gt[:, 2] = gt[:, 0] + gt[:, 2] - extra
        gt[:, 3] = gt[:, 1] + gt[:, 3] - extra

    if coord != "abs":
        if image_sizes is None:
            raise ValueError(f"coord={coord!r} needs image_sizes [N, 2] as (W, H); got None")
        sizes = _to_numpy(image_sizes).astype(np.float64)
        if sizes.shape != (len(pred), 2):
            raise ValueError(f"image_sizes must have shape [{len(pred)}, 2] as (W, H), got {tuple(sizes.shape)}")
        if not np.all(sizes > 0):
            raise ValueError(f"image_sizes must be positive, got {sizes[~np.all(sizes > 0, axis=1)].tolist()}")
        w, h = sizes[:, 0], sizes[:, 1]
        if coord == "norm1":
            scale = np.ones(len(pred))
        elif coord == "norm1000":
            scale = np.full(len(pred), 1.0 / 1000.0)
        else:
            with np.errstate(invalid="ignore"):
                m = np.max(np.abs(pred), axis=1)
            scale = np.where(m <= 1.5, 1.0, np.where(m <= 1000, 1.0 / 1000.0, np.nan))
        absolute = np.isnan(scale)  # "auto" only: already absolute
        s = np.where(absolute, 1.0, scale)
        pred[:, 0::2] = np.where(absolute[:, None], pred[:, 0::2], pred[:, 0::2] * s[:, None] * w[:, None])
        pred[:, 1::2] = np.where(absolute[:, None], pred[:, 1::2], pred[:, 1::2] * s[:, None] * h[:, None])
        if coord == "auto":
            pred[:, 0::2] = np.clip(pred[:, 0::2], 0.0, w[:, None])
            pred[:, 1::2] = np.clip(pred[:, 1::2], 0.0, h[:, None])
            x_lo, x_hi = np.minimum(pred[:, 0], pred[:, 2]), np.maximum(pred[:, 0], pred[:, 2])
            y_lo, y_hi = np.minimum(pred[:, 1], pred[:, 3]), np.maximum(pred[:, 1], pred[:, 3])
            pred = np.stack([x_lo, y_lo, x_hi, y_hi], axis=1)

    iou = box_iou(pred, gt, inclusive=inclusive)
    iou = np.where(np.isnan(pred).any(axis=1), 0.0, iou)
    return float(np.mean(iou >= thr))


# ============================================================================================
# Segmentation: LISA cIoU / gIoU, mmsegmentation / detectron2 mIoU
# ============================================================================================


def _int_labels(x: Any, name: str) -> np.ndarray:
    """Integer copy of a label map (bool/int, or float holding integral values)."""
    a = _to_numpy(x)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64)  # astype copies
    if np.issubdtype(a.dtype, np.floating):
        if not (np.all(np.isfinite(a)) and np.all(a == np.round(a))):
            raise ValueError(
                f"{name} must hold integer class labels, got non-integral floats "
                f"(e.g. {a[np.isfinite(a) & (a != np.round(a))].ravel()[:3].tolist()}); "
                "threshold logits first (LISA uses logits > 0)"
            )
        return a.astype(np.int64)
    raise ValueError(f"{name} must be a numeric array of class labels, got dtype {a.dtype}")


def _hist(values: np.ndarray, num_classes: int) -> np.ndarray:
    """torch.histc(x, bins=K, min=0, max=K-1) for integer x: out-of-range values fall in no bin."""
    v = values[(values >= 0) & (values <= num_classes - 1)]
    return np.bincount(v, minlength=num_classes).astype(np.int64)


def intersection_and_union(
    pred: Any, target: Any, num_classes: int = 2, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LISA ``intersectionAndUnionGPU``: per-class pixel areas of one prediction/target pair.

    ``pred`` and ``target`` are label maps of the same shape (any rank; bool/int, or floats with integral
    values). Pixels where ``target == ignore_index`` are set to ``ignore_index`` in the prediction (so they
    cancel out); values outside ``[0, num_classes-1]`` fall in no bin, as with ``torch.histc``.
    Returns ``(area_intersection, area_union, area_target)``, each int64 ``[num_classes]``.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    p = _int_labels(pred, "pred")
    t = _int_labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} != target shape {tuple(t.shape)}; expected equal shapes")
    p = p.reshape(-1)
    t = t.reshape(-1)
    p[t == ignore_index] = ignore_index
    inter = p[p == t]
    area_inter = _hist(inter, num_classes)
    area_pred = _hist(p, num_classes)
    area_target = _hist(t, num_classes)
    return area_inter, area_pred + area_target - area_inter, area_target


def _as_map_list(x: Any, name: str) -> list[Any]:
    """A list of per-sample maps from a list/tuple of maps or one array/tensor [N, ...] (ndim >= 3)."""
    if isinstance(x, (list, tuple)):
        return list(x)
    a = _to_numpy(x)
    if a.ndim < 3:
        raise ValueError(
            f"{name} must be a list of [H, W] maps or an array [N, H, W]; got an array of shape {tuple(a.shape)} "
            "(wrap a single map in a list)"
        )
    return list(a)


def _map_pairs(preds: Any, targets: Any) -> list[tuple[Any, Any]]:
    p_list = _as_map_list(preds, "preds")
    t_list = _as_map_list(targets, "targets")
    if len(p_list) != len(t_list):
        raise ValueError(f"len(preds)={len(p_list)} != len(targets)={len(t_list)}; expected one target per prediction")
    if not p_list:
        raise ValueError("preds is empty; expected at least one map")
    return list(zip(p_list, t_list))


def _fg_areas(pred: Any, target: Any, index: int, ignore_index: int) -> tuple[int, int]:
    """Foreground (class 1) intersection and union of one binary mask pair, validated."""
    p = _int_labels(pred, f"preds[{index}]")
    t = _int_labels(target, f"targets[{index}]")
    if p.shape != t.shape:
        raise ValueError(f"preds[{index}] shape {tuple(p.shape)} != targets[{index}] shape {tuple(t.shape)}")
    bad_p = np.setdiff1d(np.unique(p), [0, 1])
    if bad_p.size:
        raise ValueError(f"preds[{index}] must be a binary mask (0/1 or bool), found values {bad_p[:5].tolist()}; "
                         "threshold logits first (LISA uses logits > 0)")
    bad_t = np.setdiff1d(np.unique(t), [0, 1, ignore_index])
    if bad_t.size:
        raise ValueError(f"targets[{index}] must hold 0, 1 or ignore_index={ignore_index}, found {bad_t[:5].tolist()}")
    inter, union, _ = intersection_and_union(p, t, num_classes=2, ignore_index=ignore_index)
    return int(inter[1]), int(union[1])


def lisa_iou(inter: int, union: int) -> np.float32:
    """One expression's IoU as LISA computes it: I / (U + 1e-5) in float32, and 1 when both masks are empty."""
    # float32 as in LISA: int histc areas + python 1e-5 -> float32; +1.0 where union == 0.
    iou = np.float32(inter) / (np.float32(union) + np.float32(1e-5))
    if union == 0:
        iou = np.float32(iou + np.float32(1.0))
    return np.float32(iou)


def per_sample_iou(preds: Any, targets: Any, epsilon: bool = True, ignore_index: int = 255) -> np.ndarray:
    """Foreground IoU of each (pred, target) binary mask pair, as LISA's ``validate`` computes it.

    ``preds``/``targets``: lists of [H, W] masks (shapes may differ between samples) or arrays [N, H, W].
    Targets may hold ``ignore_index`` (pixels excluded). Returns [N].

    * ``epsilon=True`` (default, LISA): ``I / (U + 1e-5)`` in float32, plus 1.0 when ``U == 0`` (empty
      prediction and empty target score exactly 1.0). Identical small masks score ~0.9999999, not 1.0 (for
      unions >= 256 px the float32 epsilon vanishes and they score 1.0). Returns float32.
    * ``epsilon=False``: exact ``I / U`` in float64, 1.0 when ``U == 0``.
    """
    pairs = _map_pairs(preds, targets)
    out = []
    for i, (p, t) in enumerate(pairs):
        inter, union = _fg_areas(p, t, i, ignore_index)
        out.append(lisa_iou(inter, union) if epsilon else (1.0 if union == 0 else inter / union))
    return np.asarray(out, dtype=np.float32 if epsilon else np.float64)


def refer_seg_scores(preds: Any, targets: Any, epsilon: bool = True, ignore_index: int = 255) -> dict[str, float]:
    """Referring/reasoning segmentation cIoU and gIoU exactly as LISA ``train_ds.py::validate``.

    One entry per referring expression (shapes as in ``per_sample_iou``).

    * gIoU = mean of the per-expression foreground IoUs (``per_sample_iou``); LISA divides the float32 sum by
      ``count + 1e-5``.
    * cIoU = sum(I) / (sum(U) + 1e-10) over the whole split, float32 (so all-empty gives 0.0).

    ``epsilon=False`` is vlmkit's epsilon-free variant (NOT the default): exact ``I/U`` per sample, plain
    mean, ``sum(I)/sum(U)``, and cIoU 1.0 when every union is 0 (consistent with the both-empty = 1 rule).
    LISA groups expressions by image before averaging; that only changes float32 rounding, so vlmkit treats
    each expression as its own unit.
    """
    pairs = _map_pairs(preds, targets)
    areas = [_fg_areas(p, t, i, ignore_index) for i, (p, t) in enumerate(pairs)]
    return refer_seg_from_areas(areas, epsilon)


def refer_seg_from_areas(areas: Sequence[tuple[int, int]], epsilon: bool = True) -> dict[str, float]:
    """cIoU / gIoU from per-expression foreground (intersection, union) pixel counts, in order.

    The aggregation of ``refer_seg_scores`` (LISA ``validate``: float32 running sums and its epsilons), for
    callers that store counts instead of masks (the evaluation runner's resumable per-sample files).
    """
    n = len(areas)
    if n == 0:
        raise ValueError("no samples to aggregate")
    if not epsilon:
        ious = [1.0 if u == 0 else i / u for i, u in areas]
        sum_i = sum(i for i, _ in areas)
        sum_u = sum(u for _, u in areas)
        return {"cIoU": 1.0 if sum_u == 0 else sum_i / sum_u, "gIoU": float(sum(ious) / n)}
    acc = sum_i = sum_u = np.float32(0.0)
    for inter, union in areas:  # float32 running sums, as LISA's AverageMeters
        acc = np.float32(acc + lisa_iou(inter, union))
        sum_i = np.float32(sum_i + np.float32(inter))
        sum_u = np.float32(sum_u + np.float32(union))
    giou = np.float32(acc / np.float32(n + 1e-5))
    ciou = np.float32(sum_i / np.float32(sum_u + np.float32(1e-10)))
    return {"cIoU": float(ciou), "gIoU": float(giou)}


def _nanmean(x: np.ndarray) -> float:
    return float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else float("nan")


def mmseg_scores(tot_i: np.ndarray, tot_p: np.ndarray, tot_l: np.ndarray) -> dict[str, Any]:
    """mmseg's scores from dataset-summed float32 areas [K] (intersection, prediction, label).

    IoU / Acc per class (NaN where a class never occurs), mIoU / mAcc over the non-NaN classes, aAcc.
    """
    tot_u = tot_p + tot_l - tot_i
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = (tot_i / tot_u).astype(np.float32)
        acc = (tot_i / tot_l).astype(np.float32)
        a_acc = float(np.float32(tot_i.sum() / tot_l.sum()))
    return {"mIoU": _nanmean(iou), "IoU": iou, "Acc": acc, "mAcc": _nanmean(acc), "aAcc": a_acc}


def mean_iou(
    preds: Any,
    targets: Any,
    num_classes: int,
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
    mode: str = "mmseg",
) -> dict[str, Any]:
    """Semantic-segmentation mIoU over a dataset; areas are summed over all images before dividing.

    ``preds``/``targets``: lists of [H, W] label maps or arrays [N, H, W]. ``reduce_zero_label`` (ADE20K)
    maps target 0 -> 255 and every other label to label-1 first. Returns ``{"mIoU": float, "IoU": [K],
    "Acc": [K], "aAcc": float}`` as fractions (the references print x100; mmseg also rounds to 2 decimals).

    * ``"mmseg"`` (default, mmsegmentation ``IoUMetric``): target==ignore pixels removed from both maps; a
      predicted out-of-range value (e.g. 255) on a valid pixel falls in no predicted class but still counts in
      its GT class's union; ``IoU_c = I_c/U_c`` in float32; a class predicted but absent from the GT gets IoU 0
      and counts; a class with union 0 is NaN and dropped (``nanmean``). aAcc = sum(I)/sum(label).
    * ``"detectron2"`` (``SemSegEvaluator``): (K+1)x(K+1) confusion matrix, float64; mIoU averages only the
      classes present in the GT (a false-positive-only class is NaN, not 0), so mmseg <= detectron2.
      Predictions must lie in [0, K-1] and targets in [0, K-1] or ``ignore_index`` (detectron2 would index
      out of its matrix otherwise). aAcc = pACC.
    """
    _check_choice("mode", mode, MIOU_MODES)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    k = int(num_classes)
    pairs = _map_pairs(preds, targets)

    def prepare(i: int, p: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
        pa = _int_labels(p, f"preds[{i}]")
        ta = _int_labels(t, f"targets[{i}]")
        if pa.shape != ta.shape:
            raise ValueError(f"preds[{i}] shape {tuple(pa.shape)} != targets[{i}] shape {tuple(ta.shape)}")
        if reduce_zero_label:
            ta[ta == 0] = 255
            ta = ta - 1
            ta[ta == 254] = 255
        return pa.reshape(-1), ta.reshape(-1)

    if mode == "mmseg":
        tot_i = np.zeros(k, np.float32)
        tot_p = np.zeros(k, np.float32)
        tot_l = np.zeros(k, np.float32)
        for i, (p, t) in enumerate(pairs):
            pa, ta = prepare(i, p, t)
            valid = ta != ignore_index
            pa, ta = pa[valid], ta[valid]
            inter = pa[pa == ta]
            tot_i = tot_i + _hist(inter, k).astype(np.float32)  # histc returns float32; summed in float32
            tot_p = tot_p + _hist(pa, k).astype(np.float32)
            tot_l = tot_l + _hist(ta, k).astype(np.float32)
        return mmseg_scores(tot_i, tot_p, tot_l)

    conf = np.zeros((k + 1, k + 1), dtype=np.int64)
    for i, (p, t) in enumerate(pairs):
        pa, ta = prepare(i, p, t)
        ta = ta.copy()
        ta[ta == ignore_index] = k
        if pa.size and (pa.min() < 0 or pa.max() > k - 1):
            raise ValueError(f"preds[{i}] holds labels outside [0, {k - 1}] (min {pa.min()}, max {pa.max()}); "
                             "detectron2 mode expects argmax class ids")
        if ta.size and (ta.min() < 0 or ta.max() > k):
            raise ValueError(f"targets[{i}] holds labels outside [0, {k - 1}] that are not ignore_index={ignore_index}")
        conf += np.bincount((k + 1) * pa + ta, minlength=conf.size).reshape(conf.shape)
    acc = np.full(k, np.nan, dtype=np.float64)
    iou = np.full(k, np.nan, dtype=np.float64)
    tp = conf.diagonal()[:-1].astype(np.float64)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(np.float64)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(np.float64)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = np.logical_and(acc_valid, union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    miou = float(np.sum(iou[iou_valid]) / np.sum(iou_valid)) if iou_valid.any() else float("nan")
    p_acc = float(np.sum(tp) / np.sum(pos_gt)) if np.sum(pos_gt) > 0 else float("nan")
    return {"mIoU": miou, "IoU": iou, "Acc": acc, "aAcc": p_acc}
