"""Training data of the shapes model: turn order, answer-only labels, per-patch targets."""

from __future__ import annotations

import numpy as np

from vlmkit.data.shapes import generate
from vlmkit.train.shapes_model import build_model, class_names, conversation, make_batch, patch_labels


def test_refseg_turn_is_sometimes_first():
    samples = generate(20, seed=3)
    rng = np.random.default_rng(0)
    firsts = [conversation(s, rng, refseg_prob=1.0)[0][1] for s in samples if s.refs]
    assert any("<seg>" in a for a in firsts) and not all("<seg>" in a for a in firsts)


def test_batch_labels_only_answers_and_patch_targets():
    _, processor = build_model()
    samples = generate(2, seed=4)
    batch = make_batch(samples, processor, np.random.default_rng(0), refseg_prob=0.0, patch=8)
    tok = processor.tokenizer
    for b, s in enumerate(samples):
        learned = batch["labels"][b][batch["labels"][b] != -100].tolist()
        words = tok.convert_ids_to_tokens(learned)
        assert sorted(w for w in words if w != tok.eos_token) == sorted(q["answer"] for q in s.questions)
        assert words.count(tok.eos_token) == len(s.questions)
    # a patch whose centre pixel is visible in an object carries that object's class; others background
    labels = patch_labels(samples[0], 8).view(8, 8).numpy()
    expected = np.zeros((8, 8), dtype=np.int64)
    for obj in samples[0].objects:
        for r in range(8):
            for c in range(8):
                if obj.mask[r * 8 + 4, c * 8 + 4]:
                    expected[r, c] = class_names().index(f"{obj.color} {obj.shape}")
    assert (expected > 0).any() and np.array_equal(labels, expected)


def test_row_slots_point_at_row_openers_with_the_mask_rows():
    from vlmkit.seg.text4seg import mask_to_labels
    from vlmkit.train.shapes_model import GRID

    _, processor = build_model()
    tok = processor.tokenizer
    samples = [s for s in generate(6, seed=5) if s.refs][:3]
    batch = make_batch(samples, processor, np.random.default_rng(0), refseg_prob=1.0, patch=8)
    for b, s in enumerate(samples):
        pos = batch["row_positions"][b]
        words = tok.convert_ids_to_tokens(batch["input_ids"][b, pos].tolist())
        assert words == ["<seg>"] + ["\n"] * (GRID - 1)
        # the tokens after row r's opener up to the next one spell row r; its label set gives the target
        ids = batch["input_ids"][b].tolist()
        expr = tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids[int(pos[0]) - 20 : int(pos[0])]))
        ref = max((r for r in s.refs if r["sentence"] in expr), key=lambda r: len(r["sentence"]))
        obj = s.objects[ref["object_index"]]
        expected = mask_to_labels(obj.mask, "x", GRID, GRID) != "others"
        assert np.array_equal(batch["row_targets"][b].numpy().astype(bool), expected)
    none = make_batch(samples, processor, np.random.default_rng(0), refseg_prob=0.0, patch=8)
    assert (none["row_positions"] == -1).all() and not none["row_targets"].any()

