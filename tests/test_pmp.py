"""PMP prompt-guided mask proposals: the standalone decoder, the matcher/loss and the head on a wrapped VLM."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_batch

import vlmkit
from vlmkit.seg import criterion
from vlmkit.seg.pmp import PMPConfig, PMPDecoder, hungarian_match, set_criterion
from vlmkit.testing import tiny_vlm


SMALL = dict(num_queries=6, hidden_dim=32, num_layers=3, num_heads=4, ffn_dim=64)


def _decoder(text_xattn=True, seed=0, **kw):
    torch.manual_seed(seed)
    return PMPDecoder(16, 12, text_xattn=text_xattn, **{**SMALL, **kw}).eval()


def _inputs(seed=1, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(B, 16, 5, 7, generator=g)
    text = torch.randn(B, T, 12, generator=g)
    lengths = torch.tensor([2, 5, 3][:B])
    mask = torch.arange(T)[None] < lengths[:, None]
    return pix, text, mask, lengths


# ------------------------------------------------------------------------------------------------
# Standalone decoder
# ------------------------------------------------------------------------------------------------


def test_decoder_shapes_and_padding_invariance():
    dec = _decoder()
    pix, text, mask, lengths = _inputs()
    with torch.no_grad():
        out = dec(pix, text, mask)
        assert out["pred_masks"].shape == (3, 6, 5, 7)
        assert out["pred_scores"].shape == (3, 6)
        assert out["pred_embeds"].shape == (3, 6, 32)
        assert len(out["aux_outputs"]) == 3 and all(a["pred_masks"].shape == (3, 6, 5, 7) for a in out["aux_outputs"])
        # batch-N (padded prompts) == batch-1 (unpadded prompt) for every sample and every prediction
        for b, n in enumerate(lengths.tolist()):
            one = dec(pix[b:b + 1], text[b:b + 1, :n])
            assert torch.allclose(one["pred_masks"][0], out["pred_masks"][b], atol=1e-5)
            assert torch.allclose(one["pred_scores"][0], out["pred_scores"][b], atol=1e-5)
            for a1, aN in zip(one["aux_outputs"], out["aux_outputs"]):
                assert torch.allclose(a1["pred_masks"][0], aN["pred_masks"][b], atol=1e-5)
        # garbage in the padded slots changes nothing
        noisy = torch.where(mask[..., None], text, torch.full_like(text, 1e3))
        assert torch.allclose(dec(pix, noisy, mask)["pred_masks"], out["pred_masks"], atol=1e-6)


def test_masks_depend_on_the_prompt_only_with_text_cross_attention():
    pix, text, _, _ = _inputs(B=2)
    other = torch.randn(text.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        dec = _decoder(text_xattn=True)
        a, b = dec(pix, text)["pred_masks"], dec(pix, other)["pred_masks"]
        assert (a - b).abs().max() > 1e-2
        plain = _decoder(text_xattn=False)
        assert not any("text" in n for n, _ in plain.named_parameters())
        assert torch.equal(plain(pix, text)["pred_masks"], plain(pix, other)["pred_masks"])
        assert torch.equal(plain(pix, text)["pred_masks"], plain(pix)["pred_masks"])
    with pytest.raises(ValueError, match="text_tokens"):
        dec(pix)


def test_empty_prompt_is_the_plain_decoder():
    """A sample without any real prompt token skips the text sub-layers (no NaN): plain-decoder output."""
    dec = _decoder(text_xattn=True)
    plain = PMPDecoder(16, 12, text_xattn=False, **SMALL).eval()
    missing, unexpected = plain.load_state_dict(dec.state_dict(), strict=False)
    assert not missing and all(k.startswith("text_") for k in unexpected)
    pix, text, mask, _ = _inputs(B=2)
    mask[1] = False
    with torch.no_grad():
        out = dec(pix, text, mask)["pred_masks"]
        ref = plain(pix[1:])["pred_masks"]
    assert torch.isfinite(out).all()
    assert torch.allclose(out[1:], ref, atol=1e-5)
    assert (out[:1] - plain(pix[:1])["pred_masks"]).abs().max() > 1e-3


def test_decoder_argument_errors():
    with pytest.raises(ValueError, match="num_heads"):
        PMPDecoder(16, hidden_dim=30, num_heads=4)
    dec = _decoder()
    with pytest.raises(ValueError, match=r"pixel_feats must be \[B, C, h, w\]"):
        dec(torch.zeros(16, 5, 7), torch.zeros(1, 2, 12))
    with pytest.raises(ValueError, match="text_mask"):
        dec(torch.zeros(1, 16, 5, 7), torch.zeros(1, 2, 12), torch.ones(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# Matching and loss
# ------------------------------------------------------------------------------------------------


def test_hungarian_match_is_the_brute_force_optimum(monkeypatch):
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(5, 3, generator=g)
    qi, ti = hungarian_match(cost)
    assert ti.tolist() == [0, 1, 2]
    best = min(itertools.permutations(range(5), 3), key=lambda p: sum(cost[q, t] for t, q in enumerate(p)))
    assert qi.tolist() == list(best)
    # the greedy fallback (no scipy) agrees when the cheapest pairs do not compete
    monkeypatch.setattr(criterion, "_linear_sum_assignment", lambda: None)
    easy = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.9, 0.9], [0.9, 0.9, 0.3], [0.5, 0.5, 0.5]])
    assert [t.tolist() for t in hungarian_match(easy)] == [[1, 0, 2], [0, 1, 2]]


def test_set_criterion_matches_the_right_query_and_scores_it():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    good = torch.where(target[0] > 0, 20.0, -20.0)
    masks = torch.stack([-good, good])[None]  # query 1 is the target, query 0 its complement
    scores = torch.tensor([[0.3, -0.4]])
    loss, parts = set_criterion({"pred_masks": masks, "pred_scores": scores}, [{"masks": target}],
                                class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1)
    assert parts["loss_mask"] < 1e-6 and parts["loss_dice"] < 1e-6
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (0.1 * bce(scores[0, 0], torch.tensor(0.0)) + bce(scores[0, 1], torch.tensor(1.0))) / 1.1
    assert torch.allclose(parts["loss_class"], expected)
    assert torch.allclose(loss, 2.0 * expected + 5.0 * parts["loss_mask"] + 5.0 * parts["loss_dice"])


# ------------------------------------------------------------------------------------------------
# Head on a wrapped VLM
# ------------------------------------------------------------------------------------------------

QUESTIONS = ["what shape is it ?", "is there a red circle in the image ?", "how many"]


def _wrapped(model, **kw):
    torch.manual_seed(0)
    return vlmkit.wrap(model, PMPConfig(**{**SMALL, **kw}))


def test_head_scatters_hidden_states_to_the_grid(tiny):
    model, processor = tiny
    batch = make_batch(processor, QUESTIONS, [1, 1, 1], padding_side="right")
    wrapped = _wrapped(model)
    head = wrapped.stages[0]
    with torch.no_grad():
        out = wrapped(**batch)
        assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        hidden = wrapped.run_language_model(assembled, output_hidden_states=True).hidden_states[-1]
    h, w = wrapped.family.grid
    assert out["mask_proposals"].shape == (3, 6, h, w)
    assert out["proposal_scores"].shape == (3, 6) and out["proposal_embeds"].shape == (3, 6, 32)
    grid = head.pixel_features(assembled, hidden)
    cells = h * w
    for b in range(3):
        vis = hidden[b, assembled.visual_mask[b]]  # uncompressed: every tile's cells in order
        tile = vis[-cells:]  # single-tile images here: the last tile is the only one
        assert torch.equal(grid[b], tile.T.reshape(-1, h, w))
    tokens, mask = head.text_tokens(assembled, hidden)
    text_pos = (assembled.attention_mask == 1) & ~assembled.visual_mask
    for b in range(3):
        assert int(mask[b].sum()) == int(text_pos[b].sum())
        assert torch.equal(tokens[b, mask[b]], hidden[b, text_pos[b]])


def test_pruned_cells_are_zero():
    model, processor = tiny_vlm("llava", seed=0)
    torch.manual_seed(0)
    wrapped = vlmkit.wrap(model, vlmkit.RandomPruneConfig(keep_ratio=0.5), PMPConfig(**SMALL))
    batch = make_batch(processor, QUESTIONS[:2], [1, 1], padding_side="right")
    with torch.no_grad():
        assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        hidden = wrapped.run_language_model(assembled, output_hidden_states=True).hidden_states[-1]
    grid = wrapped.stages_of("head")[0].pixel_features(assembled, hidden).flatten(2)  # [B, D, h*w]
    for b, tokens in enumerate(assembled.tokens):
        kept = tokens.index
        assert 0 < kept.numel() < grid.shape[-1]
        assert torch.equal(grid[b][:, kept], hidden[b, assembled.visual_mask[b]].T)
        dropped = torch.ones(grid.shape[-1], dtype=torch.bool)
        dropped[kept] = False
        assert torch.equal(grid[b][:, dropped], torch.zeros_like(grid[b][:, dropped]))


def test_head_proposals_follow_the_prompt_only_with_text_cross_attention():
    """The LM is causal and the image comes first, so the visual hidden states ignore the question: with
    text cross-attention off the proposals are the same for every question, with it on they differ."""
    model, processor = tiny_vlm("llava", seed=0)
    on, off = _wrapped(model, text_xattn=True), _wrapped(model, text_xattn=False)
    first, second = (make_batch(processor, [q], [1]) for q in QUESTIONS[:2])
    with torch.no_grad():
        a_on, b_on = on(**first)["mask_proposals"], on(**second)["mask_proposals"]
        a_off, b_off = off(**first)["mask_proposals"], off(**second)["mask_proposals"]
    assert (a_on - b_on).abs().max() > 1e-3
    assert torch.allclose(a_off, b_off, atol=1e-5)


def test_head_batch_equals_single_samples(family):
    model, processor = tiny_vlm(family, seed=0)
    wrapped = _wrapped(model)
    batch = make_batch(processor, QUESTIONS, [1, 1, 1], padding_side="right")
    with torch.no_grad():
        out = wrapped(**batch)
    # each sample alone: its own unpadded ids and its own image tiles
    images_per = batch["pixel_values"].shape[0] // 3
    for b in range(3):
        n = int(batch["attention_mask"][b].sum())
        single = {
            "input_ids": batch["input_ids"][b:b + 1, :n],
            "attention_mask": batch["attention_mask"][b:b + 1, :n],
            "pixel_values": batch["pixel_values"][b * images_per:(b + 1) * images_per],
        }
        with torch.no_grad():
            one = wrapped(**single)
        assert torch.allclose(one["mask_proposals"][0], out["mask_proposals"][b], atol=1e-4)
        assert torch.allclose(one["proposal_scores"][0], out["proposal_scores"][b], atol=1e-4)


def test_gradients_reach_only_the_head_when_the_base_is_frozen():
    model, processor = tiny_vlm("llava", seed=0)
    wrapped = _wrapped(model)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = make_batch(processor, QUESTIONS[:2], [1, 1], padding_side="right")
    masks = torch.zeros(2, 32, 32)
    masks[0, :16] = 1
    masks[1, :, 8:20] = 1
    wrapped.train()
    out = wrapped(**batch, masks=masks)
    assert out.loss is not None and torch.allclose(out.loss, out["mask_loss"])
    out.loss.backward()
    head = wrapped.stages[0]
    assert all(p.grad is None for p in model.parameters())
    grads = {n: p.grad for n, p in head.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_head_loss_reaches_the_language_model_when_it_trains():
    """No detach between the LM and the head: LISA-style LoRA on the LM learns from the mask loss."""
    model, processor = tiny_vlm("llava", seed=0)
    wrapped = _wrapped(model)
    batch = make_batch(processor, QUESTIONS[:1], [1])
    out = wrapped(**batch, masks=torch.ones(1, 8, 8))
    out.loss.backward()
    lm_weight = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert lm_weight.grad is not None and float(lm_weight.grad.abs().sum()) > 0


def test_loss_is_lm_loss_plus_weighted_mask_loss_and_training_lowers_it():
    model, processor = tiny_vlm("llava", seed=0)
    wrapped = _wrapped(model, loss_weight=0.5)
    plain = vlmkit.wrap(model)
    batch = make_batch(processor, QUESTIONS[:2], [1, 1], padding_side="right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    masks = [torch.zeros(16, 16), torch.ones(2, 16, 16)]
    masks[0][4:12, 4:12] = 1
    masks[1][1, 8:] = 0
    with torch.no_grad():
        out = wrapped(**batch, labels=labels, masks=masks)
        lm = plain(**batch, labels=labels).loss
    assert torch.allclose(out.loss, lm + 0.5 * out["mask_loss"], atol=1e-5)
    for p in model.parameters():
        p.requires_grad_(False)
    head = wrapped.stages[0]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    wrapped.train()
    losses = []
    for _ in range(6):
        loss = wrapped(**batch, masks=masks)["mask_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_prompt_positions_exclude_supervised_tokens():
    model, processor = tiny_vlm("llava", seed=0)
    wrapped = _wrapped(model, text_positions="prompt")
    batch = make_batch(processor, QUESTIONS[:1], [1])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -3:] = batch["input_ids"][0, -3:]
    with torch.no_grad():
        assembled = wrapped.assemble(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels)
        hidden = wrapped.run_language_model(assembled, output_hidden_states=True).hidden_states[-1]
    _, mask = wrapped.stages[0].text_tokens(assembled, hidden)
    n_text = int(((assembled.attention_mask == 1) & ~assembled.visual_mask).sum())
    assert int(mask.sum()) == n_text - 3


def test_recipe_trains_the_pmp_stage_and_weights_round_trip(tmp_path):
    from vlmkit.train.recipes import load_recipe, select_trainable_stages

    model, processor = tiny_vlm("llava", seed=0)
    wrapped = _wrapped(model)
    for p in wrapped.stages.parameters():
        p.requires_grad_(False)
    notes = select_trainable_stages(wrapped, load_recipe("lisa"))
    assert all(p.requires_grad for p in wrapped.stages[0].parameters())
    assert not any("'pmp'" in n for n in notes)
    assert wrapped.trainable_stage_names() == ["stages.pmp"]

    with torch.no_grad():
        for p in wrapped.stages.parameters():
            p.add_(0.01 * torch.randn_like(p))
    wrapped.save_pretrained(tmp_path)
    fresh, _ = tiny_vlm("llava", seed=0)
    loaded = vlmkit.load(fresh, tmp_path)
    assert loaded.stage_configs[0] == wrapped.stage_configs[0]
    batch = make_batch(processor, QUESTIONS[:1], [1])
    with torch.no_grad():
        assert torch.allclose(loaded(**batch)["mask_proposals"], wrapped(**batch)["mask_proposals"], atol=1e-6)


def test_config_validation_and_round_trip():
    c = PMPConfig(num_queries=4, text_xattn=False, text_positions="prompt")
    assert PMPConfig.from_dict(c.to_dict()) == c
    assert c.role == "head" and c.type == "pmp"
    for bad, match in [(dict(num_queries=0), "num_queries"), (dict(hidden_dim=30), "hidden_dim"),
                       (dict(text_positions="answer"), "text_positions"), (dict(no_object_weight=0), "no_object_weight"),
                       (dict(num_layers=-1), "num_layers")]:
        with pytest.raises(ValueError, match=match):
            PMPConfig(**bad)


def test_head_input_errors():
    model, processor = tiny_vlm("llava", seed=0)
    wrapped = _wrapped(model)
    batch = make_batch(processor, QUESTIONS[:2], [1, 2], padding_side="right")
    with pytest.raises(ValueError, match="one image per sample"):
        wrapped(**batch)
    batch = make_batch(processor, QUESTIONS[:2], [1, 1], padding_side="right")
    with pytest.raises(ValueError, match="masks hold 1 sample"):
        wrapped(**batch, masks=torch.ones(1, 1, 8, 8))
