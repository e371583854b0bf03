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
