"""Readers for the benchmarks' official local file formats, one function per format.

Every reader takes already-resolved paths (``tasks.resolve_dataset`` joins them onto ``--data-root``)
and returns a list of *docs*: plain dicts, one per evaluated item, in file order. Each doc has ``id``
(the dataset's own id: question id, sentence id, file stem), ``image`` (a path, or a PIL image for
Hugging Face datasets) and the format's fields (``question``, ``answers``, ``expression``, ``mask`` …;
``READERS[name].fields`` lists them). Masks stay on disk until scored: a doc holds a small *mask
source* dict that ``load_mask`` turns into an array.

Errors name the file and the record: a missing file raises ``FileNotFoundError``, a malformed
record ``ValueError("<file>: record 3 (question_id=7): ...")``.

Image names in data files are confined (``vlmkit.data.images.resolve_image_path``): a relative name must
resolve inside the dataset's image folder, symbolic links followed; absolute names and escapes are refused
unless the reader gets ``allow_absolute_paths=True`` (``vlmkit eval --allow-absolute-paths``).

Formats: VQAv2 questions/annotations JSON, GQA questions JSON, TextVQA JSON (+ optional Rosetta OCR
JSON), POPE JSONL, RefCOCO ``refs(unc).p`` pickle (restricted unpickler) or refs JSON + COCO
``instances.json``, ReasonSeg labelme JSON folders, ADE20K image/label folders, and Hugging Face
``datasets`` saved with ``save_to_disk`` or as parquet (needs the optional ``datasets`` package).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "ReaderSpec", "READERS", "read_vqav2", "read_gqa", "read_textvqa", "read_pope", "read_refcoco",
    "read_reasonseg", "read_ade20k", "read_hf", "load_refs_pickle", "load_image", "load_mask",
    "coco_polygons_to_mask", "ADE20K_CLASSES",
]

Doc = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Small helpers: files, JSON, record errors
# ---------------------------------------------------------------------------------------------


def _need_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {os.fspath(p)!r}")
    return p


def _need_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {os.fspath(p)!r}")
    return p


def _read_json(path: str | os.PathLike, what: str) -> Any:
    p = _need_file(path, what)
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{os.fspath(p)}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{os.fspath(p)}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err


def _read_json_list(path: str | os.PathLike, what: str, key: str) -> list:
    """``data[key]`` of a JSON object file whose ``key`` holds a list; ValueError naming the file otherwise."""
    data = _read_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{os.fspath(path)}: expected a {what} object with a {key!r} list")
    return data[key]


def _bad(path: Any, index: int, key: str | None, value: Any, msg: str) -> ValueError:
    """ValueError naming the file, the record index and (when known) its id."""
    return ValueError(f"{_record(path, index, key, value)}: {msg}")


def _record(path: Any, index: int, key: str | None = None, value: Any = None) -> str:
    """``<file>: record <index> (<key>=<value>)``: where a record is, for error messages."""
    ident = f" ({key}={value!r})" if key is not None else ""
    return f"{os.fspath(path)}: record {index}{ident}"


def _image(folder: Path, name: Any, where: str, allow_absolute: bool) -> str:
    """``folder / name`` confined to ``folder`` (``vlmkit.data.images.resolve_image_path``), as a str."""
    from vlmkit.data.images import resolve_image_path

    return str(resolve_image_path(name, folder, allow_absolute=allow_absolute, where=where))


def _field(rec: Any, name: str, types: type | tuple[type, ...], path: Any, index: int,
           id_key: str | None = None) -> Any:
    """``rec[name]`` checked against ``types``; ValueError naming file, record and field otherwise."""
    ident = rec.get(id_key) if isinstance(rec, dict) and id_key else None
    if not isinstance(rec, dict):
        raise _bad(path, index, None, None, f"expected an object, got {type(rec).__name__}")
    if name not in rec:
        raise _bad(path, index, id_key if ident is not None else None, ident, f"missing key {name!r}")
    value = rec[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _bad(path, index, id_key, ident, f"{name!r} must be {types}, got bool")
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise _bad(path, index, id_key if ident is not None else None, ident,
                   f"{name!r} must be {names}, got {type(value).__name__}: {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# VQAv2
# ---------------------------------------------------------------------------------------------


def read_vqav2(
    questions: str, images: str, annotations: str | None = None,
    image_pattern: str = "COCO_val2014_{image_id:012d}.jpg", allow_absolute_paths: bool = False,
) -> list[Doc]:
    """VQAv2 ``v2_OpenEnded_mscoco_<split>_questions.json`` (+ ``v2_mscoco_<split>_annotations.json``).

    ``image_pattern`` names an image from its record (``{image_id}``); the shapes benchmark uses
    ``shapes_{image_id:06d}.png``. Docs: id (question_id), image, image_id, question, answers (the 10
    human answers, in answer order), answer_type, question_type, multiple_choice_answer.

    A question with ``image_ids`` (a list of ints; ``shapes_multi``) is a multi-image doc: ``image`` is the
    list of its images in prompt order, each named by ``image_pattern`` with that ``image_id``.
    """
    question_list = _read_json_list(questions, "VQAv2 questions", "questions")
    anns: dict[int, dict] = {}
    if annotations is not None:
        for i, rec in enumerate(_read_json_list(annotations, "VQAv2 annotations", "annotations")):
            qid = _field(rec, "question_id", int, annotations, i, "question_id")
            answers = _field(rec, "answers", list, annotations, i, "question_id")
            for j, a in enumerate(answers):
                if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                    raise _bad(annotations, i, "question_id", qid, f"answers[{j}] must be an object with a str 'answer'")
            anns[qid] = rec
    images_dir = _need_dir(images, "VQAv2 images")
    docs = []
    for i, rec in enumerate(question_list):
        qid = _field(rec, "question_id", int, questions, i, "question_id")
        image_id = _field(rec, "image_id", int, questions, i, "question_id")
        question = _field(rec, "question", str, questions, i, "question_id")
        try:
            name = image_pattern.format(**rec)
        except (KeyError, IndexError, ValueError) as err:
            raise _bad(questions, i, "question_id", qid, f"image_pattern {image_pattern!r} does not apply: {err!r}") from err
        image = _image(images_dir, name, _record(questions, i, "question_id", qid), allow_absolute_paths)
        if "image_ids" in rec:  # a multi-image doc (shapes_multi): its images in prompt order
            ids = _field(rec, "image_ids", list, questions, i, "question_id")
            if not ids or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
                raise _bad(questions, i, "question_id", qid, f"'image_ids' must be a non-empty list of ints, got {ids!r}")
            image = [_image(images_dir, image_pattern.format(**{**rec, "image_id": v}),
                            _record(questions, i, "question_id", qid), allow_absolute_paths) for v in ids]
        doc = {"id": qid, "image": image, "image_id": image_id, "question": question,
               "answers": None, "answer_type": None, "question_type": None, "multiple_choice_answer": None}
        if annotations is not None:
            ann = anns.get(qid)
            if ann is None:
                raise _bad(questions, i, "question_id", qid, f"no annotation for this question in {annotations}")
            doc.update(
                answers=[a["answer"] for a in ann["answers"]],
                answer_type=ann.get("answer_type"),
                question_type=ann.get("question_type"),
                multiple_choice_answer=ann.get("multiple_choice_answer"),
            )
        docs.append(doc)
    return docs


# ---------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------


def read_gqa(questions: str, images: str, image_ext: str = ".jpg", balanced_only: bool = False,
             allow_absolute_paths: bool = False) -> list[Doc]:
    """GQA ``<split>_questions.json`` (``{qid: {imageId, question, answer, types, isBalanced}}``).

    Docs: id (question id, str), image (``images/<imageId><image_ext>``), image_id, question, answer,
    structural / semantic / detailed (question types). ``balanced_only`` keeps ``isBalanced`` questions.
    """
    data = _read_json(questions, "GQA questions")
    if not isinstance(data, dict):
        raise ValueError(f"{questions}: expected a GQA questions object {{question_id: record}}, got {type(data).__name__}")
    images_dir = _need_dir(images, "GQA images")
    docs = []
    for i, (qid, rec) in enumerate(data.items()):
        if not isinstance(rec, dict):
            raise _bad(questions, i, "question_id", qid, f"expected an object, got {type(rec).__name__}")
        rec = {"question_id": qid, **rec}
        image_id = _field(rec, "imageId", str, questions, i, "question_id")
        question = _field(rec, "question", str, questions, i, "question_id")
        answer = _field(rec, "answer", str, questions, i, "question_id")
        if balanced_only and not rec.get("isBalanced", False):
            continue
        types = rec.get("types") or {}
        image = _image(images_dir, f"{image_id}{image_ext}", _record(questions, i, "question_id", qid),
                       allow_absolute_paths)
        docs.append({"id": str(qid), "image": image, "image_id": image_id,
                     "question": question, "answer": answer, "structural": types.get("structural"),
                     "semantic": types.get("semantic"), "detailed": types.get("detailed")})
    return docs


# ---------------------------------------------------------------------------------------------
# TextVQA
# ---------------------------------------------------------------------------------------------


def read_textvqa(questions: str, images: str, ocr: str | None = None, image_ext: str = ".jpg",
                 allow_absolute_paths: bool = False) -> list[Doc]:
    """TextVQA ``TextVQA_0.5.1_<split>.json`` (``{"data": [{question_id, image_id, question, answers}]}``).

    ``ocr``: optional Rosetta OCR JSON (``{"data": [{image_id, ocr_tokens}]}``); ``ocr_hint`` is then
    LLaVA's ``"\\nReference OCR token: a, b, c"`` (empty without OCR or tokens). Docs: id, image,
    image_id, question, answers, ocr_tokens, ocr_hint.
    """
    records = _read_json_list(questions, "TextVQA", "data")
    tokens_of: dict[str, list[str]] = {}
    if ocr is not None:
        for i, rec in enumerate(_read_json_list(ocr, "Rosetta OCR", "data")):
            image_id = _field(rec, "image_id", str, ocr, i, "image_id")
            toks = _field(rec, "ocr_tokens", list, ocr, i, "image_id")
            tokens_of[image_id] = [str(t) for t in toks]
    images_dir = _need_dir(images, "TextVQA images")
    docs = []
    for i, rec in enumerate(records):
        qid = _field(rec, "question_id", int, questions, i, "question_id")
        image_id = _field(rec, "image_id", str, questions, i, "question_id")
        question = _field(rec, "question", str, questions, i, "question_id")
        answers = _field(rec, "answers", list, questions, i, "question_id")
        if not all(isinstance(a, str) for a in answers):
            raise _bad(questions, i, "question_id", qid, "'answers' must be a list of str")
        toks = tokens_of.get(image_id, [])
        hint = ("\nReference OCR token: " + ", ".join(toks)) if toks else ""
        image = _image(images_dir, f"{image_id}{image_ext}", _record(questions, i, "question_id", qid),
                       allow_absolute_paths)
        docs.append({"id": qid, "image": image, "image_id": image_id,
                     "question": question, "answers": list(answers), "ocr_tokens": toks, "ocr_hint": hint})
    return docs


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


def _read_jsonl(path: str | os.PathLike, what: str) -> list[tuple[int, Any]]:
    """(line number, record) of every non-blank line; ValueError naming file and line otherwise."""
    p = _need_file(path, what)
    out = []
    with open(p, "rb") as f:  # bytes, so that a decoding error names its line too
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{os.fspath(p)}: line {n} is not UTF-8 text ({err.reason} at byte {err.start} "
                                 "of the line)") from None
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{os.fspath(p)}: line {n} is not valid JSON: {err.msg} at column {err.colno}") from err
    return out


def read_pope(images: str, files: dict[str, str] | None = None, file: str | None = None,
              allow_absolute_paths: bool = False) -> list[Doc]:
    """POPE JSONL (``coco_pope_<category>.json``: one ``{question_id, image, text, label}`` per line).

    ``files`` maps category → file (random / popular / adversarial); ``file`` is one file whose lines
    may carry their own ``category``. Docs: id (``<category>/<question_id>``), image, question, label
    ("yes"/"no"), category.
    """
    if (files is None) == (file is None):
        raise ValueError("POPE needs exactly one of 'files' ({category: path}) or 'file' (one JSONL path)")
    sources = list(files.items()) if files is not None else [(None, file)]
    images_dir = _need_dir(images, "POPE images")
    docs = []
    for category, path in sources:
        for n, rec in _read_jsonl(path, f"POPE {category or ''}".strip()):
            where = f"{path}: line {n}"
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
            for key, types in (("question_id", (int, str)), ("image", str), ("text", str)):
                if not isinstance(rec.get(key), types):
                    raise ValueError(f"{where} (question_id={rec.get('question_id')!r}): missing or invalid {key!r}")
            label = rec.get("label", rec.get("answer"))
            if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
                raise ValueError(f"{where} (question_id={rec['question_id']!r}): 'label' must be 'yes' or 'no', got {label!r}")
            cat = category if category is not None else str(rec.get("category", "all"))
            image = _image(images_dir, rec["image"], f"{where} (question_id={rec['question_id']!r})",
                           allow_absolute_paths)
            docs.append({"id": f"{cat}/{rec['question_id']}", "image": image,
                         "question": rec["text"], "label": label.strip().lower(), "category": cat})
    return docs


# ---------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg
# ---------------------------------------------------------------------------------------------

def load_refs_pickle(path: str | os.PathLike) -> Any:
    """Load a RefCOCO ``refs(unc).p`` safely: ``vlmkit.data.safe_pickle.load_refs_pickle`` (builtin containers,
    str, bytes and numbers only, Python-2 str decoded as latin-1, size-bounded; ValueError naming the file)."""
    from vlmkit.data.safe_pickle import load_refs_pickle as _load

    return _load(path)


def read_refcoco(
    refs: str, instances: str, images: str, split: str | None = "val", sentence_key: str = "sent",
    allow_absolute_paths: bool = False,
) -> list[Doc]:
    """RefCOCO-style refs (``refs(unc).p`` pickle or ``refs.json``) + COCO ``instances.json``.

    One doc per referring sentence of the refs in ``split`` (None = all). Docs: id (sent_id), image
    (``images/<instances image file_name>``), image_id, expression, ref_id, ann_id, bbox (COCO
    ``[x, y, w, h]``), height, width, category_id, split, mask (a COCO mask source for ``load_mask``).
    """
    ref_list = load_refs_pickle(refs) if str(refs).endswith((".p", ".pkl", ".pickle")) else _read_json(refs, "RefCOCO refs")
    if not isinstance(ref_list, list):
        raise ValueError(f"{refs}: expected a list of refs, got {type(ref_list).__name__}")
    inst = _read_json(instances, "COCO instances")
    if not isinstance(inst, dict) or not isinstance(inst.get("images"), list) or not isinstance(inst.get("annotations"), list):
        raise ValueError(f"{instances}: expected a COCO instances object with 'images' and 'annotations' lists")
    images_by_id = {}
    for i, im in enumerate(inst["images"]):
        iid = _field(im, "id", int, instances, i, "id")
        _field(im, "file_name", str, instances, i, "id")
        images_by_id[iid] = im
    anns_by_id = {}
    for i, ann in enumerate(inst["annotations"]):
        anns_by_id[_field(ann, "id", int, instances, i, "id")] = ann
    images_dir = _need_dir(images, "RefCOCO images")
    docs = []
    for i, ref in enumerate(ref_list):
        ref_id = ref.get("ref_id") if isinstance(ref, dict) else None
        ann_id = _field(ref, "ann_id", int, refs, i, "ref_id")
        image_id = _field(ref, "image_id", int, refs, i, "ref_id")
        sentences = _field(ref, "sentences", list, refs, i, "ref_id")
        if split is not None and ref.get("split") != split:
            continue
        ann = anns_by_id.get(ann_id)
        if ann is None:
            raise _bad(refs, i, "ref_id", ref_id, f"ann_id {ann_id} is not in {instances}")
        im = images_by_id.get(image_id)
        if im is None:
            raise _bad(refs, i, "ref_id", ref_id, f"image_id {image_id} is not in {instances}")
        if "segmentation" not in ann or "bbox" not in ann:
            raise ValueError(f"{instances}: annotation id={ann_id}: needs 'segmentation' and 'bbox'")
        h, w = int(im.get("height", 0)), int(im.get("width", 0))
        image = _image(images_dir, im["file_name"], f"{os.fspath(instances)}: image id={image_id} (ref {ref_id!r})",
                       allow_absolute_paths)
        for j, sent in enumerate(sentences):
            text = sent.get(sentence_key, sent.get("raw")) if isinstance(sent, dict) else None
            if not isinstance(text, str) or "sent_id" not in sent:
                raise _bad(refs, i, "ref_id", ref_id, f"sentences[{j}] needs 'sent_id' and a str {sentence_key!r}")
            docs.append({
                "id": sent["sent_id"], "image": image, "image_id": image_id,
                "expression": text, "ref_id": ref_id, "ann_id": ann_id, "bbox": [float(v) for v in ann["bbox"]],
                "height": h, "width": w, "category_id": ref.get("category_id"), "split": ref.get("split"),
                "mask": {"kind": "coco", "segmentation": ann["segmentation"], "size": [h, w], "ann_id": ann_id},
            })
    return docs


# ---------------------------------------------------------------------------------------------
# ReasonSeg
# ---------------------------------------------------------------------------------------------

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def read_reasonseg(folder: str, all_sentences: bool = False, allow_absolute_paths: bool = False) -> list[Doc]:
    """ReasonSeg split folder: ``<name>.jpg`` + labelme-style ``<name>.json`` (``text``, ``is_sentence``,
    ``shapes``). LISA's ``ValDataset`` evaluates the first sentence of each image; ``all_sentences``
    makes one doc per sentence. ``question`` is LISA's prompt text ("{sent} Please output segmentation
    mask." for sentences, "What is {sent} in this image? Please output segmentation mask." otherwise).
    Docs: id (stem, or ``stem/k``), image, expression, question, is_sentence, mask.
    """
    root = _need_dir(folder, "ReasonSeg")
    jsons = sorted(root.glob("*.json"))
    if not jsons:
        raise FileNotFoundError(f"no ReasonSeg *.json annotations in {os.fspath(root)!r}")
    docs = []
    for path in jsons:
        rec = _read_json(path, "ReasonSeg annotation")
        texts = rec.get("text") if isinstance(rec, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path}: 'text' must be a non-empty list of str")
        if not isinstance(rec.get("shapes"), list):
            raise ValueError(f"{path}: 'shapes' must be a list of labelme polygons")
        image = next((path.with_suffix(e) for e in _IMAGE_EXTS if path.with_suffix(e).is_file()), None)
        if image is None:
            raise FileNotFoundError(f"{path}: no image {path.stem}{{{','.join(_IMAGE_EXTS)}}} next to it")
        image = _image(root, image.name, os.fspath(path), allow_absolute_paths)  # a link out of the folder
        is_sentence = bool(rec.get("is_sentence", False))
        for k, text in enumerate(texts if all_sentences else texts[:1]):
            question = (f"{text} Please output segmentation mask." if is_sentence
                        else f"What is {text} in this image? Please output segmentation mask.")
            docs.append({"id": f"{path.stem}/{k}" if all_sentences else path.stem, "image": image,
                         "expression": text, "question": question, "is_sentence": is_sentence,
                         "mask": {"kind": "labelme", "path": str(path)}})
    return docs


# ---------------------------------------------------------------------------------------------
# ADE20K
# ---------------------------------------------------------------------------------------------

#: ADE20K-150 class names in label order (mmsegmentation ``ade_classes``; its "bed " is "bed" here).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)


def read_ade20k(images: str, annotations: str, image_ext: str = ".jpg", label_ext: str = ".png",
                allow_absolute_paths: bool = False) -> list[Doc]:
    """ADEChallengeData2016 ``images/<split>/*.jpg`` + ``annotations/<split>/*.png`` (uint8 labels,
    0 = other). Pairs by file stem, sorted. Docs: id (stem), image, mask (label-PNG source)."""
    img_dir = _need_dir(images, "ADE20K images")
    ann_dir = _need_dir(annotations, "ADE20K annotations")
    paths = sorted(img_dir.glob(f"*{image_ext}"))
    if not paths:
        raise FileNotFoundError(f"no ADE20K images *{image_ext} in {os.fspath(img_dir)!r}")
    docs = []
    for p in paths:
        label = ann_dir / f"{p.stem}{label_ext}"
        if not label.is_file():
            raise FileNotFoundError(f"ADE20K label for image {os.fspath(p)!r} not found: {os.fspath(label)!r}")
        image = _image(img_dir, p.name, f"ADE20K image {p.stem!r}", allow_absolute_paths)  # a link out of the folder
        label = _image(ann_dir, label.name, f"ADE20K image {p.stem!r}", allow_absolute_paths)
        docs.append({"id": p.stem, "image": image, "mask": {"kind": "label_png", "path": label}})
    return docs


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (optional)
# ---------------------------------------------------------------------------------------------


def read_hf(
    fields: dict[str, str], path: str | None = None, parquet: str | list[str] | None = None,
    split: str | None = None, id_column: str | None = None, image_column: str = "image",
) -> list[Doc]:
    """A Hugging Face dataset saved with ``save_to_disk`` (``path``) or parquet files (``parquet``).

    ``fields`` maps doc field → column (e.g. ``{question: question, answers: answers}``); ``image_column``
    holds images (decoded to PIL by ``datasets``) and ``id_column`` the id (default: row index). Needs
    the optional ``datasets`` package.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "the 'hf' data format reads Hugging Face datasets and needs the `datasets` package, which is not "
            "installed (pip install datasets); use one of the official file formats instead"
        ) from err
    if (path is None) == (parquet is None):
        raise ValueError("the 'hf' data format needs exactly one of 'path' (save_to_disk folder) or 'parquet'")
    if path is not None:
        _need_dir(path, "Hugging Face dataset")
        ds = datasets.load_from_disk(path)
    else:
        files = [parquet] if isinstance(parquet, str) else list(parquet)
        for f in files:
            if not any(c in f for c in "*?[") and not os.path.isfile(f):
                raise FileNotFoundError(f"parquet file not found: {f!r}")
        ds = datasets.load_dataset("parquet", data_files=files)
    if isinstance(ds, (datasets.DatasetDict, dict)):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{path or parquet}: several splits {sorted(ds)}; set 'split'")
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"{path or parquet}: no split {split!r}; available: {sorted(ds)}")
        ds = ds[split]
    columns = set(ds.column_names)
    wanted = {image_column, *fields.values(), *([id_column] if id_column else [])}
    missing = sorted(wanted - columns)
    if missing:
        raise ValueError(f"{path or parquet}: columns {missing} not in the dataset; it has {sorted(columns)}")
    docs = []
    for i, row in enumerate(ds):
        doc = {"id": row[id_column] if id_column else i, "image": row[image_column]}
        doc.update({k: row[c] for k, c in fields.items()})
        docs.append(doc)
    return docs


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
    """A data format: its reader, which dataset keys it takes (``paths`` are joined onto the data
    root), which are required, and the doc fields it produces (usable in prompt templates)."""

    fn: Callable[..., list[Doc]]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    paths: tuple[str, ...]
    fields: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)


READERS: dict[str, ReaderSpec] = {
    "vqav2": ReaderSpec(read_vqav2, ("questions", "images"), ("annotations", "image_pattern"),
                        ("questions", "images", "annotations"),
                        ("id", "image", "image_id", "question", "answers", "answer_type", "question_type",
                         "multiple_choice_answer")),
    "gqa": ReaderSpec(read_gqa, ("questions", "images"), ("image_ext", "balanced_only"), ("questions", "images"),
                      ("id", "image", "image_id", "question", "answer", "structural", "semantic", "detailed")),
    "textvqa": ReaderSpec(read_textvqa, ("questions", "images"), ("ocr", "image_ext"), ("questions", "images", "ocr"),
                          ("id", "image", "image_id", "question", "answers", "ocr_tokens", "ocr_hint")),
    "pope": ReaderSpec(read_pope, ("images",), ("files", "file"), ("images", "files", "file"),
                       ("id", "image", "question", "label", "category")),
    "refcoco": ReaderSpec(read_refcoco, ("refs", "instances", "images"), ("split", "sentence_key"),
                          ("refs", "instances", "images"),
                          ("id", "image", "image_id", "expression", "ref_id", "ann_id", "bbox", "height", "width",
                           "category_id", "split", "mask")),
    "reasonseg": ReaderSpec(read_reasonseg, ("folder",), ("all_sentences",), ("folder",),
                            ("id", "image", "expression", "question", "is_sentence", "mask")),
    "ade20k": ReaderSpec(read_ade20k, ("images", "annotations"), ("image_ext", "label_ext"), ("images", "annotations"),
                         ("id", "image", "mask")),
    "hf": ReaderSpec(read_hf, ("fields",), ("path", "parquet", "split", "id_column", "image_column"),
                     ("path", "parquet"), ("id", "image")),  # plus the keys of `fields`
}


# ---------------------------------------------------------------------------------------------
# Images and masks
# ---------------------------------------------------------------------------------------------


def load_image(doc: Doc, where: str = ""):
    """The doc's image as an RGB PIL image (``vlmkit.data.images.open_image``: FileNotFoundError / ValueError
    naming the file and doc). An image above ``open_image``'s pixel budget is downscaled when opened, with a
    warning, except for docs with a ground-truth ``mask``, which are scored at the image's own size."""
    from vlmkit.data.images import MAX_PIXELS, open_image

    src = doc["image"]
    if hasattr(src, "convert"):
        return src.convert("RGB")
    return open_image(src, where=f"{where}doc {doc.get('id')!r}: ",
                      max_pixels=None if doc.get("mask") is not None else MAX_PIXELS)


def _poly_counts(xy: list[float], h: int, w: int) -> list[int]:
    """COCO counts of one polygon, as ``maskApi.c::rleFrPoly`` (pycocotools ``frPyObjects``)."""
    scale = 5.0
    k = len(xy) // 2
    x = [int(scale * xy[2 * j] + 0.5) for j in range(k)]
    y = [int(scale * xy[2 * j + 1] + 0.5) for j in range(k)]
    x.append(x[0])
    y.append(y[0])
    u: list[int] = []
    v: list[int] = []
    for j in range(k):  # dense boundary points of the upsampled polygon
        xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            s = (ye - ys) / dx if dx else 0.0
            for d in range(dx + 1):
                t = dx - d if flip else d
                u.append(t + xs)
                v.append(int(ys + s * t + 0.5))
        else:
            s = (xe - xs) / dy
            for d in range(dy + 1):
                t = dy - d if flip else d
                v.append(t + ys)
                u.append(int(xs + s * t + 0.5))
    a: list[int] = []
    for j in range(1, len(u)):  # points along the y-boundary, downsampled
        if u[j] == u[j - 1]:
            continue
        xd = float(u[j] if u[j] < u[j - 1] else u[j] - 1)
        xd = (xd + 0.5) / scale - 0.5
        if math.floor(xd) != xd or xd < 0 or xd > w - 1:
            continue
        yd = float(v[j] if v[j] < v[j - 1] else v[j - 1])
        yd = (yd + 0.5) / scale - 0.5
        yd = 0.0 if yd < 0 else (float(h) if yd > h else yd)
        yd = math.ceil(yd)
        a.append(int(xd) * h + int(yd))
    a.append(h * w)
    a.sort()
    prev = 0
    for j in range(len(a)):
        a[j], prev = a[j] - prev, a[j]
    b = [a[0]]
    j = 1
    while j < len(a):
        if a[j] > 0:
            b.append(a[j])
            j += 1
        else:
            j += 1
            if j < len(a):
                b[-1] += a[j]
                j += 1
    return b


def coco_polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """uint8 [H, W]: the per-polygon masks of a COCO annotation *summed* (LISA's refer-seg loader does
    ``np.sum(mask.decode(frPyObjects(...)), axis=2)``, so overlapping polygons give 2). Rasterised
    exactly as pycocotools (a port of ``rleFrPoly``)."""
    from vlmkit.data.rle import rle_decode

    out = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        if len(poly) < 6 or len(poly) % 2:
            raise ValueError(f"a COCO polygon needs an even number >= 6 of coordinates, got {len(poly)}")
        counts = _poly_counts([float(c) for c in poly], height, width)
        out += rle_decode({"size": [height, width], "counts": counts}).astype(np.uint8)
    return out


def _labelme_mask(path: str, height: int | None = None, width: int | None = None) -> np.ndarray:
    """LISA ``get_mask_from_json``: polygons sorted by area (largest first) painted with 1, or 255 for
    labels containing "ignore"; "flag" shapes skipped. Uses PIL instead of cv2 (``fillPoly`` +
    ``polylines`` thickness 1): boundary pixels can differ slightly from the reference."""
    from PIL import Image, ImageDraw

    rec = _read_json(path, "ReasonSeg annotation")
    if height is None or width is None:
        image = next((Path(path).with_suffix(e) for e in _IMAGE_EXTS if Path(path).with_suffix(e).is_file()), None)
        if image is None:
            raise FileNotFoundError(f"{path}: no image next to it to size the mask")
        with Image.open(image) as im:
            width, height = im.size

    def paint(points, value, canvas):
        pts = [(int(np.int32(px)), int(np.int32(py))) for px, py in points]
        draw = ImageDraw.Draw(canvas)
        if len(pts) >= 2:
            draw.polygon(pts, fill=value, outline=value)
        elif pts:
            draw.point(pts, fill=value)

    shapes = []
    for i, shape in enumerate(rec.get("shapes", [])):
        if not isinstance(shape, dict) or not isinstance(shape.get("points"), list) or "label" not in shape:
            raise ValueError(f"{path}: shapes[{i}] needs 'label' and a 'points' list")
        if str(shape["label"]).lower() == "flag":
            continue
        tmp = Image.new("L", (width, height), 0)
        paint(shape["points"], 1, tmp)
        shapes.append((int(np.asarray(tmp, dtype=np.uint8).sum()), i, shape))
    order = sorted(range(len(shapes)), key=lambda k: shapes[k][0], reverse=True)
    canvas = Image.new("L", (width, height), 0)
    for k in order:
        shape = shapes[k][2]
        paint(shape["points"], 255 if "ignore" in str(shape["label"]).lower() else 1, canvas)
    return np.asarray(canvas, dtype=np.uint8).copy()


def load_mask(source: dict[str, Any]) -> np.ndarray:
    """A doc's ground-truth mask as uint8 [H, W] from its mask source.

    ``coco``: polygons (summed, see ``coco_polygons_to_mask``) or RLE (compressed or uncompressed) at
    ``size``; ``labelme``: ReasonSeg JSON (1 = target, 255 = ignore); ``label_png``: a label image.
    """
    from vlmkit.data.rle import rle_decode

    kind = source.get("kind")
    if kind == "coco":
        seg = source["segmentation"]
        h, w = (int(v) for v in source["size"])
        if isinstance(seg, list):
            if not seg:
                return np.zeros((h, w), dtype=np.uint8)
            return coco_polygons_to_mask(seg, h, w)
        if isinstance(seg, dict):
            return rle_decode(seg).astype(np.uint8)
        raise ValueError(f"COCO annotation {source.get('ann_id')}: unsupported segmentation {type(seg).__name__}")
    if kind == "labelme":
        return _labelme_mask(source["path"])
    if kind == "label_png":
        from PIL import Image

        path = _need_file(source["path"], "label")
        with Image.open(path) as im:
            arr = np.asarray(im)
        if arr.ndim != 2:
            raise ValueError(f"{os.fspath(path)}: a label image must be single-channel, got shape {arr.shape}")
        return arr
    raise ValueError(f"unknown mask source kind {kind!r}; accepted: coco, labelme, label_png")
