"""PVC: token accounting, identity at initialisation, causality across frames, training only PVC parameters."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, shared_tiny

import vlmkit
from vlmkit.testing import tiny_vlm

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "is there a red square ?"]
# Tiny models: 4×4 tokens per tile, 2 vision layers; LLaVA's feature layer is the first (-2 of 2).
LAYERS = {"llava": 1, "internvl": 2}


def _pvc(family, **kw):
    return vlmkit.PVCConfig(**{"frames": 4, "tokens_per_frame": 4, "temporal_layers": LAYERS[family], **kw})


@pytest.fixture
def tiny(family):
    """Built once; tests that train change only PVC parameters (the base stays frozen)."""
    return shared_tiny(family)


def _base_features(model, pixel_values):
    """The unwrapped model's visual tokens per tile: [tiles, 4, 4, D]."""
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(feats)).reshape(len(feats), 4, 4, -1)


def _perturb(stage, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_fresh_pvc_token_count_and_accounting(tiny, family):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 2, 1])
    wrapped = vlmkit.wrap(model, _pvc(family))
    tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])
    assert len(tokens) == 4
    for t in tokens:
        assert t.num_tokens == 4 * 4  # frames × tokens_per_frame
        assert t.num_uncompressed == 16  # the processor's run is unchanged
        assert t.grid == (2, 2)
        assert torch.equal(t.index, torch.arange(16))
        assert torch.equal(t.frame, torch.arange(16) // 4)

    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attention_mask"].sum(1).tolist()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
            wrapped(**batch)
    finally:
        handle.remove()
    assert seen[1] == seen[0]  # 4 frames × 4 tokens fill the 16 slots of every image exactly
    out = wrapped.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 3


def test_fresh_pvc_frames_are_the_pooled_base_tokens(tiny, family):
    """Zero-initialised gates: every frame equals the unmodified model's tokens, 2×2 mean-pooled."""
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 2])
    tokens = vlmkit.wrap(model, _pvc(family)).encode_visual(batch["pixel_values"], batch["input_ids"])
    pooled = F.avg_pool2d(_base_features(model, batch["pixel_values"]).permute(0, 3, 1, 2), 2)  # [tiles, D, 2, 2]
    expected = pooled.flatten(2).transpose(1, 2)  # [tiles, 4, D]
    for i, t in enumerate(tokens):
        for f in range(4):
            torch.testing.assert_close(t.embeds[f * 4 : (f + 1) * 4], expected[i], rtol=1e-5, atol=1e-6)


def test_one_frame_full_grid_is_identity(tiny, family):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 1, 2])
    ref = model.generate(**batch, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref_logits = model(**batch).logits
    wrapped = vlmkit.wrap(model, _pvc(family, frames=1, tokens_per_frame=16))
    assert torch.equal(wrapped.generate(**batch, max_new_tokens=6, do_sample=False), ref)
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, ref_logits)


def test_training_changes_only_pvc_parameters(tiny, family):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS[:2], [1, 1], padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    wrapped = vlmkit.wrap(model, _pvc(family))
    stage = wrapped.stages[0]
    assert all(p.requires_grad for p in stage.parameters()), "PVC parameters are trainable"
    model.requires_grad_(False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    start = {k: v.clone() for k, v in stage.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    try:
        for _ in range(3):
            optimizer.zero_grad()
            wrapped(**batch, labels=labels).loss.backward()
            optimizer.step()
    finally:
        model.requires_grad_(True)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items()), "the base model must stay frozen"
    unchanged = [k for k, v in stage.state_dict().items() if torch.equal(v, start[k])]
    assert not unchanged, f"PVC parameters that did not train: {unchanged}"
    tokens = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])[0].embeds.detach()
    assert not torch.allclose(tokens[:4], tokens[4:8]), "trained frame conditioning makes frames differ"


def test_temporal_attention_is_causal():
    model, _ = shared_tiny("internvl")
    wrapped = vlmkit.wrap(model, _pvc("internvl"))
    stage = wrapped.stages[0]
    _perturb(stage)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 3, 32, 32, generator=g)
    b = a.clone()
    b[2] = torch.randn(3, 32, 32, generator=g)  # only the last frame differs
    with torch.no_grad():
        ta, tb = stage.encode_video(wrapped.family, a), stage.encode_video(wrapped.family, b)
    assert ta.num_tokens == 3 * 4 and torch.equal(ta.frame, torch.arange(12) // 4)
    torch.testing.assert_close(ta.embeds[:8], tb.embeds[:8])  # frames 0 and 1 cannot see frame 2
    assert not torch.allclose(ta.embeds[8:], tb.embeds[8:])
    c = a.clone()
    c[0] = torch.randn(3, 32, 32, generator=g)  # the first frame differs: later frames see it
    with torch.no_grad():
        tc = stage.encode_video(wrapped.family, c)
    assert not torch.allclose(ta.embeds[8:], tc.embeds[8:])


def test_fresh_video_frames_are_used_as_they_are():
    model, _ = shared_tiny("llava")
    wrapped = vlmkit.wrap(model, _pvc("llava"))
    frames = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = wrapped.stages[0].encode_video(wrapped.family, frames)
    pooled = F.avg_pool2d(_base_features(model, frames).permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens.embeds, pooled.reshape(12, -1), rtol=1e-5, atol=1e-6)


def test_save_and_load_restore_trained_pvc(tmp_path):
    model, processor = shared_tiny("llava")
    batch = make_batch(processor, QUESTIONS[:1], [1])
    wrapped = vlmkit.wrap(model, _pvc("llava"))
    _perturb(wrapped.stages[0], seed=4)
    with torch.no_grad():
        before = wrapped.encode_visual(batch["pixel_values"], batch["input_ids"])[0].embeds
    wrapped.save_pretrained(tmp_path)
    loaded = vlmkit.load(vlmkit.unwrap(wrapped), tmp_path)
    with torch.no_grad():
        after = loaded.encode_visual(batch["pixel_values"], batch["input_ids"])[0].embeds
    assert torch.equal(before, after)


def test_peft_modules_to_save_trains_the_pvc_copy():
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_vlm("llava", seed=1)
    batch = make_batch(processor, QUESTIONS[:2], [1, 1], padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    wrapped = vlmkit.wrap(model, _pvc("llava"))
    peft_model = get_peft_model(wrapped, LoraConfig(r=2, target_modules=["o_proj"],
                                                   modules_to_save=wrapped.trainable_stage_names()))
    peft_model(**batch, labels=labels).loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert any("stages.pvc.modules_to_save" in n and "compressor" in n for n in grads)
    assert all("lora_" in n or "stages.pvc.modules_to_save" in n for n in grads)


@pytest.mark.parametrize(
    "kwargs", [{"frames": 0}, {"tokens_per_frame": 0}, {"temporal_layers": 0}, {"tokens_per_frame": 8},
               {"frames": 5, "tokens_per_frame": 4}, {"frames": 2, "tokens_per_frame": 9},
               {"frames": 1, "tokens_per_frame": 64}, {"temporal_layers": 3}],
)
def test_invalid_pvc_configs_raise_at_wrap(tiny, family, kwargs):
    model, _ = tiny
    with pytest.raises(ValueError):
        vlmkit.wrap(model, _pvc(family, **kwargs))


def test_pvc_cannot_be_combined_with_another_compressor():
    import vlmkit
    from vlmkit.testing import tiny_vlm

    model, _ = tiny_vlm("llava")
    with pytest.raises(ValueError, match=r"'pvc' cannot be combined with other compressor stages, got \['pvc', 'fopru'\]"):
        vlmkit.wrap(model, vlmkit.PVCConfig(frames=1, tokens_per_frame=16), vlmkit.FoPruConfig(keep_ratio=0.5))


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_video_frames_in_a_prompt_are_one_causal_video(family):
    """forward/generate(video_frames=[...]): consecutive single-tile images of a prompt are one video's
    frames, encoded as encode_video encodes them; a lone image keeps the static-video path."""
    model, processor = shared_tiny(family)
    wrapped = vlmkit.wrap(model, _pvc(family))
    _perturb(wrapped.stages[0], seed=5)
    batch = make_batch(processor, QUESTIONS[:1], [4], seed=3)
    pv, ids = batch["pixel_values"], batch["input_ids"]
    if pv.shape[0] != 4:
        pytest.skip(f"the tiny {family} processor tiled the images ({pv.shape[0]} rows)")
    with torch.no_grad():
        grouped = wrapped.encode_visual(pv, ids, video_frames=[1, 3])
        video = wrapped.stages[0].encode_video(wrapped.family, pv[1:])
        alone = wrapped.encode_visual(pv[:1])  # the first image on its own (one tile)
    assert [t.num_tokens for t in grouped] == [4 * 4, 4, 4, 4]  # the image: 4 static frames; video: 4 per frame
    torch.testing.assert_close(torch.cat([t.embeds for t in grouped[1:]]), video.embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[0].embeds, alone[0].embeds, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = wrapped(**batch, video_frames=[1, 3])
        gen = wrapped.generate(**batch, video_frames=[1, 3], max_new_tokens=2, do_sample=False)
        assembled = wrapped.assemble(ids, pv, batch["attention_mask"], video_frames=[1, 3])
    assert assembled.visual_tokens_per_sample == [16 + 3 * 4]
    assert torch.isfinite(out.logits).all() and gen.shape == (1, ids.shape[1] + 2)
    with pytest.raises(ValueError, match="summing to the 4 images"):
        wrapped.encode_visual(pv, ids, video_frames=[2, 3])
