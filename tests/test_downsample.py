"""The image-downsampling baseline (``vlmkit/compress/downsample.py``) on tiny LLaVA (CLIP, 32 px tiles of 4×4
tokens).

References are independent of the stage: grids, trims and cells worked out by hand; the model's own
``get_image_features`` on a tile resized in the test (transformers' ``interpolate_pos_encoding``); the pixel
size the tower really receives (a hook on the model's tower); each sample run alone; the families' ``lacks``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import shared_tiny

import vlmkit
from vlmkit import compat
from vlmkit.compress import keep_count
from vlmkit.compress.downsample import (
    DownsampleConfig, downsample_grid, downsample_select, nearest_small, representative_cells, trim_positions,
)
from vlmkit.families import family_for
from vlmkit.tokens import VisualTokens


# --- pure functions by hand --------------------------------------------------------------------------------
def test_grid_for_each_budget_by_hand():
    # LLaVA-1.5 (24×24 = 576): keep 0.5 → 288: sides 16 or 17 (√288 = 16.97): 16·16, 16·17 < 288 ≤ 17·17
    assert downsample_grid((24, 24), keep_count(576, 0.5)) == (17, 17)
    assert downsample_grid((24, 24), keep_count(576, 0.25)) == (12, 12)  # 144: VTC-Bench's r = 2
    assert keep_count(576, 0.11) == 63 and downsample_grid((24, 24), 63) == (8, 8)  # 7·8 = 56 < 63 ≤ 64
    assert downsample_grid((24, 24), 42) == (6, 7)  # √42 = 6.48: 6·6 < 42 = 6·7 (ties with 7·6: fewer rows)
    assert downsample_grid((24, 24), 50) == (7, 8)  # 7·7 = 49 < 50 ≤ 56
    assert downsample_grid((24, 24), 576) == (24, 24) and downsample_grid((24, 24), 1) == (1, 1)
    # the shipped shapes model (8×8 = 64): 32 → 6×6 (5·6 = 30 < 32), 16 → 4×4, 7 → 3×3 (2·3 = 6 < 7)
    assert [downsample_grid((8, 8), k) for k in (32, 16, 7)] == [(6, 6), (4, 4), (3, 3)]
    # tiny LLaVA (4×4): 8 → 3×3, 3 → 2×2, 15 → 4×4 (3·4 = 12 < 15: the full grid, trimmed)
    assert [downsample_grid((4, 4), k) for k in (8, 3, 15)] == [(3, 3), (2, 2), (4, 4)]
    # a wide tile (2×4): sides ≈ √2 = 1.41 and √8 = 2.83: 1·2, 1·3 < 4 = 2·2
    assert downsample_grid((2, 4), 4) == (2, 2) and downsample_grid((2, 4), 3) == (1, 3)
    for bad in (0, 17):
        with pytest.raises(ValueError, match="num_keep"):
            downsample_grid((4, 4), bad)


def test_trim_and_cells_by_hand():
    assert trim_positions(9, 8).tolist() == list(range(8))  # ⌊i·9/8⌋: the last one goes
    kept = trim_positions(36, 32).tolist()  # ⌊1.125·i⌋
    assert sorted(set(range(36)) - set(kept)) == [8, 17, 26, 35] and len(kept) == 32
    assert trim_positions(5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        trim_positions(4, 5)
    # 4×4 → 2×2: token centres at rows/cols (2i+1)·4/4 = 1, 3
    assert representative_cells((4, 4), (2, 2)).tolist() == [5, 7, 13, 15]
    # 4×4 → 3×3: rows ⌊(2i+1)·4/6⌋ = 0, 2, 3
    assert representative_cells((4, 4), (3, 3)).tolist() == [0, 2, 3, 8, 10, 11, 12, 14, 15]
    # 4×4 from 3×3: full rows ⌊(2i+1)·3/8⌋ = 0, 1, 1, 2
    assert nearest_small((4, 4), (3, 3)).view(4, 4)[:, 0].tolist() == [0, 3, 3, 6]
    assert nearest_small((4, 4), (3, 3)).view(4, 4)[0].tolist() == [0, 1, 1, 2]
    assert downsample_select((4, 4), 8).tolist() == [0, 2, 3, 8, 10, 11, 12, 14]
    assert downsample_select((4, 4), 3).tolist() == [5, 7, 13]
    assert downsample_select((4, 4), 16).tolist() == list(range(16))
    for grid in ((4, 4), (24, 24), (8, 8), (3, 5)):  # each small token's own cell maps back to it
        for k in range(1, grid[0] * grid[1] + 1):
            small = downsample_grid(grid, k)
            cells = representative_cells(grid, small)
            assert torch.equal(nearest_small(grid, small)[cells], torch.arange(small[0] * small[1]))
            assert bool((cells[1:] > cells[:-1]).all())
            assert downsample_select(grid, k).numel() == k


# --- on the tiny model ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def wrapped(config, family="llava"):
    model, processor = shared_tiny(family)
    w = vlmkit.wrap(model, config)
    try:
        yield w, model, processor
    finally:
        vlmkit.unwrap(w)


def _tower_inputs(model):
    """Record the pixel sizes the model's own CLIP patch embedding (inside the tower) receives."""
    sizes = []
    conv = model.model.vision_tower.embeddings.patch_embedding
    handle = conv.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:])))
    return sizes, handle


@pytest.mark.parametrize("budget, small", [({"keep_ratio": 0.5}, (3, 3)), ({"keep_ratio": 0.25}, (2, 2)),
                                           ({"num_keep": 3}, (2, 2)), ({"keep_ratio": 0.11}, (1, 1))])
def test_kept_tokens_are_the_models_features_of_the_smaller_tile(budget, small):
    config = DownsampleConfig(**budget)
    model, processor = shared_tiny("llava")
    batch = compat.make_batch(processor, [0, 1], "right")
    k = config.num_to_keep(16)
    size = (small[0] * 8, small[1] * 8)  # 8 px per token (CLIP patch 8)
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(batch["pixel_values"], size=size, mode="bicubic",
                                                  align_corners=False, antialias=True)
        own = model.model.get_image_features(
            pixel_values=resized, vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy="default", interpolate_pos_encoding=True).pooler_output
    keep = trim_positions(small[0] * small[1], k)
    with wrapped(config) as (w, _, _):
        sizes, handle = _tower_inputs(model)
        try:
            assembled = w.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        finally:
            handle.remove()
    assert sizes == [size]  # the tower ran once, on the smaller tiles
    assert [t.num_tokens for t in assembled.tokens] == [k] * 3  # exactly keep_count / num_keep per image
    for t, feats in zip(assembled.tokens, own):
        assert feats.shape[0] == small[0] * small[1]
        torch.testing.assert_close(t.embeds, feats[keep], atol=1e-5, rtol=1e-5)
        assert t.index.tolist() == representative_cells((4, 4), small)[keep].tolist()


def test_full_grid_budget_trims_without_resizing():
    """num_keep = 15 of 16: the grid stays 4×4 (3·4 = 12 < 15), the tower runs at 32 px, one token goes."""
    model, processor = shared_tiny("llava")
    batch = compat.make_batch(processor, [0], "right")
    plain = vlmkit.wrap(model)
    try:
        full = plain.encode_visual(batch["pixel_values"], batch["input_ids"])
    finally:
        vlmkit.unwrap(plain)
    with wrapped(DownsampleConfig(num_keep=15)) as (w, _, _):
        sizes, handle = _tower_inputs(model)
        try:
            (kept,) = w.encode_visual(batch["pixel_values"], batch["input_ids"])
        finally:
            handle.remove()
    assert sizes == [(32, 32)]
    assert kept.index.tolist() == list(range(15))  # ⌊i·16/15⌋: the last token goes
    assert torch.equal(kept.embeds, full[0].embeds[:15])


@pytest.mark.parametrize("budget", [{"keep_ratio": 0.25}, {"num_keep": 3}])
def test_padded_batch_equals_each_sample_alone(budget):
    """compat.SAMPLES: sample 0 one image, sample 1 two; forward logits (right padding) and greedy tokens (left)."""
    with wrapped(DownsampleConfig(**budget)) as (w, _, processor):
        right = compat.make_batch(processor, [0, 1], "right")
        left = compat.make_batch(processor, [0, 1], "left")
        with torch.no_grad():
            logits = w(**right).logits
        gen = w.generate(**left, max_new_tokens=3, do_sample=False)
        S = left["input_ids"].shape[1]
        for k in range(2):
            alone = compat.make_batch(processor, [k], "right")
            with torch.no_grad():
                one = w(**alone).logits[0]
            torch.testing.assert_close(logits[k, :one.shape[0]], one, atol=1e-4, rtol=1e-4)
            alone = compat.make_batch(processor, [k], "left")
            one = w.generate(**alone, max_new_tokens=3, do_sample=False)[0, alone["input_ids"].shape[1]:]
            assert torch.equal(gen[k, S:], one), f"sample {k}"


def test_keep_ratio_one_leaves_the_tower_alone():
    model, processor = shared_tiny("llava")
    batch = compat.make_batch(processor, [0, 1], "left")
    with torch.no_grad():
        ref = model(**batch).logits
    with wrapped(DownsampleConfig(keep_ratio=1.0)) as (w, _, _):
        sizes, handle = _tower_inputs(model)
        try:
            with torch.no_grad():
                assert torch.equal(w(**batch).logits, ref)
        finally:
            handle.remove()
    assert sizes == [(32, 32)]


@pytest.mark.parametrize("family", ["internvl", "llava_next", "smolvlm", "qwen2_5_vl"])
def test_families_without_resizable_tower_are_refused_with_their_reason(family):
    model, _ = shared_tiny(family)
    adapter = family_for(model)
    assert "vision_resize" not in adapter.capabilities
    with pytest.raises(ValueError) as err:
        vlmkit.wrap(model, DownsampleConfig(keep_ratio=0.5))
    message = str(err.value)
    assert "'downsample'" in message and "'vision_resize'" in message and adapter.lacks["vision_resize"] in message


def test_exclusive_and_needs_its_vision_context():
    model, _ = shared_tiny("llava")
    with pytest.raises(ValueError, match="downsample"):
        vlmkit.wrap(model, DownsampleConfig(keep_ratio=0.5), vlmkit.RandomPruneConfig(keep_ratio=0.5))
    with wrapped(DownsampleConfig(keep_ratio=0.5)) as (w, _, _):
        tokens = [VisualTokens.full(torch.zeros(16, 4), (4, 4))]
        with pytest.raises(RuntimeError, match="vision_context"):
            w.stages["downsample"].compress(tokens)
