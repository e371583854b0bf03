"""shapes_multi: N shapes images in one prompt, one question about image k (vlmkit.data.shapes.write_multi,
eval/shapes_multi*.yaml). Answers are recomputed here from image k's objects alone (their colours, shapes and
centres), never from the question builders."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlmkit.data import shapes

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "vlmkit" / "assets" / "shapes-llava-tiny"
PREFIX = re.compile(r"In image (\d+), (.+)$")


def _expected_answer(question: str, objects, size: int) -> str:
    """The answer to a (prefix-free, lowercase-first) shapes question from the objects of one image."""
    q = question[0].upper() + question[1:]
    if q == "How many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        (obj,) = [o for o in objects if o.color == m[1]]
        return obj.shape
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        (obj,) = [o for o in objects if o.shape == m[1]]  # only asked when unambiguous
        return obj.color
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
        return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", q):
        (a,) = [o for o in objects if (o.color, o.shape) == (m[1], m[2])]
        (b,) = [o for o in objects if (o.color, o.shape) == (m[3], m[4])]
        return "left" if a.center[0] < b.center[0] else "right"
    if m := re.fullmatch(r"Which side of the image is the (\w+) (\w+) on\?", q):
        (a,) = [o for o in objects if (o.color, o.shape) == (m[1], m[2])]
        return "left" if a.center[0] < size / 2 else "right"
    raise AssertionError(f"unexpected question {question!r}")


def _scene(image_id: int, seed: int):
    """Image ``image_id`` of ``seed`` regenerated on its own (not from the pool the writer used)."""
    return shapes.generate_one(np.random.default_rng([seed, image_id]), image_id)


@pytest.mark.parametrize("images", [1, 4, [1, 2, 3, 4]])
def test_each_answer_is_recomputed_from_image_k_alone(images):
    seed, pool = 3, 20
    samples = shapes.generate(pool, seed=seed)
    drawn = shapes.draw_multi(samples, 60, images, seed=seed)
    allowed = [images] if isinstance(images, int) else images
    depends_on_k = 0
    for d in drawn:
        n = len(d["image_ids"])
        assert n in allowed and len(set(d["image_ids"])) == n and all(1 <= i <= pool for i in d["image_ids"])
        m = PREFIX.fullmatch(d["question"])
        assert m and 1 <= int(m[1]) == d["image_index"] <= n
        scene = _scene(d["image_ids"][d["image_index"] - 1], seed)
        assert d["answer"] == _expected_answer(m[2], scene.objects, 64), d
        if d["type"] == "count":
            others = {str(len(_scene(i, seed).objects)) for i in d["image_ids"]}
            depends_on_k += len(others) > 1
    if allowed != [1]:
        assert depends_on_k > 0  # some prompts hold images whose answers differ: the asked one decides
    assert shapes.draw_multi(samples, 60, images, seed=seed) == drawn  # seeded
    assert shapes.draw_multi(samples, 20, images, seed=seed) == drawn[:20]  # question q depends on q alone


def test_k_is_uniform_and_mixed_n_is_drawn_per_question():
    samples = shapes.generate(16, seed=0)
    drawn = shapes.draw_multi(samples, 800, 4, seed=0)
    counts = Counter(d["image_index"] for d in drawn)
    assert set(counts) == {1, 2, 3, 4} and all(150 <= c <= 250 for c in counts.values()), counts
    mixed = Counter(len(d["image_ids"]) for d in shapes.draw_multi(samples, 800, [1, 2, 3, 4], seed=0))
    assert set(mixed) == {1, 2, 3, 4} and all(150 <= c <= 250 for c in mixed.values()), mixed
    assert {d["type"] for d in drawn} == set(shapes.QUESTION_TYPES)


def test_words_are_in_the_shipped_and_tiny_vocabularies():
    from vlmkit.testing import tokenizer_words

    samples = shapes.generate(20, seed=1)
    vocab = set(shapes.multi_vocabulary(16))
    shipped = set(json.loads((SHIPPED / "tokenizer.json").read_text())["model"]["vocab"])
    assert vocab <= shipped and vocab <= set(tokenizer_words())
    assert not {"in", ","} <= set(shapes.VOCAB_WORDS)  # the prefix adds words the single-image texts lack
    for d in shapes.draw_multi(samples, 200, 16, seed=1):
        words = shapes.tokenize(d["question"]) + shapes.tokenize(d["answer"])
        assert set(words) <= vocab, d["question"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHIPPED)
    ids = tok("In image 16, how many shapes are there?", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.convert_ids_to_tokens(ids)[:4] == ["in", "image", "16", ","]


def test_bad_arguments_name_the_value():
    samples = shapes.generate(3, seed=0)
    with pytest.raises(ValueError, match="pool of at least"):
        shapes.draw_multi(samples, 1, 4)
    with pytest.raises(ValueError, match=r"got 65"):
        shapes.draw_multi(samples, 1, 65)
    with pytest.raises(ValueError, match=r"got \[\]"):
        shapes.draw_multi(samples, 1, [])


def test_written_files_read_back_as_multi_image_docs(tmp_path):
    from PIL import Image

    from vlmkit.evaluation.readers import read_vqav2
    from vlmkit.testing import tiny_vlm
    from vlmkit.train.data import encode_conversation, load_conversations

    paths = shapes.write_multi(tmp_path, 6, 4, seed=2, pool=8)
    docs = read_vqav2(str(paths["vqa_questions"]), str(paths["images"]), str(paths["vqa_annotations"]),
                      image_pattern="shapes_{image_id:06d}.png")
    drawn = shapes.draw_multi(shapes.generate(8, seed=2), 6, 4, seed=2)
    assert [d["question"] for d in docs] == [d["question"] for d in drawn]
    for doc, d in zip(docs, drawn):
        assert len(doc["image"]) == 4 and doc["answers"] == [d["answer"]] * 10 and doc["question_type"] == d["type"]
        assert doc["image_id"] == d["image_ids"][d["image_index"] - 1]
        for path, image_id in zip(doc["image"], d["image_ids"]):  # prompt order = the drawn order, pixel-exact
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(_scene(image_id, 2).image))
    _, processor = tiny_vlm("llava", seed=0)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for conv, d in zip(load_conversations(paths["llava"]), drawn):
        assert conv.messages[0]["content"] == "<image> " * 4 + d["question"]
        assert [Path(p).name for p in conv.images] == [f"shapes_{i:06d}.png" for i in d["image_ids"]]
        enc = encode_conversation(conv, processor)
        assert int((enc["input_ids"] == image_id).sum()) == 4 * 16  # 4 images × the tiny model's 16 tokens
        assert processor.tokenizer.decode(enc["labels"][enc["labels"] >= 0]) == f"{d['answer']} </s>"


def test_cli_writes_multi_and_single_turn(tmp_path):
    from vlmkit.cli import main

    assert main(["shapes", "--out", str(tmp_path / "m"), "--n", "5", "--images", "2,3", "--pool", "6"]) == 0
    records = json.loads((tmp_path / "m" / "llava_shapes_multi.json").read_text())
    assert len(records) == 5 and {len(r["image"]) for r in records} <= {2, 3}
    assert all(r["conversations"][0]["value"].count("<image>") == len(r["image"]) for r in records)
    assert main(["shapes", "--out", str(tmp_path / "x"), "--n", "2", "--images", "65"]) == 2  # a usage error
    assert main(["shapes", "--out", str(tmp_path / "x"), "--n", "2", "--images", "two"]) == 2
    assert main(["shapes", "--out", str(tmp_path / "s"), "--n", "2"]) == 0  # single-turn by default
    records = json.loads((tmp_path / "s" / "llava_shapes_vqa.json").read_text())
    assert len(records) == sum(len(s.questions) for s in shapes.generate(2)) and all(
        len(r["conversations"]) == 2 and r["conversations"][0]["value"].startswith("<image> ") for r in records)


def test_tasks_run_end_to_end_through_vlmkit_eval(tmp_path):
    """`vlmkit eval` on tiny:llava: the task data is synthesised, each prompt holds exactly N image markers and
    the language model sees N × 16 visual tokens per sample."""
    from vlmkit.cli import main
    from vlmkit.evaluation.tasks import get_task

    for n in (1, 4, 8, 16):
        task = get_task(f"shapes_multi_{n}")
        assert task.synthesize["images"] == n and task.dataset["images"] == f"shapes_multi_{n}/images"
    assert get_task("shapes_multi").synthesize["images"] == 4
    data = tmp_path / "data"
    data.mkdir()
    args = ["eval", "--model", "tiny:llava", "--tasks", "shapes_multi_1,shapes_multi_8", "--limit", "3",
            "--batch-size", "2", "--data-root", str(data), "--output", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    (results,) = (tmp_path / "out").rglob("*results*.json")
    res = json.loads(results.read_text())
    for n in (1, 8):
        name = f"shapes_multi_{n}"
        assert res["n-samples"][name]["effective"] == 3 and "vqa_accuracy,none" in res["results"][name]
        (samples,) = (tmp_path / "out").rglob(f"*samples_{name}.jsonl")
        recs = [json.loads(line) for line in samples.read_text().splitlines()]
        assert len(recs) == 3
        for r in recs:
            assert r["prompt"].count("<image>") == n and r["visual_tokens"] == 16 * n
            assert r["prompt"].startswith("user : ") and re.search(r"In image \d+, ", r["prompt"])
        questions = json.loads((data / name / "v2_OpenEnded_mscoco_val_questions.json").read_text())["questions"]
        assert len(questions) == 300 and all(len(q["image_ids"]) == n for q in questions)
