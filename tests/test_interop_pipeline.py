"""``transformers.pipeline("image-text-to-text", model=wrapped, processor=processor)`` runs vlmkit's pipeline
(compression included) and answers what ``wrapped.generate`` answers greedily."""

from __future__ import annotations

import pytest

import vlmkit
from vlmkit.testing import image_prompt, random_images, tiny_vlm

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?"]


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_image_text_to_text_pipeline_equals_greedy_generate(family):
    from transformers import pipeline

    model, processor = tiny_vlm(family, seed=0)
    wrapped = vlmkit.wrap(model, vlmkit.FoPruConfig(keep_ratio=0.5))
    visual = []
    wrapped.register_assemble_hook(lambda w, batch: visual.append([len(t.index) for t in batch.tokens]))
    images = random_images(len(QUESTIONS), seed=2)
    prompts = [image_prompt(processor, q, 1) for q in QUESTIONS]

    pipe = pipeline("image-text-to-text", model=wrapped, processor=processor)
    assert pipe.model is wrapped
    got = [pipe(images=image, text=prompt, max_new_tokens=6, return_full_text=False,
                generate_kwargs={"do_sample": False})[0]["generated_text"]
           for image, prompt in zip(images, prompts)]
    assert len(visual) == len(QUESTIONS), "every pipeline call went through vlmkit's assemble"
    full = wrapped.family.tokens_per_tile  # one tile per image (32 px)
    assert all(counts == [full // 2] for counts in visual), (visual, full)

    want = []
    for image, prompt in zip(images, prompts):
        batch = processor(images=[[image]], text=[prompt], return_tensors="pt")
        ids = wrapped.generate(**batch, max_new_tokens=6, do_sample=False)
        want.append(processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    assert [t.strip() for t in got] == [t.strip() for t in want]
    assert all(t.strip() for t in want)  # something was generated
