"""VisPruner and VisionZip (``vlmkit/compress/vispruner.py``, ``visionzip.py``): pre-LLM pruners that read the
vision tower's CLS attention row.

References are independent of the code under test: hand-worked selections, a transcription of VisPruner's
published loop (``Theia-4869/VisPruner`` ``llava_arch.py``), the eager tower's own ``output_attentions`` and
``hidden_states``, HF's ``pixel_shuffle`` for InternVL's patch→token map, the model's own projector, and the
unwrapped model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch, shared_tiny

import vlmkit
from vlmkit.compress.vispruner import vispruner_select
from vlmkit.compress.visionzip import VisionZipConfig, visionzip_merge, visionzip_select
from vlmkit.testing import image_prompt, random_images

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "is there a red square ?"]


@pytest.fixture
def tiny(family):
    return shared_tiny(family)


def _configs(**budget):
    return [vlmkit.VisPrunerConfig(**budget), vlmkit.VisionZipConfig(**budget)]


# --- vispruner_select -----------------------------------------------------------------------------------------
def test_vispruner_select_by_hand():
    # attention order (stable, ties → lower index): 1, 3, 2, 5, 0, 4. T=3, r=0.5: T_imp=int(1.5)=1 → token 1.
    # residual [3, 2, 5, 0, 4], T_div=2, R=5 (odd): a=[3, 5, 4], b=[2, 0], drop min(8, 3, 3)=3 of a → [2, 0].
    attn = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.0, 0.2])
    f = torch.tensor([[1.0, 0], [9, 9], [0, 1], [2, 0], [-1, 0], [0.6, 0.8]])
    assert vispruner_select(attn, f, 3, 0.5).tolist() == [0, 1, 2]
    # T=4: T_imp=2 → tokens 1, 3; residual [2, 5, 0, 4], T_div=2: a=[2, 0], b=[5, 4]; max cos: token 2 → 0.8,
    # token 0 → 0.6; drop min(8, 2, 2)=2 → residual = b = [5, 4].
    assert vispruner_select(attn, f, 4, 0.5).tolist() == [1, 3, 4, 5]
    # T=5, r=0.5: T_imp=2, T_div=3, drop 1: token 2 (0.8) goes, [0, 5, 4] stay.
    assert vispruner_select(attn, f, 5, 0.5).tolist() == [0, 1, 3, 4, 5]


def test_vispruner_select_tie_keeps_earlier_a_token_and_ratio_ends():
    attn = torch.tensor([4.0, 3.0, 2.0, 1.0])
    # T=3, r=0.5: T_imp=1 (token 0), residual [1, 2, 3], T_div=2, drop min(8, 1, 2)=1; a=[1, 3], b=[2]; both
    # a-tokens duplicate b exactly (tie): the stable sort drops the earlier one (token 1), keeps token 3.
    f = torch.tensor([[0.0, 1], [1, 0], [1, 0], [1, 0]])
    assert vispruner_select(attn, f, 3, 0.5).tolist() == [0, 2, 3]
    assert vispruner_select(attn, f, 3, 1.0).tolist() == [0, 1, 2]  # all important: the top-3 attention
    assert vispruner_select(attn, f, 4, 0.3).tolist() == [0, 1, 2, 3]  # T = G keeps all
    assert vispruner_select(torch.tensor([1.0, 1.0, 1.0]), torch.eye(3), 1, 1.0).tolist() == [0]
    with pytest.raises(ValueError, match="num_keep"):
        vispruner_select(attn, f, 0, 0.5)


def _published_vispruner(attn: torch.Tensor, feats: torch.Tensor, T: int, ratio: float) -> list[int]:
    """The reference's ``encode_images`` selection, transcribed for one row (B=1)."""
    image_features, image_attentions = feats[None], attn[None]
    B = 1
    important_token_num = int(T * ratio)
    diverse_token_num = T - important_token_num
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while True:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2]], dim=-1)
    return sorted(torch.cat([important_indices, residual_indices], dim=-1)[0].tolist())


@pytest.mark.parametrize("G, T, ratio", [(576, 64, 0.5), (576, 192, 0.5), (576, 128, 0.5), (100, 30, 0.4),
                                         (64, 16, 0.25)])
def test_vispruner_select_matches_published_loop(G, T, ratio):
    """Budgets whose residual list stays even (the published loop fails on an odd one, see the module)."""
    g = torch.Generator().manual_seed(G + T)
    attn = torch.rand(G, generator=g)
    feats = torch.randn(G, 12, generator=g)
    assert vispruner_select(attn, feats, T, ratio).tolist() == _published_vispruner(attn, feats, T, ratio)


# --- VisionZip budget and selection ----------------------------------------------------------------------------
def test_visionzip_split_rounding():
    c = VisionZipConfig(keep_ratio=0.5)
    assert [c.split(k) for k in (64, 128, 192, 576)] == [(54, 10), (108, 20), (162, 30), (486, 90)]
    assert [c.split(k) for k in (1, 3, 6, 7)] == [(1, 0), (3, 0), (6, 0), (6, 1)]  # floor(7·0.15625)=1
    assert VisionZipConfig(keep_ratio=0.5, contextual_ratio=0.9).split(2) == (1, 1)  # at least one dominant
    assert VisionZipConfig(keep_ratio=0.5, contextual_ratio=0.0).split(5) == (5, 0)
    for bad in (1.0, -0.1, True, "x"):
        with pytest.raises(ValueError, match="contextual_ratio"):
            VisionZipConfig(keep_ratio=0.5, contextual_ratio=bad)


def test_visionzip_select_and_merge_by_hand():
    # dominant (D=2): tokens 1, 3. remaining [0, 2, 4, 5]: M=4, C=2, step 2 → targets [0, 4]; others [2, 5].
    # token 2's metric (0.6, 0.8) is closer to target 4 (0, 1); token 5's (1, 1) is equally close to both: the
    # first target (0) wins.
    attn = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.05])
    metric = torch.tensor([[1.0, 0], [5, 5], [0.6, 0.8], [5, 5], [0, 1], [1, 1]])
    dom, targets, assign, others = visionzip_select(attn, metric, 2, 2)
    assert (dom.tolist(), targets.tolist(), others.tolist(), assign.tolist()) == ([1, 3], [0, 4], [2, 5], [1, 0])
    hidden = torch.tensor([[1.0, 0], [7, 7], [2, 0], [7, 7], [0, 3], [4, 4]])
    merged, counts = visionzip_merge(hidden, targets, assign, others)
    assert merged.tolist() == [[5.0, 4.0], [2.0, 3.0]] and counts.tolist() == [1, 1]
    # two tokens into one target: the target plus their mean (not averaged with the target)
    merged, counts = visionzip_merge(hidden, torch.tensor([0]), torch.tensor([0, 0]), torch.tensor([2, 5]))
    assert merged.tolist() == [[4.0, 2.0]] and counts.tolist() == [2]
    # C=0: dominant only; ties in attention go to the lower index
    dom, targets, _, _ = visionzip_select(torch.tensor([1.0, 2.0, 2.0, 0.0]), metric[:4], 2, 0)
    assert dom.tolist() == [1, 2] and targets.numel() == 0


# --- scores against the eager tower ---------------------------------------------------------------------------
def _eager(model, pixel_values, layer):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        out = ref.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    return ref, out.attentions[layer], out.hidden_states


def _eager_cls_scores(model, family, pixel_values, layer):
    """Head-mean and head-sum CLS→patch attention per visual token, from the eager tower's ``attentions``."""
    ref, att, _ = _eager(model, pixel_values, layer)
    rows = att[:, :, 0, 1:]  # [B, H, P]
    out = []
    for patch in (rows.mean(1), rows.sum(1)):
        if family == "internvl":
            side = int(patch.shape[1] ** 0.5)
            shuffled = ref.model.pixel_shuffle(patch.reshape(-1, side, side, 1),
                                               scale_factor=model.config.downsample_ratio)
            patch = shuffled.sum(-1).reshape(patch.shape[0], -1)
        out.append(patch)
    return out


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_scores_equal_eager_cls_attention(tiny, family):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 2])
    layer = -2 if family == "llava" else -1  # the feature layer of each tiny model
    mean, total = _eager_cls_scores(model, family, batch["pixel_values"], layer)
    for config, expected in ((vlmkit.VisPrunerConfig(num_keep=5), mean), (vlmkit.VisionZipConfig(num_keep=5), total)):
        wrapped = vlmkit.wrap(model, config)
        try:
            tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])
        finally:
            vlmkit.unwrap(wrapped)
        assert len(tokens) == 3
        for i, t in enumerate(tokens):
            torch.testing.assert_close(t.scores, expected[i], rtol=1e-5, atol=1e-7)
    assert not any(m._forward_pre_hooks for m in model.modules()), "hooks must not outlive the wrapper"


def test_vispruner_selection_equals_independent_llava_computation():
    """LLaVA: VisPruner's choice is ``vispruner_select`` on the eager CLS attention (mean over heads) and the
    pre-projector features ``hidden_states[-2]`` without CLS (what the reference normalises)."""
    model, processor = shared_tiny("llava")
    batch = make_batch(processor, QUESTIONS[:2], [1, 2])
    _, att, hidden = _eager(model, batch["pixel_values"], -2)
    attn, feats = att[:, :, 0, 1:].mean(1), hidden[-2][:, 1:]
    wrapped = vlmkit.wrap(model, vlmkit.VisPrunerConfig(num_keep=7, important_ratio=0.4))
    try:
        tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])
    finally:
        vlmkit.unwrap(wrapped)
    for i, t in enumerate(tokens):
        assert t.index.tolist() == vispruner_select(attn[i], feats[i], 7, 0.4).tolist()


def test_visionzip_merges_before_the_projector_on_llava():
    """LLaVA: dominant tokens are the model's own embeddings; a contextual token is the projector applied to
    ``hidden[target] + mean(hidden[assigned])`` of ``hidden_states[-2]``, with the head-mean keys of layer -2
    computed here from the tower's own modules."""
    model, processor = shared_tiny("llava")
    batch = make_batch(processor, QUESTIONS[:1], [1])
    ref, att, hidden = _eager(model, batch["pixel_values"], -2)
    layer = ref.model.vision_tower.encoder.layers[-2]
    with torch.no_grad():
        x = layer.layer_norm1(hidden[-3])  # the input of layer -2's attention
        B, S, _ = x.shape
        heads = layer.self_attn.num_heads
        keys = layer.self_attn.k_proj(x).reshape(B, S, heads, -1).mean(2)[:, 1:]
        own = model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-2,
                                             vision_feature_select_strategy="default").pooler_output[0]
    config = vlmkit.VisionZipConfig(num_keep=8, contextual_ratio=0.4)  # D=5, C=3 of 16
    dom, targets, assign, others = visionzip_select(att[0, :, 0, 1:].sum(0), keys[0], 5, 3)
    merged, counts = visionzip_merge(hidden[-2][0, 1:], targets, assign, others)
    assert int(counts.sum()) == 8 and (counts > 0).any()
    with torch.no_grad():
        expected = own.clone()
        expected[targets[counts > 0]] = model.model.multi_modal_projector(merged[counts > 0])
    keep = torch.cat([dom, targets]).sort().values
    wrapped = vlmkit.wrap(model, config)
    try:
        tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])
    finally:
        vlmkit.unwrap(wrapped)
    assert tokens[0].index.tolist() == keep.tolist()
    torch.testing.assert_close(tokens[0].embeds, expected[keep], rtol=1e-5, atol=1e-6)


# --- composition with the model -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("budget, expected", [({"keep_ratio": 0.3}, 4), ({"num_keep": 5}, 5), ({"num_keep": 1}, 1)])
def test_exact_kept_counts(tiny, family, budget, expected):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 2, 1])
    for config in _configs(**budget):
        wrapped = vlmkit.wrap(model, config)
        try:
            tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])
        finally:
            vlmkit.unwrap(wrapped)
        assert [t.num_tokens for t in tokens] == [expected] * 4, config  # 16 tokens per tiny image
        for t in tokens:
            assert bool((t.index[1:] > t.index[:-1]).all())


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_keep_ratio_one_is_identity(tiny, family):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 1, 2])
    ref = model.generate(**batch, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref_logits = model(**batch).logits
    for config in _configs(keep_ratio=1.0):
        wrapped = vlmkit.wrap(model, config)
        try:
            assert torch.equal(wrapped.generate(**batch, max_new_tokens=6, do_sample=False), ref)
            with torch.no_grad():
                assert torch.equal(wrapped(**batch).logits, ref_logits)
        finally:
            vlmkit.unwrap(wrapped)


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_padded_batch_equals_each_sample_alone(tiny, family):
    model, processor = tiny
    images = random_images(4, seed=5)
    nested = [[images[0]], [images[1], images[2]], [images[3]]]
    prompts = [image_prompt(processor, q, len(n)) for q, n in zip(QUESTIONS, nested)]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=nested, text=prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    width = batch["input_ids"].shape[1]
    for config in (vlmkit.VisPrunerConfig(keep_ratio=0.5), vlmkit.VisionZipConfig(keep_ratio=0.5, contextual_ratio=0.25)):
        wrapped = vlmkit.wrap(model, config)
        try:
            together = wrapped.generate(**batch, max_new_tokens=5, do_sample=False)[:, width:]
            for i in range(3):
                alone = processor(images=[nested[i]], text=[prompts[i]], return_tensors="pt")
                new = wrapped.generate(**alone, max_new_tokens=5, do_sample=False)[0, alone["input_ids"].shape[1]:]
                assert torch.equal(new, together[i, : len(new)]), (config, i)
        finally:
            vlmkit.unwrap(wrapped)


@pytest.mark.parametrize("family", ["smolvlm", "llava_onevision"])
def test_towers_without_cls_are_refused(tiny, family):
    model, _ = tiny
    for config in _configs(keep_ratio=0.5):
        with pytest.raises(ValueError, match="vision_cls"):
            vlmkit.wrap(model, config)


def test_multi_tile_internvl_images_are_pruned_per_image():
    """InternVL tiles: the budget is per image over all its tiles, and the attention of each tile's CLS row is
    gathered tile by tile (scores of the whole run equal the eager tower's, tile after tile)."""
    from vlmkit.testing import tiny_vlm

    model, processor = tiny_vlm("internvl")
    processor.image_processor.crop_to_patches, processor.image_processor.max_patches = True, 4
    images = random_images(2, size=64)
    batch = processor(images=[[images[0]], [images[1]]], text=[image_prompt(processor, q) for q in QUESTIONS[:2]],
                      return_tensors="pt", padding=True)
    mean, total = _eager_cls_scores(model, "internvl", batch["pixel_values"], -1)
    for config, expected in ((vlmkit.VisPrunerConfig(keep_ratio=0.25), mean),
                             (vlmkit.VisionZipConfig(keep_ratio=0.25), total)):
        wrapped = vlmkit.wrap(model, config)
        try:
            tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])
            start = 0
            for t in tokens:
                n = t.num_uncompressed
                assert n > 16 and n % 16 == 0 and t.num_tokens == n // 4
                tiles = n // 16
                torch.testing.assert_close(t.scores, expected[start:start + tiles].reshape(-1), rtol=1e-5, atol=1e-7)
                start += tiles
            assert wrapped.generate(**batch, max_new_tokens=3, do_sample=False).shape[0] == 2
        finally:
            vlmkit.unwrap(wrapped)
