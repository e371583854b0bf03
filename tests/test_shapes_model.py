"""Training data of the shapes model: isolated turns, answer-only labels, per-patch and per-row targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmkit.data.shapes import generate
from vlmkit.train.shapes_data import (GRID, class_names, conversation, dense_questions, make_batch, patch_labels,
                                      turn_mask)
from vlmkit.train.shapes_model import build_model


def test_dense_questions_are_distinct_and_agree_with_the_benchmark():
    for s in generate(10, seed=6):
        dense = dense_questions(s, np.random.default_rng(1), draws=4)
        assert len({q for q, _ in dense}) == len(dense) >= len(s.questions)  # each draw asks every applicable kind
        truth = dict(dense)
        for q in s.questions:  # the same question asked in the benchmark has the same answer
            assert truth.get(q["question"], q["answer"]) == q["answer"]
        assert truth["How many shapes are there?"] == str(len(s.objects))


def test_turn_mask_by_hand():
    # prefix of 2, turn 1 of 2 tokens, turn 2 of 1 token, one padding slot
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    mask = turn_mask(segments, segments >= 0)[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # turn 2 sees the prefix and itself, not turn 1
        [0, 0, 0, 0, 0, 1],  # padding sees only itself
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_every_packed_turn_equals_its_single_question_prompt():
    """The logits of each turn in a packed, right-padded batch equal those of the plain inference prompt
    ``user : <image> QUESTION assistant : ANSWER </s>`` of that turn alone, so no turn sees another."""
    model, processor = build_model()
    model.eval()
    samples = generate(2, seed=4)
    batch = make_batch(samples, processor, np.random.default_rng(0), patch=8, refseg_turns=1, draws=2)
    assert batch["attention_mask"].shape[-1] == batch["input_ids"].shape[1]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    prefix = 2 + 64  # "user :" + 64 image tokens
    checked, turns_of = 0, []
    for b in range(len(samples)):
        ids, pos = batch["input_ids"][b], batch["position_ids"][b]
        end = int(ids.ne(processor.tokenizer.pad_token_id).sum())  # right padding
        starts = (pos == prefix).nonzero()[:, 0].tolist() + [end]
        turns_of.append(list(zip(starts, starts[1:])))
        for a, e in turns_of[-1]:
            single = torch.cat([ids[:prefix], ids[a:e]])[None]
            with torch.no_grad():
                ref = model(input_ids=single, pixel_values=batch["pixel_values"][b : b + 1]).logits[0, prefix:]
            torch.testing.assert_close(packed[b, a:e], ref, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked >= 8
    # and the mask matters: without it, the last turn sees the earlier ones and its logits change
    a, e = turns_of[0][-1]
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"][:1, :e], pixel_values=batch["pixel_values"][:1]).logits
    assert not torch.allclose(plain[0, a:e], packed[0, a:e], atol=1e-3)


def test_batch_labels_only_answers_and_patch_targets():
    _, processor = build_model()
    samples = generate(2, seed=4)
    tok = processor.tokenizer
    batch = make_batch(samples, processor, np.random.default_rng(0), patch=8, refseg_turns=0, draws=3)
    rng = np.random.default_rng(0)  # make_batch draws the conversations in sample order from its rng
    for b, s in enumerate(samples):
        turns = conversation(s, rng, refseg_turns=0, draws=3)
        labels, ids = batch["labels"][b], batch["input_ids"][b]
        learned = (labels != -100).nonzero()[:, 0]
        expected = [w for _, a in turns for w in (a, tok.eos_token)]  # answers are single words here
        assert tok.convert_ids_to_tokens(labels[learned].tolist()) == expected
        assert torch.equal(labels[learned], ids[learned])
        # each answer follows its own question's "assistant :"
        openers = [i for i in learned.tolist() if tok.convert_ids_to_tokens(int(ids[i - 1])) == ":"]
        assert len(openers) == len(turns)
    # a patch whose centre pixel is visible in an object carries that object's class; others background
    labels = patch_labels(samples[0], 8).view(8, 8).numpy()
    expected = np.zeros((8, 8), dtype=np.int64)
    for obj in samples[0].objects:
        for r in range(8):
            for c in range(8):
                if obj.mask[r * 8 + 4, c * 8 + 4]:
                    expected[r, c] = class_names().index(f"{obj.color} {obj.shape}")
    assert (expected > 0).any() and np.array_equal(labels, expected)


@pytest.mark.parametrize("refseg_turns", [1, 2])
def test_row_slots_point_at_row_openers_with_the_mask_rows(refseg_turns):
    from vlmkit.seg.rrle import mask_to_labels

    _, processor = build_model()
    tok = processor.tokenizer
    samples = [s for s in generate(8, seed=5) if len(s.refs) >= 2][:3]
    batch = make_batch(samples, processor, np.random.default_rng(0), patch=8, refseg_turns=refseg_turns)
    assert batch["row_positions"].shape[1] == refseg_turns * GRID
    for b, s in enumerate(samples):
        for k in range(refseg_turns):
            pos = batch["row_positions"][b, k * GRID : (k + 1) * GRID]
            words = tok.convert_ids_to_tokens(batch["input_ids"][b, pos].tolist())
            assert words == ["<seg>"] + ["\n"] * (GRID - 1)
            # the expression quoted before <seg> names the object whose mask rows are the targets
            ids = batch["input_ids"][b].tolist()
            expr = tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids[int(pos[0]) - 20 : int(pos[0])]))
            ref = max((r for r in s.refs if r["sentence"] in expr), key=lambda r: len(r["sentence"]))
            obj = s.objects[ref["object_index"]]
            expected = mask_to_labels(obj.mask, "x", GRID, GRID) != "others"
            target = batch["row_targets"][b, k * GRID : (k + 1) * GRID]
            assert np.array_equal(target.numpy().astype(bool), expected)
    none = make_batch(samples, processor, np.random.default_rng(0), patch=8, refseg_turns=0)
    assert (none["row_positions"] == -1).all() and not none["row_targets"].any()


def test_point_loss_by_hand():
    """The pointer scores every visual token against the <seg> state of each referring answer."""
    from vlmkit.train.shapes_model import AuxHead

    torch.manual_seed(0)
    aux = AuxHead(vision_hidden=4, text_hidden=6, classes=3, side=GRID)
    hidden, feats = torch.randn(2, 30, 6), torch.randn(2, GRID * GRID, 6)
    positions = torch.full((2, 2 * GRID), -1)
    positions[0, :GRID] = torch.arange(5, 5 + GRID)  # sample 0: one referring answer, <seg> at 5
    positions[1] = torch.arange(2 * GRID) + 3  # sample 1: two, <seg> at 3 and 3 + GRID
    targets = (torch.rand(2, 2 * GRID, GRID) > 0.7).float()
    expected = []
    for b, seg, group in [(0, 5, 0), (1, 3, 0), (1, 3 + GRID, 1)]:
        q = aux.query(hidden[b, seg])
        for cell in range(GRID * GRID):
            logit = q @ aux.key(feats[b, cell]) / 6 ** 0.5
            t = targets[b, group * GRID + cell // GRID, cell % GRID]
            expected.append(-(t * torch.log(torch.sigmoid(logit)) + (1 - t) * torch.log(1 - torch.sigmoid(logit))))
    loss = aux.point_loss(hidden, feats, positions, targets)
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    none = aux.point_loss(hidden, feats, torch.full((2, GRID), -1), torch.zeros(2, GRID, GRID))
    assert none.item() == 0.0
