"""Shared fixtures: tiny models and processed batches. Everything is built locally; no network."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models run several times faster on one thread than on two contended ones

FAMILIES = ["llava", "internvl"]


def make_batch(processor, questions, images_per_sample, seed=0, padding_side="left"):
    """Process ``questions`` (one per sample) with ``images_per_sample[i]`` random images each."""
    from vlmkit.testing import image_prompt, random_images

    images = random_images(sum(images_per_sample), seed=seed)
    nested, start = [], 0
    for n in images_per_sample:
        nested.append(images[start : start + n])
        start += n
    prompts = [image_prompt(processor, q, n) for q, n in zip(questions, images_per_sample)]
    processor.tokenizer.padding_side = padding_side
    return processor(images=nested, text=prompts, return_tensors="pt", padding=True)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    from vlmkit.testing import tiny_vlm

    return tiny_vlm(family, seed=0)


@functools.lru_cache(maxsize=None)
def shared_tiny(family: str):
    """The tiny model of ``family`` (seed 0), built once per session: only for tests that never change its
    weights (they may train stage parameters on top of it)."""
    from vlmkit.testing import tiny_vlm

    return tiny_vlm(family, seed=0)
