"""Readers of the benchmarks' local formats, task YAML validation, parsers and the area-based aggregations.

Fixtures are small files in the official formats: the shapes benchmark writers (VQAv2 JSON, COCO
instances with RLE, RefCOCO-style refs) and hand-made GQA / TextVQA / POPE / RefCOCO-pickle /
ReasonSeg / ADE20K files. Expected values come from the fixtures themselves (what was written) or
from hand-computed geometry, never from the code under test.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmkit.evaluation import readers as R
from vlmkit.evaluation import tasks as T

# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from vlmkit.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, 3, seed=5)
    return root


def _png(path: Path, size=(8, 6), value=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _write_json(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


# ---------------------------------------------------------------------------------------------
# VQAv2 (shapes writer)
# ---------------------------------------------------------------------------------------------


def test_vqav2_reads_shapes_questions_and_answers(shapes_dir):
    from vlmkit.data.shapes import generate

    docs = R.read_vqav2(shapes_dir / "v2_OpenEnded_mscoco_val_questions.json", shapes_dir / "images",
                        shapes_dir / "v2_mscoco_val_annotations.json", image_pattern="shapes_{image_id:06d}.png")
    samples = generate(3, seed=5)
    expected = [(s.image_id, q["question"], q["answer"], q["type"]) for s in samples for q in s.questions]
    assert [(d["image_id"], d["question"], d["answers"][0], d["question_type"]) for d in docs] == expected
    assert all(len(d["answers"]) == 10 and os.path.isfile(d["image"]) for d in docs)
    assert docs[0]["id"] == samples[0].image_id * 1000


def test_vqav2_errors_name_file_and_record(tmp_path, shapes_dir):
    qfile = shapes_dir / "v2_OpenEnded_mscoco_val_questions.json"
    data = json.loads(qfile.read_text())
    del data["questions"][2]["question"]
    bad = _write_json(tmp_path / "q.json", data)
    with pytest.raises(ValueError, match=r"q\.json: record 2 \(question_id=\d+\): missing key 'question'"):
        R.read_vqav2(bad, shapes_dir / "images")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        R.read_vqav2(tmp_path / "nope.json", shapes_dir / "images")
    ann = json.loads((shapes_dir / "v2_mscoco_val_annotations.json").read_text())
    ann["annotations"] = ann["annotations"][1:]
    short = _write_json(tmp_path / "a.json", ann)
    with pytest.raises(ValueError, match=r"record 0 .*no annotation for this question"):
        R.read_vqav2(qfile, shapes_dir / "images", short, image_pattern="shapes_{image_id:06d}.png")


# ---------------------------------------------------------------------------------------------
# GQA, TextVQA, POPE (hand-made)
# ---------------------------------------------------------------------------------------------


def test_gqa_questions(tmp_path):
    images = tmp_path / "images"
    _png(images / "n1.jpg")
    q = _write_json(tmp_path / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "isBalanced": True,
                "types": {"structural": "verify", "semantic": "attr", "detailed": "color"}},
        "202": {"imageId": "n1", "question": "What color?", "answer": "blue", "isBalanced": False, "types": {}},
    })
    docs = R.read_gqa(q, images)
    assert [(d["id"], d["answer"], d["structural"]) for d in docs] == [("201", "yes", "verify"), ("202", "blue", None)]
    assert docs[0]["image"] == str(images / "n1.jpg")
    assert [d["id"] for d in R.read_gqa(q, images, balanced_only=True)] == ["201"]
    bad = _write_json(tmp_path / "bad.json", {"7": {"imageId": "n1", "question": "q?"}})
    with pytest.raises(ValueError, match=r"bad\.json: record 0 \(question_id='7'\): missing key 'answer'"):
        R.read_gqa(bad, images)


def test_textvqa_with_ocr_hint(tmp_path):
    images = tmp_path / "train_images"
    _png(images / "abc.jpg")
    q = _write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "data": [
        {"question_id": 5, "image_id": "abc", "question": "what brand?", "answers": ["nokia"] * 10},
        {"question_id": 6, "image_id": "abc", "question": "what year?", "answers": ["1999"] * 9 + ["99"]},
    ]})
    ocr = _write_json(tmp_path / "ocr.json", {"data": [{"image_id": "abc", "ocr_tokens": ["nokia", "1999"]}]})
    docs = R.read_textvqa(q, images, ocr)
    assert docs[0]["ocr_hint"] == "\nReference OCR token: nokia, 1999"
    assert docs[1]["answers"][-1] == "99"
    assert R.read_textvqa(q, images)[0]["ocr_hint"] == ""
    bad = _write_json(tmp_path / "bad.json", {"data": [{"question_id": 1, "image_id": "abc", "question": "q", "answers": "x"}]})
    with pytest.raises(ValueError, match=r"bad\.json: record 0 \(question_id=1\): 'answers' must be list"):
        R.read_textvqa(bad, images)


def test_pope_jsonl_categories_and_bad_lines(tmp_path):
    images = tmp_path / "val2014"
    _png(images / "COCO_val2014_000000000001.jpg")
    lines = [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?", "label": "yes"},
             {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?", "label": "no"}]
    rnd = tmp_path / "coco_pope_random.json"
    rnd.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    adv = tmp_path / "coco_pope_adversarial.json"
    adv.write_text(json.dumps(lines[0]) + "\n")
    docs = R.read_pope(images, files={"random": str(rnd), "adversarial": str(adv)})
    assert [(d["id"], d["label"], d["category"]) for d in docs] == [
        ("random/1", "yes", "random"), ("random/2", "no", "random"), ("adversarial/1", "yes", "adversarial")]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.json: line 2 is not valid JSON"):
        R.read_pope(images, file=str(broken))
    badlabel = tmp_path / "badlabel.json"
    badlabel.write_text(json.dumps({**lines[0], "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"badlabel\.json: line 1 \(question_id=1\): 'label' must be 'yes' or 'no'"):
        R.read_pope(images, file=str(badlabel))


# ---------------------------------------------------------------------------------------------
# RefCOCO: shapes refs.json + instances.json, the pickle, polygons
# ---------------------------------------------------------------------------------------------


def test_refcoco_shapes_masks_equal_the_generated_objects(shapes_dir):
    from vlmkit.data.shapes import generate

    docs = R.read_refcoco(shapes_dir / "refs.json", shapes_dir / "instances.json", shapes_dir / "images")
    samples = generate(3, seed=5)
    expected = [(s.image_id, r["sentence"], r["object_index"]) for s in samples for i in range(len(s.objects))
                for r in s.refs if r["object_index"] == i]
    assert [(d["image_id"], d["expression"]) for d in docs] == [(e[0], e[1]) for e in expected]
    for doc, (image_id, _, obj) in zip(docs, expected):
        sample = samples[image_id - 1]
        np.testing.assert_array_equal(R.load_mask(doc["mask"]), sample.objects[obj].mask.astype(np.uint8))
        assert doc["bbox"] == [float(v) for v in sample.objects[obj].bbox]
    assert R.read_refcoco(shapes_dir / "refs.json", shapes_dir / "instances.json", shapes_dir / "images", split="test") == []


def test_refcoco_pickle_matches_json_and_refuses_objects(tmp_path, shapes_dir):
    refs = json.loads((shapes_dir / "refs.json").read_text())
    pkl = tmp_path / "refs(unc).p"
    pkl.write_bytes(pickle.dumps(refs, protocol=2))
    args = (shapes_dir / "instances.json", shapes_dir / "images")
    from_pickle = R.read_refcoco(pkl, *args)
    assert from_pickle == R.read_refcoco(shapes_dir / "refs.json", *args)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps([{"ref_id": 0, "x": Evil()}], protocol=2))
    with pytest.raises(ValueError, match=r"evil\.p: refusing to load (posix|nt|os)\.system"):
        R.read_refcoco(evil, *args)
    safe = tmp_path / "safe.p"
    safe.write_bytes(pickle.dumps({"a": {1, 2}, "b": (1.5, None, b"x")}, protocol=2))
    assert R.load_refs_pickle(safe) == {"a": {1, 2}, "b": (1.5, None, b"x")}


def test_refcoco_missing_annotation_is_named(tmp_path, shapes_dir):
    refs = json.loads((shapes_dir / "refs.json").read_text())
    refs[1]["ann_id"] = 999999
    bad = _write_json(tmp_path / "refs.json", refs)
    with pytest.raises(ValueError, match=r"refs\.json: record 1 \(ref_id=1\): ann_id 999999 is not in"):
        R.read_refcoco(bad, shapes_dir / "instances.json", shapes_dir / "images")


def test_coco_polygons_rasterise_like_pycocotools():
    # pycocotools' frPyObjects of an integer box polygon covers exactly the w x h pixels inside it.
    m = R.coco_polygons_to_mask([[2, 1, 7, 1, 7, 5, 2, 5]], 8, 10)
    expected = np.zeros((8, 10), np.uint8)
    expected[1:5, 2:7] = 1
    np.testing.assert_array_equal(m, expected)
    # LISA sums the per-polygon masks: overlap counts twice.
    both = R.coco_polygons_to_mask([[0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]], 8, 8)
    assert both.max() == 2 and int((both == 2).sum()) == 4 and int(both.sum()) == 32
    with pytest.raises(ValueError, match="even number >= 6"):
        R.coco_polygons_to_mask([[0, 0, 1, 1]], 4, 4)


# ---------------------------------------------------------------------------------------------
# ReasonSeg, ADE20K, HF datasets
# ---------------------------------------------------------------------------------------------


def test_reasonseg_docs_prompts_and_mask(tmp_path):
    folder = tmp_path / "val"
    _png(folder / "img1.jpg", size=(10, 8))
    _write_json(folder / "img1.json", {"text": ["the thing one sits on"], "is_sentence": True, "shapes": [
        {"label": "target", "points": [[1, 1], [6, 1], [6, 5], [1, 5]], "shape_type": "polygon"},
        {"label": "ignore", "points": [[8, 0], [9, 0], [9, 1], [8, 1]], "shape_type": "polygon"},
        {"label": "flag", "points": [[0, 7], [9, 7]], "shape_type": "polygon"},
    ]})
    _png(folder / "img2.jpg", size=(10, 8))
    _write_json(folder / "img2.json", {"text": ["chair", "seat"], "is_sentence": False, "shapes": []})
    docs = R.read_reasonseg(folder)
    assert [d["id"] for d in docs] == ["img1", "img2"]
    assert docs[0]["question"] == "the thing one sits on Please output segmentation mask."
    assert docs[1]["question"] == "What is chair in this image? Please output segmentation mask."
    assert len(R.read_reasonseg(folder, all_sentences=True)) == 3
    mask = R.load_mask(docs[0]["mask"])
    assert mask.shape == (8, 10)
    assert (mask[1:6, 1:7] == 1).all() and mask[0, 0] == 0 and mask[7, 5] == 0  # "flag" skipped
    assert (mask[0:2, 8:10] == 255).all()
    (folder / "img2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"img2\.json: no image img2"):
        R.read_reasonseg(folder)


def test_ade20k_pairs_and_missing_label(tmp_path):
    images, labels = tmp_path / "images" / "validation", tmp_path / "annotations" / "validation"
    _png(images / "ADE_val_00000001.jpg")
    _png(labels / "ADE_val_00000001.png", value=7, mode="L")
    docs = R.read_ade20k(images, labels)
    assert [d["id"] for d in docs] == ["ADE_val_00000001"]
    lab = R.load_mask(docs[0]["mask"])
    assert lab.shape == (6, 8) and (lab == 7).all()
    _png(images / "ADE_val_00000002.jpg")
    with pytest.raises(FileNotFoundError, match=r"ADE_val_00000002\.png"):
        R.read_ade20k(images, labels)
    assert len(R.ADE20K_CLASSES) == 150


def test_hf_reader_needs_datasets(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"needs the `datasets` package, which is not installed"):
            R.read_hf({"question": "question"}, path=str(tmp_path))
        return
    from datasets import Dataset

    Dataset.from_dict({"question": ["q1", "q2"], "image": [Image.new("RGB", (4, 4))] * 2}).save_to_disk(tmp_path / "ds")
    docs = R.read_hf({"question": "question"}, path=str(tmp_path / "ds"))
    assert [d["question"] for d in docs] == ["q1", "q2"]
    Dataset.from_dict({"question": ["a", "b"], "image": [Image.new("RGB", (4, 4))] * 2}).to_parquet(
        str(tmp_path / "d.parquet"))
    docs = R.read_hf({"question": "question"}, parquet=str(tmp_path / "d.parquet"))
    assert [d["question"] for d in docs] == ["a", "b"] and docs[0]["image"].size == (4, 4)
    with pytest.raises(FileNotFoundError, match="parquet file not found"):
        R.read_hf({"question": "question"}, parquet=str(tmp_path / "missing.parquet"))


def test_load_image_names_missing_file():
    with pytest.raises(FileNotFoundError, match=r"doc 'x': image not found: '/no/such.png'"):
        R.load_image({"id": "x", "image": "/no/such.png"})


# ---------------------------------------------------------------------------------------------
# Task YAML
# ---------------------------------------------------------------------------------------------

REQUIRED_TASKS = {"vqav2_val", "gqa", "textvqa_val", "pope", "refcoco_seg", "refcocop_seg", "refcocog_seg",
                  "refcoco_rec", "refcoco_bbox_rec_val", "reasonseg", "ade20k", "shapes_vqa", "shapes_refseg"}


def test_every_task_yaml_loads():
    tasks = T.list_tasks()
    assert REQUIRED_TASKS <= set(tasks)
    for name, path in tasks.items():
        cfg = T.load_task(path)
        assert cfg.task == name and cfg.build_scorers() and cfg.build_parser()
    assert T.get_task("refcoco_rec").dataset == T.get_task("refcoco_bbox_rec_val").dataset
    seg = T.get_task("refcocog_seg")  # include merged one level down
    assert seg.dataset["refs"].endswith("refs(umd).p") and seg.dataset["split"] == "val"


def _task_file(tmp_path, **overrides):
    data = {"task": "t", "dataset": {"format": "gqa", "questions": "q.json", "images": "im"},
            "doc_to_text": "{question}", "metric_list": [{"metric": "gqa_accuracy"}]}
    data.update(overrides)
    path = tmp_path / "t.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("overrides, message", [
    ({"promt": "x"}, r"t\.yaml: unknown key 'promt' in task YAML"),
    ({"dataset": {"format": "gqa", "questions": "q", "images": "i", "imgs": "x"}}, r"unknown key 'imgs' in dataset"),
    ({"dataset": {"format": "nope"}}, r"dataset\.format must be one of"),
    ({"doc_to_text": "{expression}"}, r"doc_to_text uses \['expression'\]"),
    ({"metric_list": [{"metric": "gqa_accuracy", "varient": "llava"}]}, r"unknown key 'varient' for metric"),
    ({"metric_list": [{"metric": "gqa_accuracy", "variant": "bogus"}]}, r"invalid metric 'gqa_accuracy'.*bogus"),
    ({"generation_kwargs": {"max_tokens": 3}}, r"unknown key 'max_tokens' in generation_kwargs"),
    ({"parser": {"name": "box", "fallback": True}}, r"unknown key 'fallback' for parser 'box'"),
    ({"breakdown": "category"}, r"breakdown must name a doc field"),
])
def test_task_validation_errors_name_file_and_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        T.load_task(_task_file(tmp_path, **overrides))


def test_task_by_path_and_unknown_name(tmp_path):
    assert T.get_task(str(_task_file(tmp_path))).task == "t"
    with pytest.raises(ValueError, match=r"unknown task 'nope'; available: \["):
        T.get_task("nope")


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------


def test_box_parser():
    ctx = T.SampleContext(doc={})
    assert T.BoxParser()("It is [0.1, 0.25,0.5 , 1].", ctx).value == [0.1, 0.25, 0.5, 1.0]
    assert T.BoxParser()("x=1 y=2 3 4", ctx).value is None
    assert T.BoxParser(fallback_numbers=True)("x=1 y=2 3 4", ctx).value == [1.0, 2.0, 3.0, 4.0]


def test_text4seg_parser_round_trips_a_mask():
    from vlmkit.seg.rrle import encode_rrle, grid_to_mask, mask_to_labels, wrap_answer

    mask = np.zeros((40, 24), bool)
    mask[5:30, 3:17] = True
    grid = mask_to_labels(mask, "dog", 16, 16)
    text = wrap_answer("Sure, here it is:", encode_rrle(grid))
    parsed = T.Text4SegParser(grid=16)(text, T.SampleContext(doc={}, image_size=(40, 24)))
    np.testing.assert_array_equal(parsed.data, grid_to_mask(grid, (40, 24)))
    assert parsed.value["labels"] == ["dog"] and parsed.value["repairs"] == []
    empty = T.Text4SegParser(grid=16)("no mask here", T.SampleContext(doc={}, image_size=(4, 4)))
    assert not empty.data.any() and empty.value["repairs"] == ["no_seg"]


def test_text4seg_semantic_parser_maps_class_names():
    from vlmkit.seg.rrle import encode_rrle, wrap_answer

    blocks = np.array([["wall", "sky"], ["others", "unicorn"]], dtype=object)
    grid = blocks.repeat(2, axis=0).repeat(2, axis=1)  # 4 x 4 cells
    parser = T.Text4SegSemanticParser(class_names="ade20k", grid=4)
    out = parser(wrap_answer("ok", encode_rrle(grid)), T.SampleContext(doc={}, image_size=(8, 8)))
    expected = np.array([[0, 2], [255, 255]]).repeat(4, axis=0).repeat(4, axis=1)  # wall=0, sky=2, rest none
    np.testing.assert_array_equal(out.data, expected)
    assert out.value["unknown_labels"] == ["unicorn"]


# ---------------------------------------------------------------------------------------------
# Area-based aggregation == the metrics module on the masks themselves
# ---------------------------------------------------------------------------------------------


def test_refer_seg_scorer_aggregation_equals_refer_seg_scores(tmp_path):
    from vlmkit.data.rle import rle_encode
    from vlmkit.evaluation.metrics import refer_seg_scores

    rng = np.random.default_rng(0)
    preds, targets, records = [], [], []
    scorer = T.ReferSegScorer()
    for k in range(12):
        h, w = int(rng.integers(5, 30)), int(rng.integers(5, 30))
        pred = rng.random((h, w)) < rng.random()
        target = rng.random((h, w)) < (0.0 if k == 3 else rng.random())
        if k == 3:
            pred[:] = False  # both empty: IoU 1 by LISA's rule
        doc = {"id": k, "mask": {"kind": "coco", "segmentation": rle_encode(target), "size": [h, w]}}
        records.append({"doc_id": k, "scores": scorer.score(T.Parsed(None, pred), doc)})
        preds.append(pred)
        targets.append(target)
    assert scorer.aggregate(records) == refer_seg_scores(preds, targets)
    eps_free = T.ReferSegScorer(epsilon=False)
    assert eps_free.aggregate(records) == pytest.approx(refer_seg_scores(preds, targets, epsilon=False))


@pytest.mark.parametrize("mode", ["mmseg", "detectron2"])
def test_mean_iou_scorer_aggregation_equals_mean_iou(tmp_path, mode):
    from vlmkit.evaluation.metrics import mean_iou

    rng = np.random.default_rng(1)
    preds, targets, records = [], [], []
    scorer = T.MeanIoUScorer(num_classes=5, reduce_zero_label=True, mode=mode)
    for k in range(6):
        label = rng.integers(0, 6, size=(7, 9)).astype(np.uint8)  # 0 = ignored after reduce_zero_label
        label[0, :3] = 255
        pred = rng.integers(0, 5, size=(7, 9))
        if mode == "mmseg" and k == 2:
            pred[1, :2] = 255  # an out-of-range prediction counts in no class
        path = tmp_path / f"{k}.png"
        Image.fromarray(label).save(path)
        records.append({"doc_id": k, "scores": scorer.score(T.Parsed(None, pred), {"id": k, "mask": {"kind": "label_png", "path": str(path)}})})
        preds.append(pred)
        targets.append(label)
    ref = mean_iou(preds, targets, 5, reduce_zero_label=True, mode=mode)
    got = scorer.aggregate(records)
    assert got["mIoU"] == ref["mIoU"] and got["aAcc"] == ref["aAcc"]
