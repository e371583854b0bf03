"""``vlmkit.Predictor``: answers equal the wrapper's own greedy ``generate``, token statistics equal the batch
the language model saw, and ``visual_tokens`` are exactly what the compressors hand the language model."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_tiny

import vlmkit
from vlmkit.predictor import build_prompt
from vlmkit.testing import random_images

QUESTIONS = ["what shape is it ?", "how many red circle"]


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_answer_is_the_wrappers_greedy_generate_with_its_token_counts(family):
    model, processor = shared_tiny(family)
    wrapped = vlmkit.wrap(model, vlmkit.RandomPruneConfig(keep_ratio=0.5, seed=0))
    try:
        predictor = vlmkit.Predictor(wrapped, processor, prompt_style="plain")
        images = random_images(2, seed=1)
        preds = predictor.answer(images, QUESTIONS, max_new_tokens=5)
        texts = [build_prompt(processor, q, "plain") for q in QUESTIONS]
        inputs = predictor.inputs([[im] for im in images], texts)
        with torch.no_grad():
            out = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False,
                                   pad_token_id=processor.tokenizer.pad_token_id)
            batch = wrapped.assemble(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                     padding_side="left")
        new = out[:, inputs["input_ids"].shape[1]:]
        assert [p.text for p in preds] == processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        assert [p.visual_tokens for p in preds] == batch.visual_tokens_per_sample
        assert [p.prefill_tokens for p in preds] == batch.attention_mask.sum(dim=1).tolist()
        tokens_per_image = wrapped.family.tokens_per_tile  # one-tile images at the tiny models' size
        assert all(p.visual_tokens == tokens_per_image // 2 for p in preds)
    finally:
        vlmkit.unwrap(wrapped)


def test_text_only_answers_count_the_processors_tokens():
    model, processor = shared_tiny("llava")
    predictor = vlmkit.Predictor(vlmkit.wrap(model), processor, prompt_style="raw")
    preds = predictor.answer(None, ["user : hello assistant :"], max_new_tokens=3)
    ids = processor.tokenizer(["user : hello assistant :"])["input_ids"][0]
    assert preds[0].visual_tokens == 0 and preds[0].prefill_tokens == len(ids)
    assert 1 <= preds[0].generated_tokens <= 3


def test_visual_tokens_are_what_the_compressors_hand_the_language_model():
    model, processor = shared_tiny("llava")
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=0.25))
    try:
        images = random_images(2, seed=4)
        got = vlmkit.Predictor(wrapped, processor, prompt_style="plain").visual_tokens(images)
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            want = wrapped.encode_visual(pixels)
        assert len(got) == 2
        for g, w in zip(got, want):
            assert torch.equal(g.index, w.index) and torch.equal(g.embeds, w.embeds) and g.num_tokens == 4
    finally:
        vlmkit.unwrap(wrapped)


def test_predictor_refuses_what_it_cannot_use():
    model, processor = shared_tiny("llava")
    with pytest.raises(TypeError, match="vlmkit.wrap"):
        vlmkit.Predictor(model, processor)
    with pytest.raises(ValueError, match="prompt_style"):
        vlmkit.Predictor(vlmkit.wrap(model), processor, prompt_style="fancy")
    with pytest.raises(ValueError, match="one entry"):
        vlmkit.Predictor(vlmkit.wrap(model), processor).answer(random_images(1), QUESTIONS)
