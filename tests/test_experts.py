"""MouSi poly-visual experts: fused token counts, exact expert features, wrapped forward/generate with the
processor's prompt, the shared/row position schemes on hand-worked layouts, training reaches only the fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlmkit
from vlmkit.families import family_for
from vlmkit.position.mousi import MouSiPositionConfig, mousi_position_ids
from vlmkit.testing import image_prompt, random_images, tiny_vlm
from vlmkit.vision.experts import (
    ExpertBackbone, ExpertsConfig, MLPProjector, QFormerResampler, query_grid, register_expert,
)


# A tiny open_clip ViT from a custom model config: 12 px, patch 4 → a 3×3 grid of width 32.
CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 12, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
}
OWN = {"name": "own"}  # the tiny LLaVA's own tower + projector: 4×4 tokens, already in the LM width
OWN_NEW = {"name": "own", "projector": "new"}  # its tower's features (width 32) with a new projector
CLIP = {"name": "open_clip", "model_config": CLIP_CFG}  # 3×3
SAM = {"name": "sam", "variant": "tiny"}  # tiny_sam: 64 px, patch 8 → 8×8 cells of width 32
QUESTIONS = ["how many ?", "what color is the circle ?"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_vlm("llava", seed=0)


def process(processor, questions, seed=0):
    processor.tokenizer.padding_side = "left"
    images = random_images(len(questions), seed=seed)
    return processor(images=[[im] for im in images], text=[image_prompt(processor, q) for q in questions],
                     return_tensors="pt", padding=True)


def attached(model, **config):
    stage = ExpertsConfig(**config).build()
    stage.attach(family_for(model))
    return stage


# --- fused token counts -------------------------------------------------------------------------
# (experts, config) -> tokens per expert, by hand: own 4×4 = 16, open_clip 3×3 = 9, SAM 8×8 = 64.
COUNTS = {
    "2-mlp": ([OWN, SAM], {}, [16, 64]),
    "2-mlp-merge": ([OWN, dict(SAM, merge=[2, 2])], {}, [16, 16]),  # SAM 2×2 windows: 4×4
    "2-mlp-merge-all": ([OWN_NEW, SAM], {"merge": 2}, [8, 32]),  # 1×2 windows: own 4×2, SAM 8×4
    "2-qformer": ([OWN, SAM], {"fusion": "qformer", "queries": 4}, [4, 4]),
    "3-mlp": ([OWN, CLIP, SAM], {}, [16, 9, 64]),
    "3-mlp-merge": ([OWN, dict(CLIP, merge=[3, 3]), dict(SAM, merge=4)], {}, [16, 1, 16]),
    "3-qformer": ([OWN, dict(CLIP, queries=6), SAM], {"fusion": "qformer", "queries": 8}, [8, 6, 8]),
}


@pytest.mark.parametrize("case", sorted(COUNTS))
def test_fused_token_count_matches_the_configuration(tiny, case):
    model, processor = tiny
    experts, extra, per_expert = COUNTS[case]
    stage = attached(model, experts=experts, **extra)
    assert stage.tokens_per_expert == per_expert
    total = sum(per_expert)
    assert stage.placeholders_per_image(family_for(model)) == total
    batch = process(processor, QUESTIONS)
    with torch.no_grad():
        tokens = stage.encode_images(family_for(model), batch["pixel_values"])
    assert len(tokens) == 2
    offsets = np.cumsum([0] + per_expert[:-1]).tolist()
    for t in tokens:
        assert t.embeds.shape == (total, 64) and t.num_uncompressed == total  # 64: the tiny LM's width
        assert t.index.tolist() == list(range(total))
        assert [o for o, _ in t.blocks] == offsets
        assert [h * w for _, (h, w) in t.blocks] == per_expert
    assert not torch.allclose(tokens[0].embeds, tokens[1].embeds)  # two different images


def test_block_grids_follow_merge_and_queries(tiny):
    model, _ = tiny
    stage = attached(model, experts=[OWN_NEW, dict(SAM, merge=[2, 4])], merge=2)
    assert stage.blocks == [(0, (4, 2)), (8, (4, 2))]  # own 4×4 in 1×2 windows; SAM 8×8 in 2×4 windows
    stage = attached(model, experts=[OWN, dict(SAM, queries=6)], fusion="qformer", queries=16)
    assert stage.blocks == [(0, (4, 4)), (16, (2, 3))]
    assert [query_grid(q) for q in (1, 7, 8, 12, 16)] == [(1, 1), (1, 7), (2, 4), (3, 4), (4, 4)]


def test_merge_that_does_not_tile_the_grid_fails_at_wrap_time(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"experts\[1\].*merge window 1×2 does not tile the expert's 3×3 grid"):
        vlmkit.wrap(model, ExpertsConfig(experts=[OWN, dict(CLIP, merge=2)]))


# --- each expert sees exactly what it should ------------------------------------------------------
def test_own_expert_with_the_model_projector_is_the_model_s_own_image_features(tiny):
    model, processor = tiny
    stage = attached(model, experts=[OWN, SAM])
    batch = process(processor, QUESTIONS)
    with torch.no_grad():
        tokens = stage.encode_images(family_for(model), batch["pixel_values"])
        ref = model.model.get_image_features(
            pixel_values=batch["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default",
        ).pooler_output
    for t, r in zip(tokens, ref):
        assert torch.equal(t.embeds[:16], r)  # identity fusion: the model's own 16 tokens, unchanged


def test_sam_expert_sees_the_raw_image_resized_and_renormalised(tiny):
    # The model's pixel values are de-normalised with CLIP's mean/std (the tiny LLaVA processor's); the
    # reference goes from the raw PIL image straight to SAM's input instead.
    model, processor = tiny
    stage = attached(model, experts=[SAM])
    image = random_images(1, seed=3)[0]
    batch = processor(images=[[image]], text=[image_prompt(processor, "how many ?")], return_tensors="pt")
    expert = stage.experts[0]
    mean, std = torch.tensor(stage.config.image_mean), torch.tensor(stage.config.image_std)
    with torch.no_grad():
        got = expert.encode(family_for(model), batch["pixel_values"], mean, std)
        raw = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # [1, 3, 32, 32], 0..255
        raw = F.interpolate(raw / 255, size=(64, 64), mode="bilinear", align_corners=False, antialias=True) * 255
        sam = expert.image_encoder
        pixel_mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
        pixel_std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
        ref = sam((raw - pixel_mean) / pixel_std)  # [1, 32, 8, 8]
    assert got.shape == (1, 64, 32)
    torch.testing.assert_close(got, ref.flatten(2).transpose(1, 2), atol=2e-4, rtol=0)


def test_backbones_load_from_local_checkpoints(tiny, tmp_path):
    import open_clip
    from vlmkit.seg.sam import tiny_sam

    model, _ = tiny
    torch.manual_seed(5)
    text_cfg = {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=CLIP_CFG["vision_cfg"], text_cfg=text_cfg).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.bin")
    sam = tiny_sam(seed=3)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    stage = attached(model, experts=[dict(CLIP, checkpoint=str(tmp_path / "clip.bin")),
                                     dict(SAM, checkpoint=str(tmp_path / "sam.pth"))])
    clip_expert, sam_expert = stage.experts
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = clip.visual.forward_intermediates(x, indices=[-2], output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(clip_expert.features(x), ref["image_intermediates"][0], atol=0, rtol=0)
        y = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(sam_expert.features(y), sam.image_encoder(y).flatten(2).transpose(1, 2),
                                   atol=0, rtol=0)
    with pytest.raises(ValueError, match="weights_only"):
        (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
        attached(model, experts=[dict(SAM, checkpoint=str(tmp_path / "bad.pth"))])


def test_mlp_merge_concatenates_each_window_row_major():
    torch.manual_seed(0)
    proj = MLPProjector(in_dim=3, out_dim=5, grid=(2, 4), merge=(1, 2))
    x = torch.randn(2, 8, 3)  # two images, a 2×4 grid of 3-d features
    got = proj(x)
    assert got.shape == (2, 4, 5)
    cells = x.view(2, 2, 4, 3)
    for r in range(2):
        for c in range(2):
            window = torch.cat([cells[:, r, 2 * c], cells[:, r, 2 * c + 1]], dim=-1)  # [2, 6]
            torch.testing.assert_close(got[:, r * 2 + c], proj.fc2(proj.act(proj.fc1(window))))
    proj = MLPProjector(in_dim=3, out_dim=5, grid=(2, 4), merge=(2, 2))
    cells_2x2 = torch.cat([cells[:, 0, 2], cells[:, 0, 3], cells[:, 1, 2], cells[:, 1, 3]], dim=-1)
    torch.testing.assert_close(proj(x)[:, 1], proj.fc2(proj.act(proj.fc1(cells_2x2))))


def test_qformer_gives_its_queries_per_image_independently():
    torch.manual_seed(0)
    resampler = QFormerResampler(in_dim=6, width=16, num_queries=5, heads=4, layers=2).eval()
    x = torch.randn(3, 10, 6)
    with torch.no_grad():
        out = resampler(x)
        assert out.shape == (3, 5, 16)
        torch.testing.assert_close(out[1:2], resampler(x[1:2]), atol=1e-6, rtol=0)
        assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="qformer_heads 3 must divide"):
        QFormerResampler(in_dim=6, width=16, num_queries=5, heads=3)


def test_registered_expert_builds_injected_modules(tiny):
    class MeanPool(ExpertBackbone):  # a 2×2 grid of 3-channel means over the model's own pixels
        def features(self, x):
            return F.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)

    register_expert("test_meanpool", lambda spec, family: MeanPool((2, 2), 3), replace=True)
    model, processor = tiny
    stage = attached(model, experts=[{"name": "test_meanpool"}, OWN])
    assert stage.tokens_per_expert == [4, 16]
    batch = process(processor, QUESTIONS[:1])
    with torch.no_grad():
        tokens = stage.encode_images(family_for(model), batch["pixel_values"])[0]
        pixels01 = batch["pixel_values"] * torch.tensor(stage.config.image_std).view(1, 3, 1, 1) \
            + torch.tensor(stage.config.image_mean).view(1, 3, 1, 1)
        feats = F.adaptive_avg_pool2d(pixels01, 2).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens.embeds[:4], stage.fusers[0](feats)[0])
    assert list(stage.state_dict()) == [f"fusers.0.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]


# --- the wrapped model ---------------------------------------------------------------------------
def manual_inputs(model, stage, batch):
    """Hand-built language-model input: each image's 16 processor placeholders replaced by its fused tokens."""
    family = family_for(model)
    with torch.no_grad():
        tokens = stage.encode_images(family, batch["pixel_values"])
    ph = family.placeholder_id
    rows, image = [], 0
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        row, seen = [], 0
        for tok, m in zip(ids, mask):
            if not m:
                continue
            if tok == ph:
                seen += 1
                if seen == 16:  # the run's end: all of this image's fused tokens
                    row += [("img", tokens[image].embeds[j]) for j in range(tokens[image].num_tokens)]
                    image, seen = image + 1, 0
                continue
            row.append(("txt", tok))
        rows.append(row)
    L = max(len(r) for r in rows)
    embed = model.get_input_embeddings()
    embeds = torch.zeros(len(rows), L, 64)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        for j, (kind, value) in enumerate(row):
            col = L - len(row) + j  # left padding
            embeds[b, col] = value if kind == "img" else embed.weight[value].detach()
            mask[b, col] = 1
    return embeds, mask


@pytest.mark.parametrize("fusion", ["mlp", "qformer"])
def test_forward_and_generate_with_the_processor_prompt(tiny, fusion):
    model, processor = tiny
    wrapped = vlmkit.wrap(model, ExpertsConfig(experts=[OWN, CLIP, dict(SAM, merge=[2, 2])], fusion=fusion, queries=4))
    batch = process(processor, QUESTIONS)
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * 16  # the processor's runs
    with torch.no_grad():
        logits = wrapped(**batch).logits
        embeds, mask = manual_inputs(model, wrapped.stages[0], batch)
        ref = model(inputs_embeds=embeds, attention_mask=mask).logits
    real = mask.bool()
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits[real], ref[real], atol=1e-5, rtol=0)
    out = wrapped.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert torch.equal(out[:, batch["input_ids"].shape[1]], logits[:, -1].argmax(-1))  # first greedy token
    assert vlmkit.unwrap(wrapped) is model


# --- positions ------------------------------------------------------------------------------------
def test_block_positions_hand_worked():
    # text a, one image of a 1×2 block then a 2×2 block, text b (the mousi.py docstring example)
    image_id = torch.tensor([[-1, 0, 0, 0, 0, 0, 0, -1]])
    index = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, -1]])
    blocks = [[(0, (1, 2)), (2, (2, 2))]]

    def pos(mode, image_id=image_id, index=index, mask=None):
        mask = torch.ones_like(image_id) if mask is None else mask
        return mousi_position_ids(mode, mask, image_id, index, [6], [6], blocks)[0].tolist()

    assert pos("shared") == [0, 1, 1, 2, 2, 2, 2, 3]
    assert pos("row") == [0, 1, 1, 2, 2, 3, 3, 4]
    assert pos("original") == [0, 1, 2, 3, 4, 5, 6, 7]
    # pruned to run positions 1, 3, 5: kept tokens keep their block's positions, text resumes after the span
    kept_id, kept = torch.tensor([[-1, 0, 0, 0, -1]]), torch.tensor([[-1, 1, 3, 5, -1]])
    assert pos("shared", kept_id, kept) == [0, 1, 2, 2, 3]
    assert pos("row", kept_id, kept) == [0, 1, 2, 3, 4]
    assert pos("original", kept_id, kept) == [0, 2, 4, 6, 7]
    # left padding and a second image without blocks (one 1×2 grid) right after text
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    image_id = torch.tensor([[-1, -1, 0, 0, 0, 0, 0, 0, -1, 1, 1, -1]])
    index = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5, -1, 0, 1, -1]])
    got = mousi_position_ids("row", mask, image_id, index, [6, 2], [6, 2], blocks + [None])[0].tolist()
    assert got == [1, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 6]
    with pytest.raises(ValueError, match="cover 5 positions"):
        mousi_position_ids("row", torch.ones(1, 8), torch.tensor([[-1, 0, 0, 0, 0, 0, 0, -1]]), torch.tensor(
            [[-1, 0, 1, 2, 3, 4, 5, -1]]), [6], [6], [[(0, (1, 2)), (2, (1, 3))]])


# own 4×4 = 16 tokens, then SAM 8×8 in 1×2 windows = 8×4 = 32 tokens, in a real LLaVA prompt
LAYOUT = [OWN, dict(SAM, merge=2)]
EXPECTED = {
    "shared": [0, 1] + [2] * 16 + [3] * 32 + [4, 5, 6, 7, 8],
    "row": [0, 1] + [2 + r for r in range(4) for _ in range(4)] + [6 + r for r in range(8) for _ in range(4)]
    + [14, 15, 16, 17, 18],
    "original": list(range(55)),
}


@pytest.mark.parametrize("mode", ["shared", "row", "original"])
def test_schemes_give_the_documented_positions_in_the_model(tiny, mode):
    model, processor = tiny
    batch = process(processor, ["how many ?"])
    wrapped = vlmkit.wrap(model, ExpertsConfig(experts=LAYOUT, positions=mode))
    assembled = wrapped.assemble(**batch)
    words = processor.tokenizer.convert_ids_to_tokens(assembled.input_ids[0].tolist())
    assert words == ["user", ":"] + ["<image>"] * 48 + ["how", "many", "?", "assistant", ":"]
    assert wrapped.stages[0].rope_positions(assembled)[0].tolist() == EXPECTED[mode]
    # the language model really runs at these positions
    positions = torch.tensor([EXPECTED[mode]], dtype=torch.float32)
    with torch.no_grad():
        logits = wrapped(**batch).logits
        ref = model(inputs_embeds=assembled.inputs_embeds, attention_mask=assembled.attention_mask,
                    position_ids=positions).logits
        plain = model(inputs_embeds=assembled.inputs_embeds, attention_mask=assembled.attention_mask).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    assert (mode == "original") == bool(torch.allclose(logits, plain, atol=1e-5))
    # generated tokens continue at last position + 1, + 2, …: a manual greedy loop without cache
    out = wrapped.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                           output_logits=True)
    embeds, pos = assembled.inputs_embeds, positions
    with torch.no_grad():
        for step in range(3):
            step_logits = model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                position_ids=pos).logits[:, -1]
            torch.testing.assert_close(out.logits[step], step_logits, atol=1e-5, rtol=0)
            token = out.sequences[0, batch["input_ids"].shape[1] + step]
            assert int(token) == int(step_logits.argmax())
            embeds = torch.cat([embeds, model.get_input_embeddings().weight[token][None, None]], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    # MouSiPositionConfig honours the expert blocks: the same positions as a position stage
    vlmkit.unwrap(wrapped)
    staged = vlmkit.wrap(model, ExpertsConfig(experts=LAYOUT), MouSiPositionConfig(mode=mode))
    assert staged.stages_of("position")[0].rope_positions(staged.assemble(**batch))[0].tolist() == EXPECTED[mode]
    with torch.no_grad():
        torch.testing.assert_close(staged(**batch).logits, ref, atol=1e-5, rtol=0)
    vlmkit.unwrap(staged)


def test_positions_and_a_position_stage_do_not_mix(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match=r"at most one position scheme per model, got \['experts', 'mousi_position'\]"):
        vlmkit.wrap(model, ExpertsConfig(experts=LAYOUT, positions="row"), MouSiPositionConfig(mode="row"))
    assert "forward" not in vars(model.model.language_model.rotary_emb)  # nothing patched


@pytest.mark.parametrize("mode", ["row", "original"])
def test_batch_of_two_equals_each_sample_alone(tiny, mode):
    model, processor = tiny
    wrapped = vlmkit.wrap(model, ExpertsConfig(experts=[OWN, CLIP, dict(SAM, merge=[2, 2])], positions=mode))
    batch = process(processor, QUESTIONS)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        logits = wrapped(**batch).logits
    tokens = wrapped.generate(**batch, max_new_tokens=4, do_sample=False)
    S = batch["input_ids"].shape[1]
    for b, question in enumerate(QUESTIONS):
        one = process(processor, [question])
        one["pixel_values"] = batch["pixel_values"][b : b + 1]
        with torch.no_grad():
            one_logits = wrapped(**one).logits
        n = one_logits.shape[1]
        torch.testing.assert_close(logits[b, -n:], one_logits[0], atol=1e-5, rtol=0)
        one_tokens = wrapped.generate(**one, max_new_tokens=4, do_sample=False)
        assert torch.equal(tokens[b, S:], one_tokens[0, one["input_ids"].shape[1] :])
    vlmkit.unwrap(wrapped)


# --- training and saving --------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["mlp", "qformer"])
def test_training_step_reaches_only_the_fusion(fusion):
    from vlmkit.train.recipes import apply_recipe, recipe_from_dict, select_trainable_stages

    model, processor = tiny_vlm("llava", seed=0)  # a fresh model: this test changes weights
    recipe = recipe_from_dict({"name": "experts", "method": "freeze", "stages": {"train": ["experts"]}})
    wrapped = vlmkit.wrap(apply_recipe(model, recipe),
                          ExpertsConfig(experts=[OWN_NEW, CLIP, dict(SAM, merge=[2, 2])], fusion=fusion, queries=4))
    assert select_trainable_stages(wrapped, recipe) == []
    stage = wrapped.stages[0]
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and trainable == {f"stages.experts.{n}" for n, _ in stage.named_parameters()}
    assert all(n.startswith("stages.experts.fusers.") for n in trainable)
    backbones = [p for e in stage.experts for p in e.parameters()]
    assert len(backbones) > 0 and not any(p.requires_grad for p in backbones)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    backbones_before = [p.detach().clone() for p in backbones]

    batch = process(processor, QUESTIONS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    wrapped.train()
    loss = wrapped(**batch, labels=labels).loss
    loss.backward()
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    optimizer.step()
    wrapped.eval()
    for n, p in wrapped.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p, before[n]), n
        else:
            assert p.grad is None and torch.equal(p, before[n]), n
    for p, p0 in zip(backbones, backbones_before):
        assert p.grad is None and torch.equal(p, p0)


def test_save_and_load_round_trip(tiny, tmp_path):
    model, processor = tiny
    config = ExpertsConfig(experts=[OWN, CLIP, dict(SAM, merge=[2, 2])], fusion="qformer", queries=4, seed=7,
                           positions="shared")
    assert ExpertsConfig.from_dict(config.to_dict()) == config
    wrapped = vlmkit.wrap(model, config)
    with torch.no_grad():  # make the saved weights differ from a fresh initialisation
        for p in wrapped.stages[0].parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = process(processor, QUESTIONS)
    with torch.no_grad():
        ref = wrapped(**batch).logits
    wrapped.save_pretrained(tmp_path)
    vlmkit.unwrap(wrapped)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "vlmkit_stages.safetensors")
    assert saved and all(k.startswith("experts.fusers.") for k in saved)  # no backbone weights
    loaded = vlmkit.load(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ref)
    vlmkit.unwrap(loaded)


def test_backbones_follow_the_stage_dtype(tiny):
    model, _ = tiny
    stage = attached(model, experts=[CLIP, SAM])
    stage.to(torch.float64)
    assert all(p.dtype == torch.float64 for e in stage.experts for p in e.parameters())
    stage.train()
    assert stage.training and not any(e.training for e in stage.experts)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fusion": "concat"}, "fusion must be one of"),
        ({"positions": "diagonal"}, "positions must be one of"),
        ({"merge": 0}, "merge must be an int"),
        ({"queries": 0}, "queries must be an int"),
        ({"experts": []}, "non-empty list"),
        ({"experts": [{"name": "dinov2"}]}, "unknown expert 'dinov2'"),
        ({"experts": [dict(SAM, checkpoint_path="x")]}, r"unknown key\(s\) \['checkpoint_path'\]"),
        ({"experts": [{"name": "sam", "variant": "vit_b"}]}, "needs a local 'checkpoint'"),
        ({"experts": [{"name": "sam", "variant": "vit_x", "checkpoint": "x"}]}, "unknown variant 'vit_x'"),
        ({"experts": [{"name": "open_clip", "model": "hf-hub:timm/ViT-B-16"}]}, "never downloads"),
        ({"experts": [{"name": "own", "projector": "mine"}]}, "projector must be 'model' or 'new'"),
        ({"experts": [dict(OWN, merge=[2, 0])]}, r"experts\[0\].merge"),
        ({"image_std": [0.2, 0.0, 0.2]}, "image_std must be positive"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertsConfig(**kwargs)


def test_tiled_families_are_refused_at_wrap():
    from vlmkit.testing import tiny_vlm

    model, _ = tiny_vlm("internvl", seed=0)
    with pytest.raises(ValueError, match="'internvl' tiles its images"):
        vlmkit.wrap(model, ExpertsConfig(experts=[{"name": "own"}]))
